"""Exact top-k selections for GPU, equal to `jax.lax.top_k` (values, indices and tie order).

XLA's GPU TopK has a fast kernel only for k <= 16; above that it sorts each whole row. Both
selections here shrink the row first and leave only a small `lax.top_k` to XLA:

* `two_stage_top_k`: the top k of each `width`-wide block, then the top k of the survivors
  (recursively while they are still long). Survivors are laid out block by block and
  `lax.top_k` breaks ties toward the lower index, so equal values stay in increasing original
  index order and the result equals `lax.top_k` on the whole row exactly, whatever the order.
* `pallas_top_k`: a lower bound `t` on each row's k-th largest entry (the k-th largest of the
  maxima of `8k` strided groups), then one Pallas pass (Triton backend) that compacts the entries
  `>= t` of each row, in index order, into a small per-row buffer, then `lax.top_k` of the buffer.
  Every entry that can be in the top k is in the buffer, ties included, and in index order, so
  the result is exact. Rows whose buffer overflows or that hold a NaN (IEEE comparisons miss
  NaNs) take `two_stage_top_k` instead: mostly masked rows (many entries tie at the bound) land
  there. Rows too many for the kernel's int32 offsets (`MAX_ENTRIES`) take `two_stage_top_k`
  whole.

Neither has been timed on a GPU yet; on CPU they run for tests (Pallas with `interpret=True`).
"""
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Block width of the first stage (at least 2k); 512 measured 1.4x (f32) and 4.5x (bf16) faster
# than `lax.top_k` for k 64 on one H100.
TWO_STAGE_WIDTH = 512
# Dtypes the Pallas kernel compares exactly in float32.
PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Pallas-Triton addresses an array's entries with int32 offsets: a kernel takes no operand or
# output of more than 2**31 entries (its last offset, entries - 1, must fit in an int32). Here
# `[rows, n]` scores reach it at 2**31 entries, e.g. one query chunk of 1024 queries, 8 heads and
# 256K keys; `topk.fused` holds its kernel to the same limit.
MAX_ENTRIES = 2**31
# `candidates`' default rows per kernel instance.
BLOCK_ROWS = 4
# The compaction kernel's name in lowered programs (their text with debug information).
KERNEL_NAME = 'topk_compact_candidates'


def next_power_of_2(x: int) -> int:
  """The least power of two >= x (1 for x <= 1): block widths and buffer sizes of the kernels
  here and in `topk.fused`."""
  return 1 << max(0, x - 1).bit_length()


def two_stage_top_k(scores: jax.Array, k: int,
                    width: int | None = None) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(scores [..., n], k)` by blocks: `([..., k], int32 [..., k])`, the same arrays.

  The first stage takes the top k of each `width`-wide block (default `TWO_STAGE_WIDTH`, raised
  to a power of two >= 2k); the `n % width` trailing entries survive as they are, so nothing is
  padded.
  """
  n = scores.shape[-1]
  width = max(width or TWO_STAGE_WIDTH, next_power_of_2(2 * k))
  if n < 2 * width:
    return tuple(jax.lax.top_k(scores, k))
  blocks, full = n // width, n // width * width
  values, indices = jax.lax.top_k(scores[..., :full].reshape(*scores.shape[:-1], blocks, width), k)
  indices = indices + jnp.arange(0, full, width, dtype=jnp.int32)[:, None]
  batch = scores.shape[:-1]
  values = jnp.concatenate([values.reshape(*batch, blocks * k), scores[..., full:]], axis=-1)
  tail = jnp.broadcast_to(jnp.arange(full, n, dtype=jnp.int32), (*batch, n - full))
  indices = jnp.concatenate([indices.reshape(*batch, blocks * k), tail], axis=-1)
  values, positions = two_stage_top_k(values, k, width)
  return values, jnp.take_along_axis(indices, positions, axis=-1)


def compact_tile(refs: tuple[Any, ...], rows: jax.Array, tiles: tuple[jax.Array, ...],
                 keep: jax.Array, count: jax.Array, start: int, room: int,
                 spare: int) -> jax.Array:
  """One compaction step inside a Triton-backend kernel: appends the kept entries of a tile.

  Each of `tiles` (`[R, T]`) goes to the matching ref of `refs` (`[rows, width]`) at
  `rows [R, T]` and slot `start + count + (kept entries before it in its row)` where `keep`;
  only the first `room` kept entries of each row (counted over all tiles) are stored. Lanes not
  stored point at the column `spare`, outside every region, because the interpreter writes
  masked-out lanes too. Returns the new per-row count `[R]` of kept entries, stored or not.
  """
  slot = count[:, None] + jnp.cumsum(keep.astype(jnp.int32), axis=1) - 1
  stored = keep & (slot < room)
  slot = jnp.where(stored, start + slot, spare)
  for ref, tile in zip(refs, tiles, strict=True):
    plgpu.store(ref.at[rows, slot], tile, mask=stored)
  return count + jnp.sum(keep.astype(jnp.int32), axis=1)


def _compact_kernel(scores_ref, bound_ref, values_ref, indices_ref, count_ref, *, rows: int,
                    block_rows: int, tile: int, buffer: int):
  """Copies the entries `>= bound` of `block_rows` rows of `scores [rows, n]`, in index order,
  into `values, indices [rows_padded, buffer + 1]`; writes the candidate count per row
  (`buffer + 1` for a row holding a NaN). Column `buffer` is a spare slot that masked-out lanes
  point at, so they never collide with a real slot.
  """
  n = scores_ref.shape[1]
  first = pl.program_id(0) * block_rows
  row_ok = first + jax.lax.broadcasted_iota(jnp.int32, (block_rows,), 0) < rows
  bound = plgpu.load(bound_ref.at[pl.ds(first, block_rows)], mask=row_ok, other=jnp.inf)
  row_ids = first + jax.lax.broadcasted_iota(jnp.int32, (block_rows, tile), 0)

  def scan_tile(j, carry):
    count, nans = carry  # [block_rows] int32 each
    cols = j * tile + jax.lax.broadcasted_iota(jnp.int32, (block_rows, tile), 1)
    ok = row_ok[:, None] & (cols < n)
    s = plgpu.load(scores_ref.at[pl.ds(first, block_rows), pl.ds(j * tile, tile)], mask=ok,
                   other=0)
    x = s.astype(jnp.float32)
    keep = ok & (x >= bound[:, None])
    nans = nans + jnp.sum((ok & (x != x)).astype(jnp.int32), axis=1)
    count = compact_tile((values_ref, indices_ref), row_ids, (s, cols), keep, count, 0, buffer,
                         buffer)
    return count, nans

  zeros = jnp.zeros((block_rows,), jnp.int32)
  count, nans = jax.lax.fori_loop(0, pl.cdiv(n, tile), scan_tile, (zeros, zeros))
  plgpu.store(count_ref.at[pl.ds(first, block_rows)], jnp.where(nans > 0, buffer + 1, count),
              mask=row_ok)


def _largest_array(rows: int, n: int, buffer: int, block_rows: int) -> int:
  """Entries of the largest array of `candidates`' kernel: the scores `[rows, n]` or the buffers
  `[rows rounded up to block_rows, buffer + 1]`."""
  return max(rows * n, pl.cdiv(rows, block_rows) * block_rows * (buffer + 1))


def candidates(scores: jax.Array, k: int, buffer: int, *, interpret: bool = False,
               block_rows: int = BLOCK_ROWS, tile: int = 1024, num_warps: int = 4,
               num_stages: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The entries of each row of `scores [rows, n]` that can be in its top k, in index order.

  Returns `(values [rows, buffer], indices int32 [rows, buffer], count int32 [rows])`: slots at
  or past `count` hold no candidate, and `count > buffer` marks a row whose candidates did not
  fit or that holds a NaN. Raises ValueError for arrays past `MAX_ENTRIES`.
  """
  rows, n = scores.shape
  largest = _largest_array(rows, n, buffer, block_rows)
  if largest > MAX_ENTRIES:
    raise ValueError(f'select_gpu.candidates: an array of {largest:,} entries; the kernel\'s '
                     f'int32 offsets address at most {MAX_ENTRIES:,}.')
  groups = 8 * k
  # Group g holds entries g, g + groups, ...: the k largest group maxima are k distinct entries,
  # so the k-th of them is at most the row's k-th largest.
  maxima = jnp.max(scores[:, :n // groups * groups].reshape(rows, -1, groups), axis=1)
  bound = jax.lax.top_k(maxima, k)[0][:, -1].astype(jnp.float32)
  padded = pl.cdiv(rows, block_rows) * block_rows
  values, indices, count = pl.pallas_call(
      functools.partial(_compact_kernel, rows=rows, block_rows=block_rows, tile=tile,
                        buffer=buffer),
      out_shape=(jax.ShapeDtypeStruct((padded, buffer + 1), scores.dtype),
                 jax.ShapeDtypeStruct((padded, buffer + 1), jnp.int32),
                 jax.ShapeDtypeStruct((padded,), jnp.int32)),
      grid=(padded // block_rows,), interpret=interpret, name=KERNEL_NAME,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(scores, bound)
  return values[:rows, :buffer], indices[:rows, :buffer], count[:rows]


def pallas_top_k(scores: jax.Array, k: int, *, buffer: int | None = None,
                 **kernel_options) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(scores [..., n], k)` through the Pallas compaction kernel; the same arrays.

  Args:
    scores: float32, bfloat16 or float16 `[..., n]`.
    k: entries to select.
    buffer: candidate slots per row (default: a power of two >= 4k). Rows with more candidates
      take `two_stage_top_k`, as all rows do where an array would pass `MAX_ENTRIES`.
    **kernel_options: `candidates`' keywords: `interpret` (run the kernel in Pallas'
      interpreter, on any platform), `block_rows` and `tile` (rows per kernel instance and
      columns per loop step, powers of two), `num_warps` and `num_stages` (Triton's).

  Returns:
    `(values [..., k], indices int32 [..., k])`.
  """
  if scores.dtype not in PALLAS_DTYPES:
    raise ValueError(f'pallas_top_k: scores must be one of {PALLAS_DTYPES}, got {scores.dtype}')
  n = scores.shape[-1]
  if not 0 < 16 * k <= n or scores.size == 0:  # Nothing to select, or too short to prune much.
    return two_stage_top_k(scores, k)
  buffer = buffer or next_power_of_2(4 * k)
  batch = scores.shape[:-1]
  block_rows = kernel_options.get('block_rows', BLOCK_ROWS)
  if _largest_array(math.prod(batch), n, buffer, block_rows) > MAX_ENTRIES:
    return two_stage_top_k(scores, k)
  flat = scores.reshape(math.prod(batch), n)
  values, indices, count = candidates(flat, k, buffer, **kernel_options)
  # Exact rows have at least k candidates before the -inf fill, so ties never pick a fill slot.
  values = jnp.where(jnp.arange(buffer) < count[:, None], values, -jnp.inf)
  values, positions = jax.lax.top_k(values, k)
  indices = jnp.take_along_axis(indices, positions, axis=-1)
  exact = count <= buffer

  def merge_fallback(values, indices):
    fallback = two_stage_top_k(flat, k)
    return (jnp.where(exact[:, None], values, fallback[0]),
            jnp.where(exact[:, None], indices, fallback[1]))

  values, indices = jax.lax.cond(jnp.all(exact), lambda v, i: (v, i), merge_fallback,
                                 values, indices)
  return values.reshape(*batch, k), indices.reshape(*batch, k)
