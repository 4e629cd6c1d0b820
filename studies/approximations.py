"""r-sparse approximations of captured attention outputs (`studies.solvers`): each layer's output
under each method, their errors on sampled queries, and `replace` functions that swap them into
a model (`studies.capture.apply_replaced`).
"""
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from studies import solvers
from studies.capture import LayerCall, Run, capture_attention

# Approximations compared; 'exact' recomputes full kernel attention (a check of the capture).
METHODS = ('exact', 'oblivious', 'oblivious_raw', 'value_aware')


def _attending(weights: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Queries `[..., L]` with an unmasked key and non-zero kernel mass.

  The others are padding (every key masked) or, under relu-type kernels, rows with no positive
  score, whose output is the empty sum 0: outside the hull of the values, so no convex
  combination approximates it and its relative error is undefined.
  """
  attends = jnp.sum(weights, axis=-1) > 0
  return attends if mask is None else attends & jnp.any(mask, axis=-1)


def approximate(call: LayerCall, kernel: str, method: str, r: int,
                solver: Mapping[str, Any] | None = None) -> jax.Array:
  """Attention output `[B, H, L, d_v]` of `call` under `method` with budget r; `solver` holds
  keyword options of `solvers.value_aware_greedy` (query_chunk_size, num_starts, num_iters,
  num_sweeps; default its defaults, all queries at once).

  Queries that attend to nothing keep the exact output (see `_attending`).
  """
  weights = solvers.attention_weights(call.query, call.key, call.mask, kernel)
  exact = jnp.einsum('...qk,...kv->...qv', weights, call.value)
  if method == 'exact':
    return exact
  if method in ('oblivious', 'oblivious_raw'):
    approx = solvers.top_r_approximation(weights, call.value, r,
                                             renormalise=method == 'oblivious').output
  elif method == 'value_aware':
    approx = solvers.value_aware_greedy(call.value, exact, r, call.mask, weights=weights,
                                        **(solver or {})).output
  else:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}.')
  return jnp.where(_attending(weights, call.mask)[..., None], approx, exact)


def layer_errors(call: LayerCall, kernel: str, rs: list[int], max_queries: int,
                 seed: int = 0, solver: Mapping[str, Any] | None = None
                 ) -> list[dict[str, Any]]:
  """Mean relative output error and top-r mass of `call`, per r and method (`solver` as in
  `approximate`).

  Uses at most `max_queries` randomly chosen attending (query, head) pairs (`_attending`).

  Returns:
    Rows {'layer', 'r', 'method', 'rel_error', 'top_r_mass', 'queries'}.
  """
  batch, heads, length, _ = call.query.shape
  n = call.key.shape[-2]
  mask = (jnp.ones((batch, heads, length, n), bool) if call.mask is None else
          jnp.broadcast_to(call.mask, (batch, heads, length, n)))
  all_weights = solvers.attention_weights(call.query, call.key, mask, kernel)
  rows = np.flatnonzero(np.asarray(_attending(all_weights, mask)).reshape(-1))
  rows = np.random.default_rng(seed).permutation(rows)[:max_queries]
  b, h, q = np.unravel_index(rows, (batch, heads, length))
  # One problem per sampled query: value [m, n, d_v], mask and weights [m, 1, n].
  value = call.value[b, h]
  sub_mask = mask[b, h, q][:, None]
  weights = all_weights[b, h, q][:, None]
  exact = jnp.einsum('...qk,...kv->...qv', weights, value)
  results = []
  for r in rs:
    approxes = {
        'oblivious': solvers.top_r_approximation(weights, value, r).output,
        'oblivious_raw': solvers.top_r_approximation(weights, value, r,
                                                         renormalise=False).output,
        'value_aware': solvers.value_aware_greedy(
            value, exact, r, sub_mask, weights=weights, **(solver or {})).output,
    }
    mass = float(jnp.mean(solvers.top_r_mass(weights, r)))
    for method, approx in approxes.items():
      error = solvers.relative_error(exact, approx)
      results.append({'layer': call.layer, 'r': r, 'method': method,
                      'rel_error': float(jnp.mean(error)), 'top_r_mass': mass,
                      'queries': len(rows)})
  return results


def replacement(kernel: str, method: str, r: int, layer: str,
                solver: Mapping[str, Any] | None = None):
  """A `replace` for `studies.capture.apply_replaced`: swaps in `method`'s output for `layer`
  ('all' = every layer); `solver` as in `approximate`."""

  def replace(call: LayerCall, x: jax.Array) -> jax.Array:
    if layer not in ('all', call.layer):
      return x
    return jnp.swapaxes(approximate(call, kernel, method, r, solver), -3, -2)

  return replace


def error_rows(run: Run, rs: list[int], max_queries: int,
               solver: Mapping[str, Any] | None = None) -> tuple[list[dict], list[str]]:
  """`layer_errors` of every layer of `run` averaged over its batches (weighted by queries), and
  the attention layers' names in call order."""
  sums: dict[tuple, list[dict]] = {}
  layers: list[str] = []
  for batch in run.batches():
    inputs = {name: value for name, value in batch.items() if name != 'targets'}
    for call in capture_attention(run.model, run.params, inputs):
      layers += [call.layer] if call.layer not in layers else []
      for row in layer_errors(call, run.kernel, rs, max_queries, solver=solver):
        sums.setdefault((row['layer'], row['r'], row['method']), []).append(row)
  errors = []
  for (layer, r, method), rows in sums.items():
    weights = np.array([row['queries'] for row in rows], float)
    errors.append({'run': run.name, 'kernel': run.kernel, 'layer': layer, 'r': r,
                   'method': method, 'queries': int(weights.sum()), **{
                       name: float(np.average([row[name] for row in rows], weights=weights))
                       for name in ('rel_error', 'top_r_mass')}})
  return errors, layers
