"""What every fused score-and-select kernel shares: its interface (`Variant`) and the operands
the Pallas-Triton kernels take.

Here, apart from `topk.fused` (the registry `VARIANTS`, `FusedOptions`, the 'compact' kernel)
and `topk.filter` (the 'filter' kernel), so that both kernels import it and `topk.fused`
imports `topk.filter` without a cycle.
"""
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from topk import inputs, select_gpu

# Computation dtypes the kernels take (Triton's dot inputs).
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Variant(NamedTuple):
  """A fused score-and-select kernel `topk_attention` can run, as the functions it calls.

  candidates: `(can, k, precision, tuning, interpret, query [B, H, C, D], start) -> state`, a
    pytree of per-query arrays `[B, H, C, ...]` for the query rows `start ... start + C - 1` of
    `can.query` (`start` may be traced), by one kernel launch, for inputs the kernel takes
    (`untaken` None, `1 <= k <= kv_len`); select: `(state, k) -> (kept [B, H, C, k], indices
    [B, H, C, k], redo [B, H, C])`, exact where `redo` is False; largest_array: `(can, k, tuning)
    -> entries` of the largest array one launch for `can.chunk_size` queries addresses (per
    query chunk, so that no candidate buffer reaches Triton's int32 offsets); tuning_type: the
    frozen dataclass of the kernel's tuning options (`FusedOptions.tuning`), whose no-argument
    instance is the default; kernel_name: the `pallas_call`'s name, which lowered programs that
    run the kernel hold; select_and_mix: None, or `(state, value [B, H, Lk, Dv], k,
    weights_dtype, *, interpret) -> (out float32 [B, H, C, Dv], kept, indices, redo)`, `select`
    and the softmax-weighted mix of the kept values in a kernel (kept entries in any order).
  """
  candidates: Callable[[inputs.Canonical, int, Any, Any, bool, jax.Array, Any], Any]
  select: Callable[[Any, int], tuple[jax.Array, jax.Array, jax.Array]]
  largest_array: Callable[[inputs.Canonical, int, Any], int]
  tuning_type: type
  kernel_name: str
  select_and_mix: Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array]] | None = None


def power_of_2(x: int) -> bool:
  return x >= 1 and x & (x - 1) == 0


def untaken(can: inputs.Canonical, k: int) -> str | None:
  """Why no fused kernel takes such inputs (their dtype, head_dim, no keys), or None."""
  d = can.query.shape[3]
  if can.dtype not in DTYPES:
    return f'computation dtype {can.dtype} (the kernel takes {DTYPES})'
  if not (power_of_2(d) and d >= 16):
    return f'head_dim {d} (the kernel takes powers of two >= 16)'
  if k < 1:
    return 'no keys'
  return None


def too_large(entries: int) -> str | None:
  """Why a kernel whose largest array has `entries` entries cannot address it (Triton's int32
  offsets), or None."""
  if entries > select_gpu.MAX_ENTRIES:
    return (f'an array of {entries:,} entries: Triton\'s int32 offsets address at most '
            f'{select_gpu.MAX_ENTRIES:,}')
  return None


def all_queries(can: inputs.Canonical) -> inputs.Canonical:
  """`can` as one chunk of all its queries: a kernel's stand-alone entry points launch once for
  every query."""
  return dataclasses.replace(can, chunk_size=can.query.shape[2])


def prepared(can: inputs.Canonical) -> inputs.Canonical:
  """`can` with its masks as the int8 the kernels load (Triton takes no bool pointers):
  converted once per call, so that the per-chunk launches (`operands`) convert nothing."""
  int8 = lambda x: None if x is None else x.astype(jnp.int8)
  return dataclasses.replace(can, mask=int8(can.mask), key_padding_mask=int8(can.key_padding_mask),
                             query_padding_mask=int8(can.query_padding_mask))


def operands(can: inputs.Canonical, query: jax.Array, start: Any, block_q: int
             ) -> tuple[jax.Array | None, ...]:
  """The operands of one launch for the query rows `query [B, H, C, D]` that start at row
  `start` of `can.query`, None where absent: `start [1]` int32 (traced or not: the kernels add
  it to their row indices for the masks, bias and causality), the query scaled as the unfused
  scores (rounding included) and zero-padded to whole blocks `[B*H, C_b, D]`, the key
  `[B*H, Lk, D]`, the bias `[Nb, Lq_pad|1, Lk|1]` float32 and mask `[Nm, Lq_pad|1, Lk|1]` int8
  (`Nb`, `Nm`: their batch times head counts, 1 where broadcast), and the padding masks
  `[B, 1, Lk]`, `[B, Lq_pad, 1]` int8, all of `can`'s queries (the kernels index them by
  `start`). The int8 conversions are no-ops for `prepared` inputs."""
  b, h, c, d = query.shape
  c_b = -(-c // block_q) * block_q
  q = jnp.pad(inputs.scale_query(query), ((0, 0), (0, 0), (0, c_b - c), (0, 0)))
  flat = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])
  int8 = lambda x: None if x is None else x.astype(jnp.int8)
  kpm, qpm = can.key_padding_mask, can.query_padding_mask
  return (jnp.asarray(start, jnp.int32).reshape(1), q.reshape(b * h, c_b, d),
          can.key.reshape(b * h, can.key.shape[2], d), flat(can.bias), int8(flat(can.mask)),
          None if kpm is None else int8(kpm[:, None, :]),
          None if qpm is None else int8(qpm[:, :, None]))
