"""Value-aware versus value-oblivious sparse approximation of attention outputs.

Gupta & Berant ("Value-aware Approximate Attention") compare two ways of replacing the exact
attention output `o = sum_i p_i v_i` of one query by a combination of at most `r` values:

- value-oblivious: keep the `r` largest weights `p_i` (top-r attention), renormalised or not;
- value-aware: the convex combination of at most `r` values closest to `o` in L2, i.e.
  `min ||o - beta @ V||` over `beta >= 0, sum(beta) = 1, ||beta||_0 <= r`.

Both are oracle analyses (the value-aware one needs `o`). Everything here works on per-head
arrays: queries `[..., n_q, d]`, keys `[..., n, d]`, values `[..., n, d_v]`, a boolean mask
`[..., n_q, n]` (True = may attend) and a kernel name from `topk.kernels`. Approximations are
returned in sparse form (`SparseApproximation`): `r` key indices and coefficients per query.
"""
import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from topk import kernels, select

# Floor for normalisers, so all-zero weight rows give zero outputs instead of NaN.
_TINY = 1e-30
# Slack on the sign of coefficients found by the exact solver (float64 round-off).
_FEASIBILITY_TOL = 1e-9


class SparseApproximation(NamedTuple):
  """An r-sparse approximation of attention outputs.

  Attributes:
    output: approximate outputs `[..., n_q, d_v]`.
    indices: int32 key indices `[..., n_q, r]`; slots with zero coefficient are unused.
    coefficients: coefficient of each selected value `[..., n_q, r]` (non-negative).
  """

  output: jax.Array | np.ndarray
  indices: jax.Array | np.ndarray
  coefficients: jax.Array | np.ndarray


def _check_r(r: int) -> None:
  if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
    raise ValueError(f'r must be an integer >= 1 (the sparsity budget), got {r!r}.')


def _check_problem(value, target, mask) -> None:
  """Checks value `[..., n, d_v]`, target `[..., n_q, d_v]` and mask `[..., n_q, n]`."""
  if value.ndim < 2 or target.ndim < 2:
    raise ValueError(f'value and target need shapes [..., n, d_v] and [..., n_q, d_v]; got '
                     f'{value.shape} and {target.shape}.')
  if value.shape[-1] != target.shape[-1]:
    raise ValueError(f'value {value.shape} and target {target.shape} must share the last '
                     '(d_v) axis.')
  if mask is not None and mask.shape[-2:] != (target.shape[-2], value.shape[-2]):
    raise ValueError(f'mask {mask.shape} must end in [n_q, n] = '
                     f'{(target.shape[-2], value.shape[-2])}.')


def _broadcast_problem(value, target, mask, xp):
  """Broadcasts batch dims; returns value `[B, n, d_v]`, target `[B, n_q, d_v]`, mask."""
  n, n_q = value.shape[-2], target.shape[-2]
  mask_batch = () if mask is None else mask.shape[:-2]
  batch = np.broadcast_shapes(value.shape[:-2], target.shape[:-2], mask_batch)
  value = xp.broadcast_to(value, batch + value.shape[-2:]).reshape((-1,) + value.shape[-2:])
  target = xp.broadcast_to(target, batch + target.shape[-2:]).reshape((-1,) + target.shape[-2:])
  if mask is None:
    mask = xp.ones((value.shape[0], n_q, n), dtype=bool)
  else:
    mask = xp.broadcast_to(mask.astype(bool), batch + (n_q, n)).reshape((-1, n_q, n))
  return batch, value, target, mask


def attention_weights(query: jax.Array, key: jax.Array, mask: jax.Array | None = None,
                      kernel: str = 'softmax') -> jax.Array:
  """Kernel attention weights `[..., n_q, n]` for query `[..., n_q, d]`, key `[..., n, d]`.

  Scores are scaled by 1/sqrt(d) as in dot-product attention; masked scores (mask False) are
  set to the dtype's most negative value before the kernel, as `topk`'s attention forms do.
  """
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f'query {query.shape} and key {key.shape} must share the last (d) axis.')
  if mask is not None and mask.shape[-2:] != (query.shape[-2], key.shape[-2]):
    raise ValueError(f'mask {mask.shape} must end in [n_q, n] = '
                     f'{(query.shape[-2], key.shape[-2])}.')
  kernel_fn = kernels.get_kernel(kernel)
  scores = jnp.einsum('...qd,...kd->...qk', query, key) / math.sqrt(query.shape[-1])
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  return kernel_fn(scores)


def exact_output(query: jax.Array, key: jax.Array, value: jax.Array,
                 mask: jax.Array | None = None, kernel: str = 'softmax') -> jax.Array:
  """Exact attention output `[..., n_q, d_v]`; value is `[..., n, d_v]`."""
  if value.shape[-2] != key.shape[-2]:
    raise ValueError(f'key {key.shape} and value {value.shape} must have the same length n.')
  weights = attention_weights(query, key, mask, kernel)
  return jnp.einsum('...qk,...kv->...qv', weights, value)


def _gather_values(value: jax.Array, indices: jax.Array) -> jax.Array:
  """Values `[..., n, d_v]` at indices `[..., n_q, r]` -> `[..., n_q, r, d_v]`."""
  return jnp.take_along_axis(value[..., None, :, :], indices[..., None], axis=-2)


def top_r_approximation(weights: jax.Array, value: jax.Array, r: int,
                        renormalise: bool = True) -> SparseApproximation:
  """Value-oblivious optimal r-sparse approximation: the `r` largest weights.

  Args:
    weights: attention weights `[..., n_q, n]` (e.g. from `attention_weights`).
    value: values `[..., n, d_v]`.
    r: number of kept keys (clipped to n).
    renormalise: rescale the kept weights to sum to one (= top-k attention with k = r);
      otherwise keep them as they are.

  Returns:
    The approximation; output `[..., n_q, d_v]`, indices and coefficients `[..., n_q, r']`.
  """
  _check_r(r)
  if weights.shape[-1] != value.shape[-2]:
    raise ValueError(f'weights {weights.shape} and value {value.shape} disagree on n.')
  kept, indices = select.top_k(weights, min(r, weights.shape[-1]))
  if renormalise:
    kept = kept / jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), _TINY)
  output = jnp.einsum('...qr,...qrv->...qv', kept, _gather_values(value, indices))
  return SparseApproximation(output, indices, kept)


def _affine_least_squares(points: np.ndarray, target: np.ndarray):
  """Least squares on the affine hull: `min ||beta @ points - target||, sum(beta) = 1`.

  Args:
    points: `[c, s, d_v]`, c candidate supports of s values each.
    target: `[d_v]`.

  Returns:
    beta `[c, s]` (minimum-norm solution when the points are affinely dependent).
  """
  base = points[:, 0]
  if points.shape[1] == 1:
    return np.ones(points.shape[:2])
  directions = points[:, 1:] - base[:, None]                       # [c, s-1, d_v]
  gamma = np.einsum('cd,cds->cs', target - base, np.linalg.pinv(directions))
  return np.concatenate([1.0 - gamma.sum(-1, keepdims=True), gamma], axis=-1)


def _exact_one(value: np.ndarray, target: np.ndarray, valid: np.ndarray, r: int):
  """Best convex combination of <= r valid rows of value `[n, d_v]` for one target `[d_v]`."""
  candidates = np.flatnonzero(valid)
  best = (np.inf, np.zeros(r, np.int32), np.zeros(r))
  for size in range(1, min(r, candidates.size) + 1):
    supports = np.array(list(itertools.combinations(candidates, size)))   # [c, size]
    beta = _affine_least_squares(value[supports], target)
    # The optimum has an affinely independent support on which it is the (unique, positive)
    # affine least-squares solution, so scanning the feasible solutions of all supports is
    # exact. Feasible candidates are clipped to the simplex and scored as they are.
    feasible = beta.min(-1) >= -_FEASIBILITY_TOL
    if not feasible.any():
      continue
    supports, beta = supports[feasible], np.maximum(beta[feasible], 0.0)
    beta /= beta.sum(-1, keepdims=True)
    errors = np.sum(np.square(np.einsum('cs,csv->cv', beta, value[supports]) - target), -1)
    i = int(np.argmin(errors))
    if errors[i] < best[0]:
      indices = np.zeros(r, np.int32)
      coefficients = np.zeros(r)
      indices[:size], coefficients[:size] = supports[i], beta[i]
      best = (errors[i], indices, coefficients)
  return best[1], best[2]


def value_aware_exact(value: np.ndarray | jax.Array, target: np.ndarray | jax.Array, r: int,
                      mask: np.ndarray | jax.Array | None = None) -> SparseApproximation:
  """Exact value-aware optimal r-sparse approximation by enumerating supports (small n only).

  Enumerates every support of at most `r` unmasked keys and solves least squares on its
  affine hull in float64; a query with no unmasked key gets a zero output.

  Args:
    value: values `[..., n, d_v]`.
    target: exact outputs `[..., n_q, d_v]` to approximate.
    r: sparsity budget.
    mask: optional bool `[..., n_q, n]`; masked keys are never selected.

  Returns:
    numpy `SparseApproximation` (float64): output `[..., n_q, d_v]`, indices/coefficients
    `[..., n_q, r]`.
  """
  _check_r(r)
  value, target = np.asarray(value, np.float64), np.asarray(target, np.float64)
  mask = None if mask is None else np.asarray(mask)
  _check_problem(value, target, mask)
  batch, value, target, mask = _broadcast_problem(value, target, mask, np)
  indices = np.zeros(target.shape[:2] + (r,), np.int32)
  coefficients = np.zeros(target.shape[:2] + (r,))
  for b, q in np.ndindex(*target.shape[:2]):
    indices[b, q], coefficients[b, q] = _exact_one(value[b], target[b, q], mask[b, q], r)
  output = np.einsum('bqr,bqrv->bqv', coefficients, value[np.arange(len(value))[:, None, None],
                                                          indices])
  shape = batch + target.shape[1:2]
  return SparseApproximation(output.reshape(shape + output.shape[-1:]),
                             indices.reshape(shape + (r,)), coefficients.reshape(shape + (r,)))


def _project_simplex(x: jax.Array, active: jax.Array) -> jax.Array:
  """Euclidean projection of `x[active]` onto the probability simplex; inactive -> 0. `[r]`."""
  sorted_x = jnp.sort(jnp.where(active, x, -jnp.inf))[::-1]
  finite = jnp.isfinite(sorted_x)
  cumulative = jnp.cumsum(jnp.where(finite, sorted_x, 0.0))
  rank = jnp.arange(1, x.shape[-1] + 1, dtype=x.dtype)
  count = jnp.sum(finite & (sorted_x - (cumulative - 1.0) / rank > 0))
  threshold = (cumulative[jnp.maximum(count - 1, 0)] - 1.0) / jnp.maximum(count, 1)
  return jnp.where(active, jnp.maximum(x - threshold, 0.0), 0.0)


def _simplex_least_squares(points: jax.Array, target: jax.Array, beta: jax.Array,
                           active: jax.Array, num_iters: int) -> jax.Array:
  """Accelerated projected gradient for `min ||beta @ points - target||^2` on the simplex.

  Args:
    points: `[r, d_v]` support values (inactive rows are ignored).
    target: `[d_v]`.
    beta: feasible starting coefficients `[r]`.
    active: bool `[r]`, which slots belong to the support.
    num_iters: FISTA iterations.

  Returns:
    The best coefficients `[r]` seen (FISTA is not monotone).
  """
  points = jnp.where(active[:, None], points, 0.0)
  gram = points @ points.T
  linear = points @ target
  lipschitz = jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], _TINY)

  def objective(b):
    return b @ gram @ b - 2.0 * b @ linear

  def step(_, state):
    beta, momentum, t, best, best_value = state
    new_beta = _project_simplex(momentum - (gram @ momentum - linear) / lipschitz, active)
    new_t = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    momentum = new_beta + (t - 1.0) / new_t * (new_beta - beta)
    value = objective(new_beta)
    better = value < best_value
    return (new_beta, momentum, new_t, jnp.where(better, new_beta, best),
            jnp.where(better, value, best_value))

  init = (beta, beta, jnp.ones((), beta.dtype), beta, objective(beta))
  return jax.lax.fori_loop(0, num_iters, step, init)[3]


def _add_best(value, target, valid, state, slot, num_iters):
  """Puts into `slot` the candidate value that most reduces the residual, then re-solves.

  `state` is (indices `[r]`, active `[r]`, beta `[r]`, chosen `[n]`) with `slot` inactive; the
  candidate is scored by an exact line search of current -> (1 - gamma) current + gamma v_i.
  """
  indices, active, beta, chosen = state
  current = beta @ value[indices]
  residual = current - target
  direction = current - value                                            # [n, d_v]
  squared = jnp.sum(jnp.square(direction), -1)
  along = direction @ residual
  gamma = jnp.clip(along / jnp.maximum(squared, _TINY), 0.0, 1.0)
  # An empty support (possible while swapping when r = 1) takes the candidate whole.
  gamma = jnp.where(jnp.any(active), gamma, 1.0)
  errors = jnp.where(jnp.any(active), residual @ residual - 2.0 * gamma * along
                     + gamma ** 2 * squared, jnp.sum(jnp.square(value - target), -1))
  candidate = valid & ~chosen
  new = jnp.argmin(jnp.where(candidate, errors, jnp.inf))
  ok = jnp.any(candidate)
  indices = indices.at[slot].set(jnp.where(ok, new, indices[slot]))
  active = active.at[slot].set(ok)
  beta = jnp.where(ok, (beta * (1.0 - gamma[new])).at[slot].set(gamma[new]), beta)
  chosen = chosen.at[new].set(chosen[new] | ok)
  beta = _simplex_least_squares(value[indices], target, beta, active, num_iters)
  return indices, active, beta, chosen


def _squared_error(value, target, indices, beta):
  return jnp.sum(jnp.square(beta @ value[indices] - target))


def _greedy_one(value: jax.Array, target: jax.Array, valid: jax.Array, first: jax.Array,
                r: int, num_iters: int, num_sweeps: int) -> tuple[jax.Array, jax.Array]:
  """Greedy selection from value `first`, then swap sweeps; value `[n, d_v]`, target `[d_v]`."""
  r_used = jnp.minimum(r, jnp.sum(valid))
  ok = valid[first]
  state = (jnp.zeros(r, jnp.int32).at[0].set(first), jnp.zeros(r, bool).at[0].set(ok),
           jnp.zeros(r, value.dtype).at[0].set(ok),
           jnp.zeros(value.shape[0], bool).at[first].set(ok))

  def step(step, state):
    # Steps 1..r-1 fill the empty slots; later steps free one slot (renormalising the rest),
    # refill it greedily and keep the result only if it helps (swap sweeps).
    indices, active, beta, chosen = state
    slot = step % r
    swapping = step >= r
    kept = jnp.where(swapping, beta.at[slot].set(0.0), beta)
    kept = kept / jnp.maximum(jnp.sum(kept), _TINY)
    trial = _add_best(value, target, valid,
                      (indices, active.at[slot].set(active[slot] & ~swapping), kept,
                       chosen.at[indices[slot]].set(chosen[indices[slot]] & ~swapping)),
                      slot, num_iters)
    better = (_squared_error(value, target, trial[0], trial[2]) <
              _squared_error(value, target, indices, beta)) & (slot < r_used)
    return jax.tree.map(lambda t, s: jnp.where(better | ~swapping, t, s), trial, state)

  indices, active, beta, _ = jax.lax.fori_loop(1, r + num_sweeps * r, step, state)
  return indices, jnp.where(active, beta, 0.0)


def _multistart_one(value: jax.Array, target: jax.Array, valid: jax.Array, r: int,
                    num_starts: int, num_iters: int, num_sweeps: int):
  """Best of `_greedy_one` started from each of the `num_starts` values nearest the target."""
  distances = jnp.sum(jnp.square(value - target), axis=-1)
  firsts = select.top_k(jnp.where(valid, -distances, -jnp.inf), num_starts)[1]
  greedy = functools.partial(_greedy_one, r=r, num_iters=num_iters, num_sweeps=num_sweeps)
  indices, beta = jax.vmap(greedy, (None, None, None, 0))(value, target, valid, firsts)
  errors = jax.vmap(_squared_error, (None, None, 0, 0))(value, target, indices, beta)
  # With fewer legal values than starts, the extra starts are masked values and may end with an
  # empty support, whose zero output is no convex combination: they never win.
  best = jnp.argmin(jnp.where(valid[firsts], errors, jnp.inf))
  return indices[best], beta[best]


def _solve_one(value: jax.Array, target: jax.Array, valid: jax.Array,
               weights: jax.Array | None, r: int, num_starts: int, num_iters: int,
               num_sweeps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`value_aware_greedy` for one query: value `[n, d_v]`, target `[d_v]`, valid/weights `[n]`.

  Returns (output `[d_v]`, indices `[r]`, coefficients `[r]`).
  """
  indices, beta = _multistart_one(value, target, valid, r, num_starts, num_iters, num_sweeps)
  if weights is not None:
    kept, top = select.top_k(jnp.where(valid, weights, 0.0), r)
    start = kept / jnp.maximum(jnp.sum(kept), _TINY)
    polished = _simplex_least_squares(value[top], target, start, start > 0, num_iters)
    # An all-zero row of weights gives no candidate (a zero vector is not a combination).
    use_top = ((_squared_error(value, target, top, polished) <
                _squared_error(value, target, indices, beta)) & (jnp.sum(polished) > 0))
    indices = jnp.where(use_top, top, indices)
    beta = jnp.where(use_top, polished, beta)
  return beta @ value[indices], indices, beta


@functools.partial(jax.jit, static_argnames=('r', 'num_starts', 'num_iters', 'num_sweeps',
                                             'query_chunk_size'))
def value_aware_greedy(value: jax.Array, target: jax.Array, r: int,
                       mask: jax.Array | None = None, *, weights: jax.Array | None = None,
                       num_starts: int = 4, num_iters: int = 100, num_sweeps: int = 2,
                       query_chunk_size: int | None = None) -> SparseApproximation:
  """Scalable value-aware r-sparse approximation: greedy selection with swaps, on the simplex.

  Per query and for each of the `num_starts` values nearest the target as a first pick: r - 1
  times, add the unmasked value whose exact line search most reduces the residual and re-solve
  the simplex-constrained least squares on the support (`num_iters` accelerated projected-
  gradient steps); then `num_sweeps` sweeps try to swap each support value for a better one.
  The best start wins. If `weights` are given, the top-r support of the weights is polished the
  same way and used when better, so the result is never worse than renormalised top-r.

  Args:
    value: values `[..., n, d_v]`.
    target: exact outputs `[..., n_q, d_v]`.
    r: sparsity budget (clipped to n).
    mask: optional bool `[..., n_q, n]`; masked keys are never selected.
    weights: optional attention weights `[..., n_q, n]` for the top-r candidate.
    num_starts: greedy runs per query, from the nearest values.
    num_iters: projected-gradient iterations per support update.
    num_sweeps: swap sweeps over the support after the forward selection.
    query_chunk_size: solve this many queries at a time (bounds memory at
      `query_chunk_size * n * d_v`); None solves all at once.

  Returns:
    SparseApproximation with output `[..., n_q, d_v]`, indices/coefficients `[..., n_q, r']`.
  """
  _check_r(r)
  _check_problem(value, target, mask)
  if weights is not None and weights.shape[-2:] != target.shape[-2:-1] + value.shape[-2:-1]:
    raise ValueError(f'weights {weights.shape} must end in [n_q, n] = '
                     f'{target.shape[-2:-1] + value.shape[-2:-1]}.')
  n, d_v = value.shape[-2:]
  r = min(r, n)
  batch, flat_value, flat_target, flat_mask = _broadcast_problem(value, target, mask, jnp)
  n_q = flat_target.shape[1]
  flat_weights = None if weights is None else jnp.broadcast_to(
      weights, batch + (n_q, n)).reshape(-1, n)
  solve = functools.partial(_solve_one, r=r, num_starts=min(num_starts, n), num_iters=num_iters,
                            num_sweeps=num_sweeps)
  # One row per query; each finds its batch element's values by index.
  queries = (jnp.repeat(jnp.arange(flat_value.shape[0]), n_q), flat_target.reshape(-1, d_v),
             flat_mask.reshape(-1, n), flat_weights)
  per_query = lambda q: solve(flat_value[q[0]], *q[1:])
  if query_chunk_size is None:
    output, indices, beta = jax.vmap(per_query)(queries)
  else:
    output, indices, beta = jax.lax.map(per_query, queries, batch_size=query_chunk_size)
  shape = batch + (n_q,)
  return SparseApproximation(output.reshape(shape + (d_v,)), indices.reshape(shape + (r,)),
                             beta.reshape(shape + (r,)))


def relative_error(exact: jax.Array, approx: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Relative L2 error `||exact - approx|| / (||exact|| + eps)` over the last axis."""
  return (jnp.linalg.norm(exact - approx, axis=-1) /
          (jnp.linalg.norm(exact, axis=-1) + eps))


def top_r_mass(weights: jax.Array, r: int) -> jax.Array:
  """Skewness of attention weights `[..., n_q, n]`: the mass of the r largest, `[..., n_q]`."""
  _check_r(r)
  return jnp.sum(select.top_k(weights, min(r, weights.shape[-1]))[0], axis=-1)
