"""Dense (vanilla) attention: every query against every key, the reference all forms must match."""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from topk import inputs


def attend_block(can: inputs.Canonical, i: jax.Array, q_chunk: jax.Array,
                 kernel: Callable[[jax.Array], jax.Array], dropout: inputs.Dropout | None,
                 dropout_rng: jax.Array | None, precision: Any) -> jax.Array:
  """Attends query chunk `i` (`[B, H, C, D]`) to all keys; returns float32 `[B, H, C, Dv]`.

  The weights `[B, H, C, Lk]` are mixed in `can.weights_dtype`: float32 weights promote the
  values to float32, as in flax.
  """
  weights = kernel(inputs.chunk_scores(can, i, q_chunk, precision))
  if dropout is not None:
    weights = weights * dropout.multiplier(dropout_rng, weights.shape)
  return jnp.einsum('bhqk,bhkd->bhqd', weights.astype(can.weights_dtype), can.value,
                    precision=precision, preferred_element_type=jnp.float32)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          bias: jax.Array | None = None, mask: jax.Array | None = None,
                          broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None,
                          dropout_rate: float = 0.0, deterministic: bool = False,
                          dtype: Any = None, precision: Any = None, module: Any = None,
                          force_fp32_for_softmax: bool = False, *, is_causal: bool = False,
                          key_padding_mask: jax.Array | None = None,
                          query_padding_mask: jax.Array | None = None,
                          kernel: str = 'softmax') -> jax.Array:
  """Dense attention with flax.linen.dot_product_attention's semantics.

  For float32 inputs and kernel='softmax' this computes what flax computes, in the same order
  (scaled query, scores + bias, masked entries at float32's minimum, softmax, flax's dropout
  mask), so a fully masked row gets uniform weights. Scores and kernel are float32 for every
  input dtype (flax keeps bfloat16 scores in bfloat16).

  Args:
    query: `[batch..., q_len, heads, d]`.
    key: `[batch..., kv_len, heads, d]`.
    value: `[batch..., kv_len, heads, d_v]`.
    bias: optional, broadcastable to `[batch..., heads, q_len, kv_len]`.
    mask: optional bool or 0/1, broadcastable like bias; False/0 = masked out.
    broadcast_dropout: share one dropout mask over batch dims and heads.
    dropout_rng: PRNG key for dropout.
    dropout_rate: attention-weight dropout rate.
    deterministic: disables dropout.
    dtype: computation/output dtype, real floating point (default: the promoted input dtype,
      integer and bool inputs promoted to float32 as in flax; complex inputs are rejected).
    precision: einsum precision.
    module: if given, the weights `[batch..., heads, q_len, kv_len]` are sown into its
      'intermediates' collection as 'attention_weights' (flax's sow_weights), in the
      computation dtype, or float32 with force_fp32_for_softmax.
    force_fp32_for_softmax: flax's mixed-precision switch: the weights stay float32 (sown, and
      mixed with the values promoted to float32) whatever the computation dtype. Without it
      they are rounded to the computation dtype, as flax does. The output stays in the
      computation dtype (flax's comes out float32; its MultiHeadDotProductAttention's output
      projection rounds it to that dtype).
    is_causal: query i attends to keys 0..i only.
    key_padding_mask: optional bool or 0/1 `[batch..., kv_len]`, False = padding.
    query_padding_mask: optional bool or 0/1 `[batch..., q_len]`; a padded query's row is
      fully masked (uniform weights under softmax, as flax).
    kernel: weight kernel name from `topk.kernels`.

  Returns:
    `[batch..., q_len, heads, d_v]` in the computation dtype.
  """
  can, kernel_fn, dropout = inputs.prepare(
      query, key, value, bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
      dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
      dtype=dtype, kernel=kernel, is_causal=is_causal, key_padding_mask=key_padding_mask,
      query_padding_mask=query_padding_mask, force_fp32_for_softmax=force_fp32_for_softmax)
  if module is not None:
    weights = kernel_fn(inputs.chunk_scores(can, 0, can.query, precision))
    module.sow('intermediates', 'attention_weights',
               weights.reshape(can.batch_shape + weights.shape[1:]).astype(can.weights_dtype))
  out = attend_block(can, 0, can.query, kernel_fn, dropout, dropout_rng, precision)
  return inputs.to_output(can, out)
