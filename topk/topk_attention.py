"""Top-k attention (Gupta et al., 2021): each query attends only to its k highest-scoring keys.

Two passes over query chunks. The selection pass computes a chunk's `[C, kv_len]` scores, keeps
the indices of the k largest (`topk.select.top_k`) and whether each kept key is valid; it is not
differentiated. The attend pass gathers the kept keys and values, recomputes the k kept scores,
applies the kernel to them only (so the normaliser sums over kept keys), applies dropout to the
kept weights and mixes the kept values. Its `jax.custom_vjp` keeps only q, k, v, the indices,
the validity flags and the gathered bias (all O(q_len * k)) and, chunk by chunk, gathers the
kept keys/values again and scatter-adds their gradients, never forming a `[C, kv_len]` array.

Masking: masked scores are float32's minimum before selection, so valid keys are kept first;
kept-but-masked entries are masked again explicitly and get zero weight. A row with no valid key
at all gets uniform weights over its k kept keys under softmax (with k >= kv_len exactly flax's
uniform row), zero weights under the other kernels; never NaN.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from topk import inputs, kernels, select


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """`x [B, H, Lk, ...]`, `idx [B, H, C, k]` -> `[B, H, C, k, ...]`."""
  return jax.vmap(jax.vmap(lambda rows, ids: rows[ids]))(x, idx)


def _scatter_add(acc: jax.Array, idx: jax.Array, updates: jax.Array) -> jax.Array:
  """Adds `updates [B, H, C, k, ...]` into rows `idx [B, H, C, k]` of `acc [B, H, Lk, ...]`."""
  return jax.vmap(jax.vmap(lambda a, ids, u: a.at[ids].add(u)))(acc, idx, updates)


def _gather_bias(bias: jax.Array, idx: jax.Array) -> jax.Array:
  """Bias `[B|1, H|1, Lq_pad|1, Lk|1]` at kept keys `idx [B, H, Lq_pad, k]` -> `[B, H, Lq_pad, k]`.

  A plain (differentiable) gather, so bias gradients are exact scatter-adds of the kept entries.
  """
  b, h, length, _ = idx.shape
  index = (jnp.arange(b)[:, None, None, None] if bias.shape[0] != 1 else 0,
           jnp.arange(h)[None, :, None, None] if bias.shape[1] != 1 else 0,
           jnp.arange(length)[None, None, :, None] if bias.shape[2] != 1 else 0,
           idx if bias.shape[3] != 1 else 0)
  return jnp.broadcast_to(bias[index], idx.shape)


def _select(can: inputs.Canonical, k: int, precision: Any) -> tuple[jax.Array, jax.Array | None]:
  """Returns the kept key indices int32 `[B, H, Lq_pad, k]` and their validity (bool, same shape;
  None when nothing is masked)."""
  key = jax.lax.stop_gradient(can.key)
  bias = None if can.bias is None else jax.lax.stop_gradient(can.bias)

  def one_chunk(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    i, q_chunk = args
    scores = inputs.chunk_scores(can, i, q_chunk, key, bias, precision)
    _, idx = select.top_k(scores, k)
    valid = inputs.chunk_validity(can, i)
    if valid is not None:
      valid = jnp.take_along_axis(jnp.broadcast_to(valid, scores.shape), idx, axis=-1)
    return idx, valid

  chunks = inputs.to_chunks(jax.lax.stop_gradient(can.query), can.chunk)
  idx, valid = jax.lax.map(one_chunk, (jnp.arange(can.num_chunks), chunks))
  return inputs.from_chunks(idx), None if valid is None else inputs.from_chunks(valid)


def _attend_kept(can: inputs.Canonical, idx: jax.Array, valid: jax.Array | None,
                 bias_kept: jax.Array | None, kernel: Callable[[jax.Array], jax.Array],
                 dropout: inputs.Dropout | None, precision: Any) -> jax.Array:
  """Attention over the kept keys only; returns float32 `[B, H, Lq_pad, Dv]`."""
  chunk = can.chunk

  def kept_out(q_chunk, k_kept, v_kept, bias_chunk, valid_chunk, multiplier):
    # q_chunk [B,H,C,D], k_kept [B,H,C,k,D], v_kept [B,H,C,k,Dv], others [B,H,C,k].
    scores = jnp.einsum('bhcd,bhckd->bhck', inputs.scale_query(q_chunk), k_kept,
                        precision=precision, preferred_element_type=jnp.float32)
    if bias_chunk is not None:
      scores = scores + bias_chunk
    if valid_chunk is not None:
      scores = jnp.where(valid_chunk, scores, inputs.NEG)
    weights = kernel(scores)
    if multiplier is not None:
      weights = weights * multiplier
    return jnp.einsum('bhck,bhckd->bhcd', weights.astype(can.dtype), v_kept, precision=precision,
                      preferred_element_type=jnp.float32)

  def multiplier(rng, i, shape):
    # Same per-chunk key in forward and backward, so the backward sees the forward's mask.
    return None if dropout is None else dropout.multiplier(jax.random.fold_in(rng, i), shape)

  def chunked(x):
    return None if x is None else inputs.to_chunks(x, chunk)

  def forward(q, k, v, bias_kept, idx, valid, rng):
    def one_chunk(args):
      i, q_chunk, idx_chunk, bias_chunk, valid_chunk = args
      return kept_out(q_chunk, _gather(k, idx_chunk), _gather(v, idx_chunk), bias_chunk,
                      valid_chunk, multiplier(rng, i, idx_chunk.shape))

    xs = (jnp.arange(can.num_chunks), chunked(q), chunked(idx), chunked(bias_kept),
          chunked(valid))
    return inputs.from_chunks(jax.lax.map(one_chunk, xs))

  @jax.custom_vjp
  def attend(q, k, v, bias_kept, idx, valid, rng):
    return forward(q, k, v, bias_kept, idx, valid, rng)

  def attend_fwd(q, k, v, bias_kept, idx, valid, rng):
    return forward(q, k, v, bias_kept, idx, valid, rng), (q, k, v, bias_kept, idx, valid, rng)

  def attend_bwd(residuals, d_out):
    q, k, v, bias_kept, idx, valid, rng = residuals

    def one_chunk(carry, args):
      dk, dv = carry
      i, q_chunk, idx_chunk, bias_chunk, valid_chunk, d_out_chunk = args
      mult = multiplier(rng, i, idx_chunk.shape)
      _, vjp = jax.vjp(lambda qc, kk, vk, bc: kept_out(qc, kk, vk, bc, valid_chunk, mult),
                       q_chunk, _gather(k, idx_chunk), _gather(v, idx_chunk), bias_chunk)
      dq_chunk, dk_kept, dv_kept, dbias_chunk = vjp(d_out_chunk)
      dk = _scatter_add(dk, idx_chunk, dk_kept.astype(jnp.float32))
      dv = _scatter_add(dv, idx_chunk, dv_kept.astype(jnp.float32))
      return (dk, dv), (dq_chunk, dbias_chunk)

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    xs = (jnp.arange(can.num_chunks), chunked(q), chunked(idx), chunked(bias_kept),
          chunked(valid), chunked(d_out))
    (dk, dv), (dq, dbias) = jax.lax.scan(one_chunk, zeros, xs)
    dbias = None if dbias is None else inputs.from_chunks(dbias)
    return (inputs.from_chunks(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dbias, None, None, None)

  attend.defvjp(attend_fwd, attend_bwd)
  return attend(can.query, can.key, can.value, bias_kept, idx, valid,
                None if dropout is None else dropout.rng)


def topk_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                   bias: jax.Array | None = None, mask: jax.Array | None = None,
                   broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None,
                   dropout_rate: float = 0.0, deterministic: bool = False, dtype: Any = None,
                   precision: Any = None, module: Any = None, *, k: int,
                   query_chunk_size: int = 1024, is_causal: bool = False,
                   key_padding_mask: jax.Array | None = None,
                   query_padding_mask: jax.Array | None = None,
                   kernel: str = 'softmax') -> jax.Array:
  """Top-k attention; with k >= kv_len it equals `topk.dot_product_attention` (gradients too).

  Dropout acts on the kept weights `[C, k]` of each chunk, drawn from
  `fold_in(dropout_rng, chunk_index)` (with broadcast_dropout one mask per (query, rank) shared
  by batch entries and heads). Gradients flow to query, key, value and bias. `module` is accepted
  for flax's `attention_fn` contract but weights are not sown.

  Args:
    query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
      dtype, precision, module: as in `topk.dot_product_attention`.
    k: keys kept per query (an int >= 1; values above kv_len keep all keys).
    query_chunk_size, is_causal, key_padding_mask, query_padding_mask, kernel: as in
      `topk.chunked_attention`.

  Returns:
    `[batch..., q_len, heads, d_v]` in the computation dtype.
  """
  del module
  k = inputs.check_positive_int(k, 'k')
  kernel_fn = kernels.get_kernel(kernel)
  dropout = inputs.make_dropout(dropout_rng, dropout_rate, deterministic, broadcast_dropout)
  can = inputs.canonicalize(query, key, value, bias=bias, mask=mask, dtype=dtype,
                            query_chunk_size=query_chunk_size, is_causal=is_causal,
                            key_padding_mask=key_padding_mask,
                            query_padding_mask=query_padding_mask)
  idx, valid = _select(can, min(k, can.key.shape[2]), precision)
  bias_kept = None if can.bias is None else _gather_bias(can.bias, idx)
  out = _attend_kept(can, idx, valid, bias_kept, kernel_fn, dropout, precision)
  return inputs.to_output(can, out)
