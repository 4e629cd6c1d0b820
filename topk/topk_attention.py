"""Top-k attention (Gupta et al., 2021): each query attends only to its k highest-scoring keys.

One pass over query chunks: a chunk's `[C, kv_len]` scores go to `topk.select.top_k`, which
returns the k largest scores with their key indices; the kernel is applied to those kept scores
only (so the normaliser sums over kept keys), dropout to the kept weights, and the kept values
are mixed. No key is gathered and no score recomputed in the forward. Where `topk.fused` applies
(`fused_options.platforms`: NVIDIA GPUs by default, unless `fused=False`), a fused kernel
(`fused_options.variant`), launched per query chunk, yields each query's kept scores and key
indices without writing the chunk's scores, and the rest is the same. A `jax.custom_vjp` keeps
q, k, v, the bias, the kept indices, scores and validity flags (all O(q_len * k) besides the
inputs) and, chunk by chunk, gathers the kept keys/values again and scatter-adds their
gradients, never forming a `[C, kv_len]` array; the selection itself is not differentiated.
The bias gradient is the exact transpose of gathering it at the kept keys.

Masking: masked scores are float32's minimum before selection, so valid keys are kept first and
kept-but-masked entries get zero weight (and zero gradient). A row with no valid key at all gets
uniform weights over its k kept keys under softmax (with k >= kv_len exactly flax's uniform
row), zero weights under the other kernels; never NaN.
"""
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from topk import fused, fused_variant, inputs, select

# `topk_attention`'s argument `fused` (a bool) hides the module there.
from topk.fused import FusedOptions
from topk.fused import check_options as check_fused_options

_DEFAULT_FUSED = FusedOptions()


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """`x [B, H, Lk, ...]`, `idx [B, H, C, k]` -> `[B, H, C, k, ...]`."""
  return jax.vmap(jax.vmap(lambda rows, ids: rows[ids]))(x, idx)


def _scatter_add(acc: jax.Array, idx: jax.Array, updates: jax.Array) -> jax.Array:
  """Adds `updates [B, H, C, k, ...]` into rows `idx [B, H, C, k]` of `acc [B, H, Lk, ...]`."""
  return jax.vmap(jax.vmap(lambda a, ids, u: a.at[ids].add(u)))(acc, idx, updates)


def _gather_bias(bias: jax.Array, idx: jax.Array) -> jax.Array:
  """Bias `[B|1, H|1, Lq_pad|1, Lk|1]` at kept keys `idx [B, H, Lq_pad, k]` -> `[B, H, Lq_pad, k]`.

  A plain gather: its transpose (a scatter-add of the kept entries) is the exact bias gradient.
  """
  b, h, length, _ = idx.shape
  index = (jnp.arange(b)[:, None, None, None] if bias.shape[0] != 1 else 0,
           jnp.arange(h)[None, :, None, None] if bias.shape[1] != 1 else 0,
           jnp.arange(length)[None, None, :, None] if bias.shape[2] != 1 else 0,
           idx if bias.shape[3] != 1 else 0)
  return jnp.broadcast_to(bias[index], idx.shape)


def _mix_rows(weights: jax.Array, idx: jax.Array, value: jax.Array, dtype: Any) -> jax.Array:
  """`sum_j weights[..., j] * value[idx[..., j]]` in float32, the weights first rounded to
  `dtype` (`can.weights_dtype`, as the backward's `_mix`): `weights, idx [B, H, C, k]`,
  `value [B, H, Lk, Dv]` -> `[B, H, C, Dv]`.

  One kept rank at a time: XLA on CPU fuses each rank's row gather into the multiply-add, which
  is several times cheaper than gathering all kept rows and contracting them in a batched dot.
  """
  weights = weights.astype(dtype).astype(jnp.float32)

  def add_rank(j, acc):
    rows = _gather(value, idx[..., j]).astype(jnp.float32)
    return acc + weights[..., j, None] * rows

  zeros = jnp.zeros(idx.shape[:-1] + value.shape[-1:], jnp.float32)
  if idx.shape[-1] == 0:  # no keys (kv_len 0): a sum over nothing, as flax
    return zeros
  return jax.lax.fori_loop(0, idx.shape[-1], add_rank, zeros, unroll=8)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one `topk_attention` call computes besides its arrays, all validated: static and
  hashable, so it is `_attend`'s non-differentiable argument. The inputs' own static facts
  (chunk size, causality, dtypes) travel in the structure of `inputs.Canonical`.

  Attributes:
    k: keys kept per query, `min(k, kv_len)`.
    kernel: kept scores `[..., k]` -> weights (`topk.kernels`).
    dropout: on the kept weights, or None.
    precision: the score and mixing products' precision.
    selection, recall_target, method: the unfused selection (`select.unchecked_top_k`).
    fused: the fused kernel's options where it may run (exact selection only), else None.
    mix_in_kernel: the fused path selects and mixes in the variant's second kernel
      (`FusedOptions.mix_in_kernel`, for the softmax kernel without dropout).
  """
  k: int
  kernel: Callable[[jax.Array], jax.Array]
  dropout: inputs.Dropout | None
  precision: Any
  selection: str
  recall_target: float
  method: str | None
  fused: fused.FusedOptions | None
  mix_in_kernel: bool = False


def _kept_weights(plan: Plan, kept: jax.Array, multiplier: jax.Array | None) -> jax.Array:
  """Kept masked scores `[B, H, C, k]` -> weights `[B, H, C, k]`, dropout applied."""
  weights = plan.kernel(kept)
  return weights if multiplier is None else weights * multiplier


def _multiplier(plan: Plan, rng: jax.Array | None, i: jax.Array,
                shape: tuple[int, ...]) -> jax.Array | None:
  """Chunk `i`'s dropout multiplier, broadcastable to `shape` `[B, H, C, k]`, or None: the
  same per-chunk key in forward and backward, so the backward sees the forward's mask."""
  if plan.dropout is None:
    return None
  return plan.dropout.multiplier(jax.random.fold_in(rng, i), shape)


def _mix(plan: Plan, weights_dtype: Any, kept: jax.Array, v_kept_BxHxCxKxDv: jax.Array,
         multiplier: jax.Array | None) -> jax.Array:
  """`_mix_rows` on gathered values `[B, H, C, k, Dv]` -> `[B, H, C, Dv]`: the backward
  differentiates this form, which needs the gathered values anyway."""
  weights = _kept_weights(plan, kept, multiplier).astype(weights_dtype)
  return jnp.einsum('bhck,bhckd->bhcd', weights, v_kept_BxHxCxKxDv, precision=plan.precision,
                    preferred_element_type=jnp.float32)


def _kept_scores(plan: Plan, q_BxHxCxD: jax.Array, k_kept_BxHxCxKxD: jax.Array) -> jax.Array:
  """The differentiable part of the kept scores `[B, H, C, k]`; bias and masking are added
  around it."""
  return jnp.einsum('bhcd,bhckd->bhck', inputs.scale_query(q_BxHxCxD), k_kept_BxHxCxKxD,
                    precision=plan.precision, preferred_element_type=jnp.float32)


def _select_chunk(plan: Plan, can: inputs.Canonical, i: jax.Array, q_BxHxCxD: jax.Array,
                  splits: int) -> tuple[jax.Array, jax.Array]:
  """The unfused selection of query chunk `i`: `(kept float32, indices int32)` `[B, H, C, k]`,
  the chunk's dense scores formed `splits` sub-chunks at a time (less memory)."""
  sub = dataclasses.replace(can, chunk_size=can.chunk_size // splits)
  q_SxBxHxCsxD = inputs.to_chunks(q_BxHxCxD, sub.chunk_size)

  def select_sub_chunk(args):
    j, q_sub = args
    scores = inputs.chunk_scores(sub, i * splits + j, q_sub, plan.precision)
    return select.unchecked_top_k(scores, plan.k, plan.selection, plan.recall_target,
                                  plan.method)

  kept, idx = jax.lax.map(select_sub_chunk, (jnp.arange(splits), q_SxBxHxCsxD))
  return inputs.from_chunks(kept), inputs.from_chunks(idx)


class _Launch(NamedTuple):
  """How the fused kernels run: on the call's inputs as `fused_variant.prepared` gives them
  (once per call, not per chunk), in Pallas' interpreter where `interpret`."""
  prepared: inputs.Canonical
  interpret: bool


def _forward_chunk(plan: Plan, can: inputs.Canonical, rng: jax.Array | None,
                   launch: _Launch | None, i: jax.Array, q_BxHxCxD: jax.Array
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array | None]]:
  """Query chunk `i`: its output float32 `[B, H, C, Dv]` and what the backward keeps of it,
  `(kept key indices, kept masked scores, kept validity or None)` `[B, H, C, k]`.

  `launch` None: the unfused selection; else one launch of the fused kernel for this chunk's
  queries, whose buffers are the chunk's only temporaries
  of its size, then `lax.top_k` of the buffers and the mix in XLA, or (`plan.mix_in_kernel`)
  the variant's select-and-mix kernel. Rows the kernels leave are rare: they are redone in
  sub-chunks of at most `redo_rows` queries, so that the fused path never holds a whole
  chunk's scores.
  """
  multiplier = _multiplier(plan, rng, i, (*q_BxHxCxD.shape[:3], plan.k))

  def mixed(kept, idx):  # (kept, idx, out [B, H, C, Dv]) in XLA
    weights = _kept_weights(plan, kept, multiplier)
    return kept, idx, _mix_rows(weights, idx, can.value, can.weights_dtype)

  if launch is None:
    kept, idx, out_BxHxCxDv = mixed(*_select_chunk(plan, can, i, q_BxHxCxD, 1))
  else:
    variant = fused.VARIANTS[plan.fused.variant]
    state = variant.candidates(launch.prepared, plan.k, plan.precision, plan.fused.tuning,
                               launch.interpret, q_BxHxCxD, i * can.chunk_size)
    splits = can.chunk_size // math.gcd(can.chunk_size, plan.fused.redo_rows)
    unfused = lambda: _select_chunk(plan, can, i, q_BxHxCxD, splits)
    if plan.mix_in_kernel:
      out_BxHxCxDv, kept, idx, redo = variant.select_and_mix(
          state, can.value, plan.k, can.weights_dtype, interpret=launch.interpret)
      kept, idx, out_BxHxCxDv = fused.merge((kept, idx, out_BxHxCxDv), redo,
                                            lambda: mixed(*unfused()))
    else:
      kept, idx, redo = variant.select(state, plan.k)
      kept, idx, out_BxHxCxDv = mixed(*fused.merge((kept, idx), redo, unfused))
  valid = inputs.chunk_validity(can, i)
  if valid is not None:
    shape = idx.shape[:3] + can.key.shape[2:3]
    valid = jnp.take_along_axis(jnp.broadcast_to(valid, shape), idx, axis=-1)
  return out_BxHxCxDv, (idx, kept, valid)


def _forward(plan: Plan, can: inputs.Canonical, rng: jax.Array | None
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array | None]]:
  """All query chunks: float32 `[B, H, Lq_pad, Dv]`, and per chunk `[N, B, H, C, k]` the
  `_forward_chunk` residuals. The fused kernel selects on the platforms `fused.platforms`
  chooses, the unfused path elsewhere."""
  def chunks(launch):
    xs = (jnp.arange(can.num_chunks), inputs.to_chunks(can.query, can.chunk_size))
    out, kept = jax.lax.map(lambda a: _forward_chunk(plan, can, rng, launch, *a), xs)
    return inputs.from_chunks(out), kept

  platforms = () if plan.fused is None else fused.platforms(can, plan.k, plan.precision,
                                                            plan.fused)
  if not platforms:
    return chunks(None)
  with_kernel = {platform: lambda _, interpret=platform not in fused.GPU_PLATFORMS: chunks(
      _Launch(fused_variant.prepared(can), interpret)) for platform in platforms}
  return jax.lax.platform_dependent(can.query, default=lambda _: chunks(None), **with_kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan: Plan, can: inputs.Canonical, rng: jax.Array | None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k attention of the canonical inputs: `(out float32 [B, H, Lq_pad, Dv], kept key
  indices int32 [B, H, Lq_pad, k], kept masked scores float32 [B, H, Lq_pad, k])`; the latter
  two carry no gradient (their cotangents are ignored)."""
  return _attend_fwd(plan, can, rng)[0]


def _attend_fwd(plan: Plan, can: inputs.Canonical, rng: jax.Array | None):
  out, (idx, kept, valid) = _forward(plan, can, rng)
  return (out, inputs.from_chunks(idx), inputs.from_chunks(kept)), (can, idx, kept, valid, rng)


def _backward_chunk(plan: Plan, can: inputs.Canonical, rng: jax.Array | None,
                    carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]):
  """Query chunk `i`'s gradients: its kept keys and values gathered again, their gradients
  scatter-added into `carry` `(dk [B, H, Lk, D], dv [B, H, Lk, Dv])` float32; returns that
  and `(dq [B, H, C, D], d_scores [B, H, C, k] or None without a bias)`."""
  dk, dv = carry
  i, q_BxHxCxD, idx, kept, valid, d_out_BxHxCxDv = xs
  k_kept, v_kept = _gather(can.key, idx), _gather(can.value, idx)
  multiplier = _multiplier(plan, rng, i, idx.shape)
  _, mix_vjp = jax.vjp(lambda s, vk: _mix(plan, can.weights_dtype, s, vk, multiplier),
                       kept, v_kept)
  d_scores, dv_kept = mix_vjp(d_out_BxHxCxDv)
  if valid is not None:
    d_scores = jnp.where(valid, d_scores, 0.0)
  _, score_vjp = jax.vjp(functools.partial(_kept_scores, plan), q_BxHxCxD, k_kept)
  dq_BxHxCxD, dk_kept = score_vjp(d_scores)
  dk = _scatter_add(dk, idx, dk_kept.astype(jnp.float32))
  dv = _scatter_add(dv, idx, dv_kept.astype(jnp.float32))
  return (dk, dv), (dq_BxHxCxD, None if can.bias is None else d_scores)


def _attend_bwd(plan: Plan, residuals, d_outputs):
  # idx, kept, valid: per chunk `[N, B, H, C, k]`.
  can, idx, kept, valid, rng = residuals
  d_out = d_outputs[0]
  zeros = (jnp.zeros(can.key.shape, jnp.float32), jnp.zeros(can.value.shape, jnp.float32))
  xs = (jnp.arange(can.num_chunks), inputs.to_chunks(can.query, can.chunk_size), idx, kept,
        valid, inputs.to_chunks(d_out, can.chunk_size))
  (dk, dv), (dq, d_scores) = jax.lax.scan(
      lambda carry, x: _backward_chunk(plan, can, rng, carry, x), zeros, xs)
  dbias = None
  if can.bias is not None:
    _, bias_vjp = jax.vjp(lambda b: _gather_bias(b, inputs.from_chunks(idx)), can.bias)
    dbias, = bias_vjp(inputs.from_chunks(d_scores))
  d_can = dataclasses.replace(
      can, query=inputs.from_chunks(dq).astype(can.query.dtype), key=dk.astype(can.key.dtype),
      value=dv.astype(can.value.dtype), bias=dbias, mask=None, key_padding_mask=None,
      query_padding_mask=None)
  return d_can, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def topk_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                   bias: jax.Array | None = None, mask: jax.Array | None = None,
                   broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None,
                   dropout_rate: float = 0.0, deterministic: bool = False, dtype: Any = None,
                   precision: Any = None, module: Any = None,
                   force_fp32_for_softmax: bool = False, *, k: int,
                   query_chunk_size: int = 1024, is_causal: bool = False,
                   key_padding_mask: jax.Array | None = None,
                   query_padding_mask: jax.Array | None = None,
                   kernel: str = 'softmax', selection: str = 'exact',
                   recall_target: float = 0.95, method: str | None = None, fused: bool = True,
                   fused_options: FusedOptions = _DEFAULT_FUSED
                   ) -> jax.Array:
  """Top-k attention; with k >= kv_len it equals `topk.dot_product_attention` (gradients too).

  Dropout acts on the kept weights `[C, k]` of each chunk, drawn from
  `fold_in(dropout_rng, chunk_index)` (with broadcast_dropout one mask per (query, rank) shared
  by batch entries and heads). Gradients flow to query, key, value and bias.

  Args:
    query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
      dtype, precision: as in `topk.dot_product_attention`.
    module: if given (flax's sow_weights=True), sows into its 'intermediates' collection the
      kept weights as 'attention_weights' (before dropout; computation dtype, or float32 with
      force_fp32_for_softmax) and their key indices as 'attention_indices' (int32), both
      `[batch..., heads, q_len, min(k, kv_len)]`, instead of dense `[..., q_len, kv_len]`
      weights. They carry no gradient.
    force_fp32_for_softmax: as in `topk.dot_product_attention` (for the kept weights).
    k: keys kept per query (an int >= 1; values above kv_len keep all keys).
    query_chunk_size, is_causal, key_padding_mask, query_padding_mask, kernel: as in
      `topk.chunked_attention`.
    selection: a key of `topk.select.SELECTIONS`: 'exact', or 'approximate'
      (`jax.lax.approx_max_k`: fast on TPU, trades exactness for speed; exact on CPU and GPU).
    recall_target: expected fraction of the true top k that 'approximate' finds, in (0, 1].
    method: the exact selection's method (`topk.select.top_k`'s): a key of
      `topk.select.METHODS` on every platform, or None for `topk.select.DEFAULT_METHODS`' choice
      per platform.
    fused: select with the fused score-and-select kernel (`topk.fused`) where it applies: on
      `fused_options.platforms` (NVIDIA GPUs by default), for an exact selection and inputs it
      takes. False: the unfused path everywhere (to compare the two, or where the kernel does
      not compile).
    fused_options: which fused kernel, where and how (`topk.fused.FusedOptions`).

  Returns:
    `[batch..., q_len, heads, d_v]` in the computation dtype.
  """
  k = inputs.check_positive_int(k, 'k')
  select.check_selection(selection, recall_target, method)
  inputs.check_bool(fused, 'fused')
  check_fused_options(fused_options)
  can, kernel_fn, dropout = inputs.prepare(
      query, key, value, bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
      dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
      dtype=dtype, kernel=kernel, query_chunk_size=query_chunk_size, is_causal=is_causal,
      key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
      force_fp32_for_softmax=force_fp32_for_softmax)
  k = min(k, can.key.shape[2])
  # The kernel selects exactly; an approximate selection stays on the unfused path.
  fused_options = fused_options if fused and selection == 'exact' else None
  plan = Plan(k=k, kernel=kernel_fn, dropout=dropout, precision=precision, selection=selection,
              recall_target=recall_target, method=method, fused=fused_options,
              mix_in_kernel=(fused_options is not None and fused_options.mix_in_kernel
                             and kernel == 'softmax' and dropout is None))
  out, idx, kept = _attend(plan, can, None if dropout is None else dropout_rng)
  if module is not None:
    def per_query(x):  # [B, H, Lq_pad, k] -> [batch..., H, q_len, k]
      x = jax.lax.stop_gradient(x)[:, :, :can.q_len]
      return x.reshape(can.batch_shape + x.shape[1:2] + (can.q_len, k))

    module.sow('intermediates', 'attention_weights',
               per_query(kernel_fn(kept)).astype(can.weights_dtype))
    module.sow('intermediates', 'attention_indices', per_query(idx))
  return inputs.to_output(can, out)
