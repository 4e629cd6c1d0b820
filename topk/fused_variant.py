"""What every fused score-and-select kernel shares: its interface (`Variant`) and the inputs
the Pallas-Triton kernels take.

Here, apart from `topk.fused` (the registry `VARIANTS`, `FusedOptions`, the 'compact' kernel)
and `topk.filter` (the 'filter' kernel), so that both kernels import it and `topk.fused`
imports `topk.filter` without a cycle.
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from topk import inputs, select_gpu

# Computation dtypes the kernels take (Triton's dot inputs).
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Variant(NamedTuple):
  """A fused score-and-select kernel `topk_attention` can run, as the functions it calls.

  candidates: `(can, k, precision, tuning, interpret) -> state`, a pytree of per-query arrays
    `[B, H, Lq_pad, ...]` for inputs the kernel takes (`untaken` None, `1 <= k <= kv_len`),
    computed once for all queries; select: `(state rows [B, H, C, ...], k) -> (kept [B, H, C, k],
    indices [B, H, C, k], redo [B, H, C])`, exact where `redo` is False; largest_array:
    `(can, k, tuning) -> entries` of the largest array the kernel addresses; tuning_type: the
    frozen dataclass of the kernel's tuning options (`FusedOptions.tuning`), whose no-argument
    instance is the default; kernel_name: the `pallas_call`'s name, which lowered programs that
    run the kernel hold.
  """
  candidates: Callable[[inputs.Canonical, int, Any, Any, bool], Any]
  select: Callable[[Any, int], tuple[jax.Array, jax.Array, jax.Array]]
  largest_array: Callable[[inputs.Canonical, int, Any], int]
  tuning_type: type
  kernel_name: str


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
