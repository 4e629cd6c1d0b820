"""Validated, canonical attention inputs and the per-query-chunk pieces all attention forms share.

Public functions take flax's layout: query `[batch..., q_len, heads, d]`, key/value
`[batch..., kv_len, heads, d(_v)]`, mask/bias broadcastable to `[batch..., heads, q_len, kv_len]`.
Internally the batch dims are flattened and heads moved in front of the length:
query `[B, H, Lq_pad, D]` (queries zero-padded to a whole number of chunks, at least one),
key `[B, H, Lk, D]`, value `[B, H, Lk, Dv]`, mask/bias `[B|1, H|1, Lq_pad|1, Lk|1]`. Scores are
float32 whatever the input dtype; masked scores are float32's most negative finite value (flax).
"""
import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from topk import kernels

# Score of a masked entry (flax's convention; `topk.kernels` maps it to zero weight).
NEG = float(np.finfo(np.float32).min)


def check_positive_int(value: Any, name: str) -> int:
  """Returns `value` as an int, or raises ValueError unless it is an integer >= 1."""
  if isinstance(value, bool):
    raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f'{name} must be an integer >= 1, got {value!r}.') from None
  if value < 1:
    raise ValueError(f'{name} must be an integer >= 1, got {value}.')
  return value


@dataclasses.dataclass(frozen=True)
class Dropout:
  """Attention-dropout settings; absent (None) when dropout is off. Static (hashable): the key
  travels beside it, so that a traced function can take the settings as a static argument."""
  rate: float
  broadcast: bool  # one mask shared by all batch entries and heads (flax's broadcast_dropout)

  def multiplier(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Returns keep/keep_prob (float32), broadcastable to `shape` = `[B, H, rows, cols]`."""
    keep_prob = 1.0 - self.rate
    mask_shape = (1, 1) + tuple(shape[2:]) if self.broadcast else tuple(shape)
    keep = jax.random.bernoulli(rng, keep_prob, mask_shape)
    return keep.astype(jnp.float32) / jnp.float32(keep_prob)


def make_dropout(dropout_rng: jax.Array | None, dropout_rate: float, deterministic: bool,
                 broadcast_dropout: bool) -> Dropout | None:
  """Validates the dropout arguments; returns None when no dropout is applied."""
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
  if deterministic or dropout_rate == 0.0:
    return None
  if dropout_rng is None:
    raise ValueError('dropout_rng is required when deterministic=False and dropout_rate > 0.')
  return Dropout(float(dropout_rate), bool(broadcast_dropout))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=('query', 'key', 'value', 'mask', 'bias', 'key_padding_mask',
                                'query_padding_mask'),
                   meta_fields=('is_causal', 'batch_shape', 'q_len', 'chunk_size', 'dtype',
                                'weights_dtype'))
@dataclasses.dataclass(frozen=True)
class Canonical:
  """Attention inputs in the internal layout (see module docstring).

  A pytree: its arrays are the leaves and the rest (static facts of the call) its structure,
  so a `jax.custom_vjp` takes it whole and its cotangent is a `Canonical` of the gradients.
  """
  query: jax.Array  # [B, H, Lq_pad, D]
  key: jax.Array  # [B, H, Lk, D]
  value: jax.Array  # [B, H, Lk, Dv]
  mask: jax.Array | None  # bool [B|1, H|1, Lq_pad|1, Lk|1]
  bias: jax.Array | None  # float32 [B|1, H|1, Lq_pad|1, Lk|1]
  key_padding_mask: jax.Array | None  # bool [B, Lk]
  query_padding_mask: jax.Array | None  # bool [B, Lq_pad]
  is_causal: bool
  batch_shape: tuple[int, ...]
  q_len: int
  chunk_size: int  # queries per chunk (C); Lq_pad = num_chunks * chunk_size
  dtype: Any  # computation and output dtype
  # Dtype of the attention weights, sown and mixed with the values: the computation dtype, or
  # float32 with flax's force_fp32_for_softmax (mixed precision keeps the weights exact).
  weights_dtype: Any

  @property
  def num_chunks(self) -> int:
    return self.query.shape[2] // self.chunk_size


def check_bool(value: Any, name: str) -> bool:
  """Returns `value` as a bool, or raises ValueError unless it is one (Python's or numpy's): a
  string such as 'False' would otherwise count as True."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{name} must be True or False, got {value!r}.')
  return bool(value)


def real_array(x: Any, name: str, what: str) -> jax.Array:
  """Returns `x` as an array, or raises ValueError(`name must be what`) unless its dtype is bool,
  integer or real floating point (complex would silently lose its imaginary part)."""
  dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
  if not (dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)):
    raise ValueError(f'{name} must be {what}, got dtype {dtype}.')
  return jnp.asarray(x)


def _mask(x: Any, name: str) -> jax.Array:
  """Returns a bool or 0/1 mask as a bool array."""
  return real_array(x, name, 'bool or 0/1 real numbers') != 0


def computation_dtype(dtype: Any, *arrays: jax.Array) -> np.dtype:
  """The requested dtype, which must be real floating point, or flax's promotion of the inputs:
  their common dtype, with integer and bool promoted to (at least) float32."""
  if dtype is None:
    dtype = jnp.result_type(*arrays)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.promote_types(jnp.float32, dtype)
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f'dtype must be a real floating-point dtype, got {dtype!r}.') from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'dtype must be a real floating-point dtype, got {dtype}.')
  return dtype


def _check_broadcasts(x: jax.Array, full_shape: tuple[int, ...], message: str) -> None:
  """Raises ValueError(message) unless `x` broadcasts to exactly `full_shape`."""
  try:
    ok = x.ndim <= len(full_shape) and np.broadcast_shapes(x.shape, full_shape) == full_shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(message)


def _canonical_4d(x: Any, name: str, full_shape: tuple[int, ...], q_pad: int,
                  pad_value: Any) -> jax.Array:
  """Reshapes x (broadcastable to `[batch..., H, Lq, Lk]`) to `[B|1, H|1, Lq_pad|1, Lk|1]`."""
  _check_broadcasts(x, full_shape, f'{name} of shape {x.shape} does not broadcast to '
                    f'[batch..., heads, q_len, kv_len] = {full_shape}.')
  x = x.reshape((1,) * (len(full_shape) - x.ndim) + x.shape)
  batch_shape, tail = full_shape[:-3], x.shape[-3:]
  if all(d == 1 for d in x.shape[:-3]):
    # Keep a batch-free mask/bias small instead of copying it per batch entry.
    x = x.reshape((1,) + tail)
  else:
    x = jnp.broadcast_to(x, batch_shape + tail).reshape((math.prod(batch_shape),) + tail)
  if x.shape[2] != 1 and q_pad:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, q_pad), (0, 0)), constant_values=pad_value)
  return x


def _canonical_padding(x: Any, name: str, batch_shape: tuple[int, ...], length: int,
                       length_name: str) -> jax.Array:
  """Returns a `[batch..., length]`-broadcastable padding mask as bool `[B, length]`."""
  x = _mask(x, name)
  full = batch_shape + (length,)
  _check_broadcasts(x, full, f'{name} of shape {x.shape} does not broadcast to '
                    f'[batch..., {length_name}] = {full}.')
  return jnp.broadcast_to(x, full).reshape(math.prod(batch_shape), length)


def canonicalize(query: jax.Array, key: jax.Array, value: jax.Array, *, bias: Any = None,
                 mask: Any = None, dtype: Any = None, query_chunk_size: int | None = None,
                 is_causal: bool = False, key_padding_mask: Any = None,
                 query_padding_mask: Any = None,
                 force_fp32_for_softmax: bool = False) -> Canonical:
  """Validates the inputs and returns them in the internal layout.

  Args:
    query: `[batch..., q_len, heads, d]`.
    key: `[batch..., kv_len, heads, d]`.
    value: `[batch..., kv_len, heads, d_v]`.
    bias: optional, broadcastable to `[batch..., heads, q_len, kv_len]`.
    mask: optional bool or 0/1, same broadcasting; False/0 = masked out.
    dtype: computation/output dtype, real floating point; default: the promoted dtype of query,
      key and value, integer and bool promoted to float32 (as flax).
    query_chunk_size: queries per chunk (None: all at once); clipped to q_len.
    is_causal: mask keys after the query position (positions aligned at 0).
    key_padding_mask: optional bool or 0/1 `[batch..., kv_len]`.
    query_padding_mask: optional bool or 0/1 `[batch..., q_len]`.
    force_fp32_for_softmax: flax's: the attention weights stay float32 (sown in float32 and
      mixed with the values in float32) whatever the computation dtype. The scores and the
      kernel are float32 either way; without it the weights are rounded to the computation
      dtype, as flax does.

  Returns:
    The `Canonical` inputs.

  Raises:
    ValueError: for mismatched shapes, masks or bias that do not broadcast, complex or
      non-numeric inputs, or a dtype that is not real floating point.
  """
  is_causal = check_bool(is_causal, 'is_causal')
  force_fp32_for_softmax = check_bool(force_fp32_for_softmax, 'force_fp32_for_softmax')
  query, key, value = (real_array(x, name, 'a real or integer array') for x, name in
                       ((query, 'query'), (key, 'key'), (value, 'value')))
  if query.ndim < 3 or not query.ndim == key.ndim == value.ndim:
    raise ValueError('query, key and value must have the same rank >= 3 ([batch..., length, '
                     f'heads, depth]); got shapes {query.shape}, {key.shape}, {value.shape}.')
  if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
    raise ValueError('query, key and value must have the same batch dims; got shapes '
                     f'{query.shape}, {key.shape}, {value.shape}.')
  if not query.shape[-2] == key.shape[-2] == value.shape[-2]:
    raise ValueError('query, key and value must have the same number of heads (axis -2); got '
                     f'shapes {query.shape}, {key.shape}, {value.shape}.')
  if query.shape[-1] != key.shape[-1]:
    raise ValueError('query and key must have the same head_dim (axis -1); got shapes '
                     f'{query.shape}, {key.shape}.')
  if key.shape[-3] != value.shape[-3]:
    raise ValueError('key and value must have the same kv_len (axis -3); got shapes '
                     f'{key.shape}, {value.shape}.')
  batch_shape = tuple(query.shape[:-3])
  q_len, heads = query.shape[-3], query.shape[-2]
  kv_len = key.shape[-3]
  full_shape = batch_shape + (heads, q_len, kv_len)

  chunk_size = max(q_len if query_chunk_size is None else min(
      check_positive_int(query_chunk_size, 'query_chunk_size'), max(q_len, 1)), 1)
  q_pad = max(-(-q_len // chunk_size), 1) * chunk_size - q_len  # q_len 0: one chunk of padding

  dtype = computation_dtype(dtype, query, key, value)

  def to_bhld(x: jax.Array, pad: int = 0) -> jax.Array:
    x = x.astype(dtype).reshape((math.prod(batch_shape),) + x.shape[-3:])
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return jnp.swapaxes(x, 1, 2)

  if mask is not None:
    mask = _canonical_4d(_mask(mask, 'mask'), 'mask', full_shape, q_pad, True)
  if bias is not None:
    bias = real_array(bias, 'bias', 'a real or integer array').astype(jnp.float32)
    bias = _canonical_4d(bias, 'bias', full_shape, q_pad, 0.0)
  if key_padding_mask is not None:
    key_padding_mask = _canonical_padding(key_padding_mask, 'key_padding_mask', batch_shape,
                                          kv_len, 'kv_len')
  if query_padding_mask is not None:
    query_padding_mask = _canonical_padding(query_padding_mask, 'query_padding_mask',
                                            batch_shape, q_len, 'q_len')
    query_padding_mask = jnp.pad(query_padding_mask, ((0, 0), (0, q_pad)), constant_values=True)

  return Canonical(
      query=to_bhld(query, q_pad), key=to_bhld(key), value=to_bhld(value), mask=mask, bias=bias,
      key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
      is_causal=is_causal, batch_shape=batch_shape, q_len=q_len, chunk_size=chunk_size,
      dtype=dtype,
      weights_dtype=jnp.dtype(jnp.float32) if force_fp32_for_softmax else dtype)


def prepare(query: jax.Array, key: jax.Array, value: jax.Array, *, bias: Any, mask: Any,
            broadcast_dropout: bool, dropout_rng: jax.Array | None, dropout_rate: float,
            deterministic: bool, dtype: Any, kernel: str, query_chunk_size: int | None = None,
            is_causal: bool = False, key_padding_mask: Any = None,
            query_padding_mask: Any = None, force_fp32_for_softmax: bool = False
            ) -> tuple[Canonical, Callable[[jax.Array], jax.Array], Dropout | None]:
  """The opening every attention form shares: validates all arguments (as documented in
  `canonicalize`, `make_dropout` and `topk.kernels.get_kernel`) before any work is done.

  Returns:
    `(canonical inputs, kernel scores [..., n] -> weights [..., n], dropout or None)`.
  """
  kernel_fn = kernels.get_kernel(kernel)
  dropout = make_dropout(dropout_rng, dropout_rate, deterministic, broadcast_dropout)
  can = canonicalize(query, key, value, bias=bias, mask=mask, dtype=dtype,
                     query_chunk_size=query_chunk_size, is_causal=is_causal,
                     key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
                     force_fp32_for_softmax=force_fp32_for_softmax)
  return can, kernel_fn, dropout


def _rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """Slices rows [start, start + size) of axis 2 unless that axis broadcasts (size 1)."""
  return x if x.shape[2] == 1 else jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)


def chunk_validity(can: Canonical, i: jax.Array) -> jax.Array | None:
  """Returns which (query, key) pairs of query chunk `i` may attend, bool broadcastable to
  `[B, H, C, Lk]`, or None when nothing is masked. Never builds a q_len x kv_len array."""
  size, start = can.chunk_size, i * can.chunk_size
  conditions = []
  if can.mask is not None:
    conditions.append(_rows(can.mask, start, size))
  if can.is_causal:
    q_pos = start + jnp.arange(size)
    conditions.append((jnp.arange(can.key.shape[2])[None, :] <= q_pos[:, None])[None, None])
  if can.key_padding_mask is not None:
    conditions.append(can.key_padding_mask[:, None, None, :])
  if can.query_padding_mask is not None:
    q_valid = jax.lax.dynamic_slice_in_dim(can.query_padding_mask, start, size, axis=1)
    conditions.append(q_valid[:, None, :, None])
  return functools.reduce(jnp.logical_and, conditions) if conditions else None


def scale_query(query: jax.Array) -> jax.Array:
  """Divides by sqrt(head_dim) in the query's dtype, exactly as flax does."""
  return query / jnp.sqrt(query.shape[-1]).astype(query.dtype)


def chunk_scores(can: Canonical, i: jax.Array, q_chunk: jax.Array, precision: Any) -> jax.Array:
  """Returns the scaled, biased, masked float32 scores `[B, H, C, Lk]` of query chunk `i`.

  Args:
    can: the canonical inputs (key, bias, masks; C is `can.chunk_size`).
    i: chunk index.
    q_chunk: `[B, H, C, D]`, rows `i*C ... i*C + C - 1` of the query (passed apart from
      `can.query` because callers hold it already sliced, chunk by chunk).
    precision: einsum precision.
  """
  scores = jnp.einsum('bhqd,bhkd->bhqk', scale_query(q_chunk), can.key, precision=precision,
                      preferred_element_type=jnp.float32)
  if can.bias is not None:
    scores = scores + _rows(can.bias, i * can.chunk_size, can.chunk_size)
  valid = chunk_validity(can, i)
  return scores if valid is None else jnp.where(valid, scores, NEG)


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
  """`[B, H, L, ...]` -> `[L / chunk_size, B, H, chunk_size, ...]`."""
  b, h, length = x.shape[:3]
  return jnp.moveaxis(x.reshape((b, h, length // chunk_size, chunk_size) + x.shape[3:]), 2, 0)


def from_chunks(x: jax.Array) -> jax.Array:
  """Inverse of `to_chunks`."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def to_output(can: Canonical, out: jax.Array) -> jax.Array:
  """`[B, H, Lq_pad, Dv]` -> `[batch..., q_len, H, Dv]` in the computation dtype."""
  out = jnp.swapaxes(out[:, :, :can.q_len], 1, 2)
  return out.reshape(can.batch_shape + out.shape[1:]).astype(can.dtype)
