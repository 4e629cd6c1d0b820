"""Exact attention computed one query chunk at a time: memory linear in the sequence length."""
from typing import Any

import jax
import jax.numpy as jnp

from topk import inputs
from topk.dense import attend_block


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      bias: jax.Array | None = None, mask: jax.Array | None = None,
                      broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None,
                      dropout_rate: float = 0.0, deterministic: bool = False, dtype: Any = None,
                      precision: Any = None, module: Any = None,
                      force_fp32_for_softmax: bool = False, *, query_chunk_size: int = 1024,
                      is_causal: bool = False, key_padding_mask: jax.Array | None = None,
                      query_padding_mask: jax.Array | None = None,
                      kernel: str = 'softmax') -> jax.Array:
  """`dot_product_attention` computed in query chunks with `jax.lax.map`.

  Each chunk's `[C, kv_len]` scores are rematerialised in the backward pass (jax.checkpoint), so
  neither pass keeps more than one chunk's scores alive. Dropout masks are drawn per chunk from
  `fold_in(dropout_rng, chunk_index)`, so they differ from flax's single draw. `module` is
  accepted for flax's `attention_fn` contract but weights are not sown (that would be
  quadratic). A q_len not divisible by the chunk size is zero-padded internally.

  Args:
    query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
      dtype, precision: as in `topk.dot_product_attention`.
    module: must be None (see above).
    force_fp32_for_softmax: as in `topk.dot_product_attention`.
    query_chunk_size: queries per chunk (clipped to q_len).
    is_causal: query i attends to keys 0..i only (built per chunk).
    key_padding_mask: optional bool or 0/1 `[batch..., kv_len]`, False = padding.
    query_padding_mask: optional bool or 0/1 `[batch..., q_len]`; a padded query's row is
      fully masked (uniform weights under softmax, as flax).
    kernel: weight kernel name from `topk.kernels`.

  Returns:
    `[batch..., q_len, heads, d_v]` in the computation dtype.
  """
  if module is not None:
    raise ValueError('chunked_attention cannot sow attention weights (flax sow_weights=True): '
                     'they form the q_len x kv_len array it exists to avoid. Sow with the '
                     "'vanilla' or 'topk' attention instead.")
  can, kernel_fn, dropout = inputs.prepare(
      query, key, value, bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
      dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
      dtype=dtype, kernel=kernel, query_chunk_size=query_chunk_size, is_causal=is_causal,
      key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
      force_fp32_for_softmax=force_fp32_for_softmax)

  @jax.checkpoint
  def one_chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
    i, q_chunk = args
    rng = None if dropout is None else jax.random.fold_in(dropout_rng, i)
    return attend_block(can, i, q_chunk, kernel_fn, dropout, rng, precision)

  out = jax.lax.map(one_chunk, (jnp.arange(can.num_chunks),
                                inputs.to_chunks(can.query, can.chunk_size)))
  return inputs.to_output(can, inputs.from_chunks(out))
