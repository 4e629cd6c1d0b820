"""Top-k attention (Gupta et al., 2021): each query attends only to its k highest-scoring keys.

One pass over query chunks: a chunk's `[C, kv_len]` scores go to `topk.select.top_k`, which
returns the k largest scores with their key indices; the kernel is applied to those kept scores
only (so the normaliser sums over kept keys), dropout to the kept weights, and the kept values
are mixed. No key is gathered and no score recomputed in the forward. Where `topk.fused` applies
(GPU by default, unless `fused=False`), a fused kernel yields each query's kept scores and key
indices without writing the chunk's scores, and the rest is the same. A `jax.custom_vjp` keeps
q, k, v, the bias, the kept indices, scores and validity flags (all O(q_len * k) besides the
inputs) and, chunk by chunk, gathers the kept keys/values again and
scatter-adds their gradients, never forming a `[C, kv_len]` array; the selection itself is not
differentiated. The bias gradient is the exact transpose of gathering it at the kept keys.

Masking: masked scores are float32's minimum before selection, so valid keys are kept first and
kept-but-masked entries get zero weight (and zero gradient). A row with no valid key at all gets
uniform weights over its k kept keys under softmax (with k >= kv_len exactly flax's uniform
row), zero weights under the other kernels; never NaN.
"""
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from topk import fused, inputs, select


def check_options(selection: str, recall_target: float, fused: bool) -> None:
  """Raises ValueError unless `selection` is a key of `select.SELECTIONS`,
  0 < recall_target <= 1 (checked for every selection: a bad value is bad) and `fused` a bool."""
  inputs.check_bool(fused, 'fused')
  if selection not in select.SELECTIONS:
    raise ValueError(f'Unknown selection {selection!r}; valid selections: '
                     f'{sorted(select.SELECTIONS)}.')
  if (isinstance(recall_target, bool) or not isinstance(recall_target, (int, float))
      or not 0 < recall_target <= 1):
    raise ValueError(f'recall_target must be a number in (0, 1], got {recall_target!r}.')


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
  `dtype` (`can.weights_dtype`, as the backward's `mix`): `weights, idx [B, H, C, k]`,
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


def _attend(can: inputs.Canonical, k: int, kernel: Callable[[jax.Array], jax.Array],
            dropout: inputs.Dropout | None, precision: Any, selection: str,
            recall_target: float, use_fused: bool, with_kept: bool
            ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k attention of the canonical inputs; returns float32 `[B, H, Lq_pad, Dv]`.

  With `with_kept` it returns `(out, kept key indices, kept masked scores)`, the latter two
  int32 and float32 `[B, H, Lq_pad, k]` without gradient (their cotangents are ignored).
  """
  chunk = can.chunk

  def kept_weights(kept, multiplier):
    # kept [B,H,C,k] masked scores -> weights [B,H,C,k], dropout applied.
    weights = kernel(kept)
    return weights if multiplier is None else weights * multiplier

  def mix(kept, v_kept, multiplier):
    # As `_mix_rows` on gathered values v_kept [B,H,C,k,Dv]; the backward needs them anyway.
    return jnp.einsum('bhck,bhckd->bhcd',
                      kept_weights(kept, multiplier).astype(can.weights_dtype), v_kept,
                      precision=precision, preferred_element_type=jnp.float32)

  def kept_scores(q_chunk, k_kept):
    # The differentiable part of a kept score; bias and masking are added around it.
    return jnp.einsum('bhcd,bhckd->bhck', inputs.scale_query(q_chunk), k_kept,
                      precision=precision, preferred_element_type=jnp.float32)

  def multiplier(rng, i, shape):
    # Same per-chunk key in forward and backward, so the backward sees the forward's mask.
    return None if dropout is None else dropout.multiplier(jax.random.fold_in(rng, i), shape)

  def chunked(x):
    return None if x is None else inputs.to_chunks(x, chunk)

  def forward(q, key, v, bias, masks, rng):
    # Masks travel as arguments (not closed over) so the custom_vjp sees every array it uses.
    mask, key_padding_mask, query_padding_mask = masks
    c = dataclasses.replace(can, query=q, key=key, value=v, bias=bias, mask=mask,
                            key_padding_mask=key_padding_mask,
                            query_padding_mask=query_padding_mask)

    def selected(i, q_chunk, parts):
      # `select.top_k` of chunk i's scores, `parts` sub-chunks at a time (less memory).
      sub = dataclasses.replace(c, chunk=c.chunk // parts)
      split = inputs.to_chunks(q_chunk, sub.chunk)
      kept, idx = jax.lax.map(lambda a: select.top_k(
          inputs.chunk_scores(sub, i * parts + a[0], a[1], key, bias, precision), k,
          selection=selection, recall_target=recall_target), (jnp.arange(parts), split))
      return inputs.from_chunks(kept), inputs.from_chunks(idx)

    def one_chunk(args, candidates):
      # candidates: the kernel's `fused.Candidates` of every query, or None (unfused path).
      # Selecting from this chunk's rows (sliced here, not as a transposed copy for lax.map)
      # keeps the selection's temporaries per chunk. Rows the kernel leaves are rare: they are
      # redone in sub-chunks of at most REDO_ROWS queries, so that the fused path never holds a
      # whole chunk's scores.
      i, q_chunk = args
      if candidates is None:
        kept, idx = selected(i, q_chunk, 1)
      else:
        rows = jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, i * c.chunk, c.chunk, axis=2), candidates)
        parts = c.chunk // math.gcd(c.chunk, fused.REDO_ROWS)
        kept, idx = fused.merge(fused.select(rows, k), lambda: selected(i, q_chunk, parts))
      valid = inputs.chunk_validity(c, i)
      if valid is not None:
        shape = idx.shape[:3] + key.shape[2:3]
        valid = jnp.take_along_axis(jnp.broadcast_to(valid, shape), idx, axis=-1)
      weights = kept_weights(kept, multiplier(rng, i, idx.shape))
      out = _mix_rows(weights, idx, v, can.weights_dtype)
      return out, (idx, kept, valid)

    def run(candidates):
      xs = (jnp.arange(can.num_chunks), chunked(q))
      out, kept = jax.lax.map(lambda a: one_chunk(a, candidates), xs)
      return inputs.from_chunks(out), kept

    # The kernel selects exactly; an approximate selection stays on the unfused path.
    platforms = (fused.platforms(c, k, precision, fused.OPTIONS)
                 if use_fused and selection == 'exact' else ())
    if not platforms:
      return run(None)
    kernel_on = {platform: lambda _, p=platform: run(fused.candidates(
        c, k, precision, interpret=p not in fused.GPU_PLATFORMS, **fused.OPTIONS))
                 for platform in platforms}
    return jax.lax.platform_dependent(q, default=lambda _: run(None), **kernel_on)

  def outputs(out, idx, kept):
    # idx, kept: per chunk `[N, B, H, C, k]`, as the backward reads them.
    return (out, inputs.from_chunks(idx), inputs.from_chunks(kept)) if with_kept else out

  @jax.custom_vjp
  def attend(q, key, v, bias, masks, rng):
    out, (idx, kept, _) = forward(q, key, v, bias, masks, rng)
    return outputs(out, idx, kept)

  def attend_fwd(q, key, v, bias, masks, rng):
    out, (idx, kept, valid) = forward(q, key, v, bias, masks, rng)
    return outputs(out, idx, kept), (q, key, v, bias, idx, kept, valid, rng)

  def attend_bwd(residuals, d_outputs):
    # idx, kept, valid: per chunk `[N, B, H, C, k]`.
    q, key, v, bias, idx, kept, valid, rng = residuals
    d_out = d_outputs[0] if with_kept else d_outputs

    def one_chunk(carry, args):
      dk, dv = carry
      i, q_chunk, idx_chunk, kept_chunk, valid_chunk, d_out_chunk = args
      k_kept, v_kept = _gather(key, idx_chunk), _gather(v, idx_chunk)
      mult = multiplier(rng, i, idx_chunk.shape)
      _, mix_vjp = jax.vjp(lambda s, vk: mix(s, vk, mult), kept_chunk, v_kept)
      d_scores, dv_kept = mix_vjp(d_out_chunk)
      if valid_chunk is not None:
        d_scores = jnp.where(valid_chunk, d_scores, 0.0)
      _, score_vjp = jax.vjp(kept_scores, q_chunk, k_kept)
      dq_chunk, dk_kept = score_vjp(d_scores)
      dk = _scatter_add(dk, idx_chunk, dk_kept.astype(jnp.float32))
      dv = _scatter_add(dv, idx_chunk, dv_kept.astype(jnp.float32))
      return (dk, dv), (dq_chunk, None if bias is None else d_scores)

    zeros = (jnp.zeros(key.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    xs = (jnp.arange(can.num_chunks), chunked(q), idx, kept, valid, chunked(d_out))
    (dk, dv), (dq, d_scores) = jax.lax.scan(one_chunk, zeros, xs)
    dbias = None
    if bias is not None:
      _, bias_vjp = jax.vjp(lambda b: _gather_bias(b, inputs.from_chunks(idx)), bias)
      dbias, = bias_vjp(inputs.from_chunks(d_scores))
    return (inputs.from_chunks(dq).astype(q.dtype), dk.astype(key.dtype), dv.astype(v.dtype),
            dbias, None, None)

  attend.defvjp(attend_fwd, attend_bwd)
  result = attend(can.query, can.key, can.value, can.bias,
                  (can.mask, can.key_padding_mask, can.query_padding_mask),
                  None if dropout is None else dropout.rng)
  if not with_kept:
    return result
  out, idx, kept = result
  return out, jax.lax.stop_gradient(idx), jax.lax.stop_gradient(kept)


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
                   recall_target: float = 0.95, fused: bool = True) -> jax.Array:
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
    fused: select with the fused score-and-select kernel (`topk.fused`) where it applies: on
      the platforms in `topk.fused.PLATFORMS` (NVIDIA GPUs), for an exact selection and inputs
      it takes. False: the unfused path everywhere (to compare the two, or where the kernel
      does not compile).

  Returns:
    `[batch..., q_len, heads, d_v]` in the computation dtype.
  """
  k = inputs.check_positive_int(k, 'k')
  check_options(selection, recall_target, fused)
  can, kernel_fn, dropout = inputs.prepare(
      query, key, value, bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
      dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
      dtype=dtype, kernel=kernel, query_chunk_size=query_chunk_size, is_causal=is_causal,
      key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
      force_fp32_for_softmax=force_fp32_for_softmax)
  k = min(k, can.key.shape[2])
  attend = functools.partial(_attend, can, k, kernel_fn, dropout, precision, selection,
                             recall_target, fused)
  if module is None:
    return inputs.to_output(can, attend(False))
  out, idx, kept = attend(True)

  def per_query(x):  # [B, H, Lq_pad, k] -> [batch..., H, q_len, k]
    return x[:, :, :can.q_len].reshape(can.batch_shape + x.shape[1:2] + (can.q_len, k))

  module.sow('intermediates', 'attention_weights',
             per_query(kernel_fn(kept)).astype(can.weights_dtype))
  module.sow('intermediates', 'attention_indices', per_query(idx))
  return inputs.to_output(can, out)
