"""Select and mix in one Pallas kernel (Triton backend): the filter kernel's step 3 without XLA.

After `topk.filter`'s kernel, each query has a buffer of a few hundred candidates (scores and
key indices, in key order, masked keys after the rest). `topk.filter.select` then runs
`lax.top_k` over every buffer and `topk_attention` gathers and mixes the kept values in XLA.
Here one kernel instance per block of `block_rows` queries does both, in registers:

1. the exact k-th largest candidate by a radix select: scores become order-preserving int32
   keys (the sign bit decides, negatives with their other bits flipped: `lax.top_k`'s total
   order, -0 below +0; unfilled slots the least key), and 32 count-and-compare steps fix the
   k-th key's bits from the top;
2. the kept entries: every candidate above it, then the equal ones in slot order until k are
   kept (ties go to the lower slot, hence the lower key, as `lax.top_k`);
3. softmax over the kept scores (float32), the weights rounded to the weights dtype as
   `topk_attention._mix_rows` rounds them;
4. one pass over the filled slots, slot by slot: each kept slot's value row is gathered (masked
   lanes load nothing) and added with its weight, and its score and key go to the row's next
   output slot. No output is read back, so the kernel needs no barrier.

Outputs: the mixed values `[B, H, C, Dv]` float32 and the kept scores and key indices
`[B, H, C, k]` in slot order (key order, masked keys last), not by score: the same entries as
`topk.filter.select`'s wherever `redo` is False (the filter kernel's flag, passed through; such
rows are left to the caller, their outputs unspecified). The softmax kernel without dropout
only: `topk_attention` mixes here where `FusedOptions.mix_in_kernel` is set and those hold.

Experimental: tested in Pallas' interpreter and lowered for CUDA, not yet run on a GPU.
"""
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from topk import fused_variant, select_gpu

KERNEL_NAME = 'topk_select_mix'
_INT_MIN = -2**31


def _keys(scores: jax.Array) -> jax.Array:
  """Int32 keys of float32 scores in `lax.top_k`'s order (a total order: -0 below +0)."""
  bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kernel(values_ref, slots_ref, above_ref, ties_ref, value_ref, out_ref, kept_ref, idx_ref, *,
            k: int, rows: int, chunk: int, kv_len: int, buffer: int, width: int, dv: int,
            block_rows: int, weights_dtype: Any):
  """One block of rows. Refs: `values, slots [rows * buffer]` (the candidate buffers, flat),
  `above, ties [rows]`, `value [B*H * kv_len * Dv]` (flat); outputs `out [rows_b, Dv_p]`
  float32 (Dv_p: Dv rounded up to a power of two) and `kept, idx [rows_b * (k + 1)]` (the last
  slot of each row is the spare one masked-out lanes point at: the interpreter writes them)."""
  r0 = pl.program_id(0) * block_rows
  row = r0 + jax.lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
  row_ok = row < rows
  col = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  ok = row_ok[:, None] & (col < buffer)
  at = jnp.where(ok, row[:, None] * buffer + col, 0)
  scores = plgpu.load(values_ref.at[at], mask=ok, other=-jnp.inf)
  above = plgpu.load(above_ref.at[pl.ds(r0, block_rows)], mask=row_ok, other=0)
  ties = jnp.minimum(plgpu.load(ties_ref.at[pl.ds(r0, block_rows)], mask=row_ok, other=0), k)
  room = buffer - k  # the masked ties' slots: [room, room + ties)
  filled = ok & ((col < above[:, None]) | ((col >= room) & (col < room + ties[:, None])))
  keys = jnp.where(filled, _keys(scores), _INT_MIN)

  # 1. The k-th largest key, bit by bit from the top (in unsigned order: key ^ INT_MIN).
  def radix(b, prefix):
    bit = jnp.left_shift(jnp.int32(1), 31 - b)
    candidate = prefix | bit
    count = jnp.sum((keys >= (candidate ^ _INT_MIN)[:, None]).astype(jnp.int32), axis=1)
    return jnp.where(count >= k, candidate, prefix)

  kth = jax.lax.fori_loop(0, 32, radix, jnp.zeros((block_rows,), jnp.int32)) ^ _INT_MIN
  # 2. Kept: above the k-th, then equal ones in slot order up to k in all.
  need = k - jnp.sum((keys > kth[:, None]).astype(jnp.int32), axis=1)
  equal = filled & (keys == kth[:, None])
  kept = (keys > kth[:, None]) | (equal & (jnp.cumsum(equal.astype(jnp.int32), axis=1)
                                           <= need[:, None]))
  # 3. Softmax over the kept scores.
  peak = jnp.max(jnp.where(filled, scores, -jnp.inf), axis=1)
  total = jnp.sum(jnp.where(kept, jnp.exp(scores - peak[:, None]), 0.0), axis=1)

  # 4. Slot by slot over the filled slots: [0, above) (rows of plain blocks may fill the whole
  #    buffer), then the ties' slots.
  base = (row // chunk) * kv_len  # the row's first key in the flat value
  dv_p = out_ref.shape[1]
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, dv_p), 1)
  spare = row * (k + 1) + k

  def slot_step(is_tie_slot):
    def step(j, carry):
      acc, position, equal_seen = carry
      at = jnp.where(row_ok, row * buffer + j, 0)
      s = plgpu.load(values_ref.at[at], mask=row_ok, other=-jnp.inf)
      # Clipped: a redone row may count slots the filter kernel never wrote.
      key = jnp.clip(plgpu.load(slots_ref.at[at], mask=row_ok, other=0), 0, kv_len - 1)
      if is_tie_slot:
        here = row_ok & (j >= room) & (j < room + ties)
      else:
        here = row_ok & (j < above)
      code = _keys(s)
      tie = here & (code == kth)
      take = here & ((code > kth) | (tie & (equal_seen < need)))
      weight = jnp.where(take, jnp.exp(s - peak) / total, 0.0)
      weight = weight.astype(weights_dtype).astype(jnp.float32)
      lanes = take[:, None] & (lane < dv)
      at_v = jnp.where(lanes, (base + key)[:, None] * dv + lane, 0)
      v = plgpu.load(value_ref.at[at_v], mask=lanes, other=0).astype(jnp.float32)
      out_at = jnp.where(take, row * (k + 1) + jnp.minimum(position, k - 1), spare)
      plgpu.store(kept_ref.at[out_at], s, mask=take)
      plgpu.store(idx_ref.at[out_at], key, mask=take)
      return (acc + weight[:, None] * v, position + take.astype(jnp.int32),
              equal_seen + tie.astype(jnp.int32))
    return step

  carry = (jnp.zeros((block_rows, dv_p), jnp.float32), jnp.zeros((block_rows,), jnp.int32),
           jnp.zeros((block_rows,), jnp.int32))
  carry = jax.lax.fori_loop(0, jnp.max(jnp.minimum(above, buffer)), slot_step(False), carry)
  acc = jax.lax.fori_loop(room, room + jnp.max(ties), slot_step(True), carry)[0]
  plgpu.store(out_ref.at[pl.ds(r0, block_rows), :], acc)


def largest_array(rows: int, buffer: int, value_entries: int, k: int, dv: int,
                  block_rows: int) -> int:
  """Entries of the largest array the kernel addresses: the buffers, the value or its outputs."""
  rows_b = pl.cdiv(rows, block_rows) * block_rows
  return max(rows * buffer, value_entries, rows_b * (k + 1),
             rows_b * select_gpu.next_power_of_2(dv))


def select_and_mix(cands: Any, value: jax.Array, k: int, weights_dtype: Any, *,
                   interpret: bool = False, block_rows: int = 8, num_warps: int = 4
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Steps 1-4 for the rows of a `topk.filter.Candidates` (`values, slots [B, H, C, buffer]`,
  `above, ties, redo [B, H, C]`) and the attention's values `[B, H, Lk, Dv]` (of the keys the
  slots index), `1 <= k`, `2k <= buffer`.

  Returns:
    `(out float32 [B, H, C, Dv], kept float32 [B, H, C, k], indices int32 [B, H, C, k],
    redo bool [B, H, C])`: softmax-weighted values and the kept entries in slot order, exact
    where `redo` is False.
  """
  values, slots, above, ties, redo = cands
  b, h, c, buffer = values.shape
  kv_len, dv = value.shape[2:]
  if not (isinstance(k, int) and 1 <= k and 2 * k <= buffer):
    raise ValueError(f'topk.select_mix: k must be an int in [1, buffer / 2 = {buffer // 2}], '
                     f'got {k!r}.')
  if not (fused_variant.power_of_2(block_rows) and block_rows >= 1):
    raise ValueError(f'topk.select_mix: block_rows must be a power of two, got {block_rows!r}.')
  if value.shape[:2] != (b, h):
    raise ValueError(f'topk.select_mix: value {value.shape} does not match candidates of '
                     f'batch and heads {(b, h)}.')
  rows = b * h * c
  reason = fused_variant.too_large(largest_array(rows, buffer, value.size, k, dv, block_rows))
  if reason is not None:
    raise ValueError(f'topk.select_mix: the kernel does not take {reason}.')
  rows_b = pl.cdiv(rows, block_rows) * block_rows
  dv_p = select_gpu.next_power_of_2(dv)

  def kernel(*refs):
    _kernel(*refs, k=k, rows=rows, chunk=c, kv_len=kv_len, buffer=buffer,
            width=select_gpu.next_power_of_2(buffer), dv=dv, block_rows=block_rows,
            weights_dtype=weights_dtype)

  out, kept, idx = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((rows_b, dv_p), jnp.float32),
                 jax.ShapeDtypeStruct((rows_b * (k + 1),), jnp.float32),
                 jax.ShapeDtypeStruct((rows_b * (k + 1),), jnp.int32)),
      grid=(rows_b // block_rows,), interpret=interpret, name=KERNEL_NAME,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
  )(values.reshape(-1), slots.reshape(-1), above.reshape(-1), ties.reshape(-1),
    value.reshape(-1))
  per_row = lambda x, n: x.reshape(rows_b, n)[:rows].reshape(b, h, c, n)
  return (per_row(out, dv_p)[..., :dv], per_row(kept, k + 1)[..., :k],
          per_row(idx, k + 1)[..., :k], redo)

