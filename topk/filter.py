"""A one-pass fused score-and-select kernel (Pallas, Triton backend): estimate, filter, verify.

Experimental and OFF by default: the fused-kernel variant 'filter' of `topk_attention`
(`topk.fused.FusedOptions(variant='filter')`, `VARIANT` here), not its default until timed on a
GPU (benchmarks/gpu.sh). `kept_top_k(can, k, precision, interpret=..., options=Options(...))`
returns `(kept, indices, redo)` `[B, H, Lq_pad, k]`, `[B, H, Lq_pad]`, the kept scores and keys
exactly as `lax.top_k` of the dense masked scores (ties to the lower key) wherever `redo` is
False; `topk_attention` redoes the flagged rows with the unfused selection (`fused.merge`).

One kernel instance per block of `block_q` queries of one (batch, head) (grid axis 0 = query
block, the fastest, so the programs running together share one head's keys in L2):

1. estimate (about 1/`stride` of a pass): the scores of a strided sample of the keys (every
   `stride`-th key, diagonal-bounded when causal), the maxima of `groups` strided groups of the
   sample (sampled key `m` in group `m mod groups`), and a threshold `t` per row: the `rank`-th
   largest group maximum (by bisection, from below: at least `rank` maxima are `>= t`), or the
   masked score `inputs.NEG` (keep every valid key) where fewer than `rank` groups hold a valid
   key or the row's valid keys, estimated as sampled ones * `stride`, fit half the room.
   The rule (defaults): `stride` 8, `rank = k` for k <= 32 else `ceil(k / 2)`, `groups` the
   power of two >= max(128, 2 * rank), `buffer = 3 * stride * rank` rounded up to 128 (768 for
   k 64). For i.i.d. scores the entries `>= t` of a row number `rank` (the sampled ones) plus
   about Gamma(rank) * (stride - 1) others: for k 64, mean ~300 (group collisions lift it above
   8 * 32), fewer than 64 with probability ~1e-16, more than 768 with ~1e-14 per row.
2. filter (one pass over the keys, up to the diagonal when causal): each tile's scores by one
   `dot`, `keep = s >= t`, and the kept (score, key) pairs appended in key order to the row's
   buffer: slot = the row's running count + an inclusive `cumsum` of `keep` within the tile.
   Masks, bias and the causal/length checks apply only where given or needed (tiles before the
   diagonal and before the last key take the plain loop). Blocks where some row has `t = NEG`
   (causal starts, short or heavily masked rows) take a second loop that keeps the masked
   entries (`== NEG`) apart, the first k of them in the last k slots (as `fused`).
3. select (outside the kernel, `select`): `lax.top_k` of each row's buffer (unfilled slots at
   -inf), whose candidates are in key order, masked ones after the others: ties go to the
   lower key. With `FusedOptions.mix_in_kernel`, `topk.select_mix`'s kernel selects the same
   entries and mixes their values instead (`VARIANT.select_and_mix`).

Verification: a row is exact iff its count of entries `>= t` is between k and the room (the
masked ones counted separately, as above) and no score is NaN or infinite (`s * 0` summed per
row is 0 exactly then); keys past the diagonal that the causal loop skips are masked and come
after every visited key, so they never displace a kept one. Other rows come back in `redo`.

Triton's int32 offsets: no operand or output of a launch may have 2**31 entries or more;
`topk_attention` launches the kernel per query chunk, so only the key or a full mask or bias
can reach that; `unsupported` says so (at abstract shapes) and `candidates` refuses them.
Exactness is up to the score product's rounding, as in `fused` (Triton's and XLA's products may
round differently).
"""
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from topk import fused_variant, inputs, select_gpu, select_mix

KERNEL_NAME = 'topk_filter_candidates'
BISECTION_STEPS = 20
_TIE_SHIFT = 16  # packed counts (kept above NEG | masked ties << 16): tiles < 2**15 keys


class Candidates(NamedTuple):
  """Each query's candidate buffer, `[..., buffer]`, and per row `above`, `ties`, `redo`.

  Slots `[0, above)` hold the kept entries above the masked score in key order; in a block that
  kept masked entries, slots `[buffer - k, buffer - k + min(ties, k))` hold the first of them.
  """
  values: jax.Array  # float32
  slots: jax.Array  # int32 key indices
  above: jax.Array  # int32: entries >= t above NEG (all of them, also past the buffer)
  ties: jax.Array  # int32: masked entries kept apart (0 in plain blocks)
  redo: jax.Array  # bool


@dataclasses.dataclass(frozen=True)
class Options:
  """The kernel's tuning options (`FusedOptions.tuning` of the 'filter' variant); None: the
  rule in the module docstring.

  block_q, key_tile, groups: powers of two >= 16 (Triton's dot); stride >= 1; 1 <= rank <=
  min(k, groups); buffer >= 2k. num_warps, num_stages: Triton's.
  """
  block_q: int = 64
  key_tile: int = 64
  stride: int = 8
  rank: int | None = None
  groups: int | None = None
  buffer: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ('block_q', 'key_tile', 'groups'):
      size = getattr(self, name)
      if not (size is None and name == 'groups') and not (
          isinstance(size, int) and size >= 16 and fused_variant.power_of_2(size)):
        raise ValueError(f'topk.filter: {name} must be a power of two >= 16, got {size!r}.')
    if self.key_tile >= 1 << (_TIE_SHIFT - 1):
      raise ValueError(f'topk.filter: key_tile must be below {1 << (_TIE_SHIFT - 1)} (packed '
                       f'counts), got {self.key_tile}.')
    for name in ('stride', 'rank', 'buffer', 'num_warps', 'num_stages'):
      if getattr(self, name) is not None:
        inputs.check_positive_int(getattr(self, name), f'topk.filter: {name}')

  def resolve(self, k: int, kv_len: int) -> 'Options':
    """These options for `k` of `kv_len` keys, the rule's defaults filled in; raises ValueError
    unless `1 <= k <= kv_len` and `rank <= min(k, groups)`."""
    if not 1 <= k <= kv_len:
      raise ValueError(f'topk.filter: k must be in [1, kv_len = {kv_len}], got {k}.')
    rank = self.rank or (k if k <= 32 else -(-k // 2))
    groups = self.groups or select_gpu.next_power_of_2(max(128, 2 * rank))
    rank = self.rank or min(rank, groups)  # groups given: the rule's rank, at most groups
    buffer = self.buffer or -(-3 * self.stride * rank // 128) * 128
    buffer = max(buffer, 2 * k)
    if not rank <= min(k, groups):
      raise ValueError(f'topk.filter: rank must be in [1, min(k, groups)], got {rank}.')
    return dataclasses.replace(self, rank=rank, groups=groups, buffer=buffer)


def _load(ref, index, rows, cols, row_ok, col_ok, other):
  """`ref [N, Lq|1, Lk|1]` entry `index` at rows (a `pl.ds`) x cols (a `pl.ds`), broadcast
  axes kept at size 1; `other` where not `row_ok & col_ok`."""
  if ref is None:
    return None
  lq, lk = ref.shape[1:]
  ok = (row_ok if lq != 1 else jnp.ones((1, 1), bool)) & (
      col_ok if lk != 1 else jnp.ones((1, 1), bool))
  return plgpu.load(ref.at[jnp.asarray(index, jnp.int32), rows if lq != 1 else pl.ds(0, 1),
                           cols if lk != 1 else pl.ds(0, 1)], mask=ok, other=other)


def _kernel(start_ref, q_ref, key_ref, bias_ref, mask_ref, kpm_ref, qpm_ref, flat_refs,
            values_ref, slots_ref, above_ref, ties_ref, redo_ref, *, k: int, heads: int,
            bias_heads, mask_heads, is_causal: bool, q_len: int, opt: Options, precision: Any,
            plain_only: bool):
  """One block of queries; refs as `fused._kernel` (rows of the masks, bias and causality from
  the launch's first row `start`), `flat_refs` 1-d copies of the key and of the bias and masks
  (None where absent) for the sample's gathers; outputs flat `[rows * (buffer + 1)]` (column
  `buffer` of each row is the spare slot masked-out lanes point at) and per row."""
  block_q, tile, groups, stride, buffer = (opt.block_q, opt.key_tile, opt.groups, opt.stride,
                                           opt.buffer)
  r0, bh = pl.program_id(0) * block_q, pl.program_id(1)
  b, h = bh // heads, bh % heads
  kv_len = key_ref.shape[1]
  g0 = start_ref[0] + r0  # the block's first row in `can.query`
  rows = g0 + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  row_ok = (rows < q_len)[:, None]
  q = plgpu.load(q_ref.at[bh, pl.ds(r0, block_q), :])
  entry = lambda counts: (b if counts[0] != 1 else 0) * counts[1] + (h if counts[1] != 1 else 0)
  # Keys visited: up to the block's last row when causal.
  end = jnp.minimum(g0 + block_q, kv_len) if is_causal else kv_len

  def masked(s, cols, causal, load):
    """`s` with the bias added and the masks applied (`load(ref, entry, other)` loads one)."""
    if bias_ref is not None:
      s = s + load(bias_ref, entry(bias_heads), 0.0)
    valid = None
    for ok in (None if mask_ref is None else load(mask_ref, entry(mask_heads), 1) != 0,
               cols <= rows[:, None] if causal else None,
               None if kpm_ref is None else load(kpm_ref, b, 1) != 0,
               None if qpm_ref is None else load(qpm_ref, b, 1) != 0):
      if ok is not None:
        valid = ok if valid is None else valid & ok
    return s if valid is None else jnp.where(valid, s, inputs.NEG)

  def scores(c0, width, causal, edge):
    """Masked float32 scores `[block_q, width]` of keys c0 ... c0 + width - 1, their columns
    `[1, width]` and (`edge`) which are keys at all (else None)."""
    cols = c0 + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    inside = cols < kv_len if edge else None
    if edge:
      key_ok = c0 + jax.lax.broadcasted_iota(jnp.int32, (width, 1), 0) < kv_len
      keys = plgpu.load(key_ref.at[bh, pl.ds(c0, width), :], mask=key_ok, other=0)
    else:
      keys = plgpu.load(key_ref.at[bh, pl.ds(c0, width), :])
    s = plgpu.dot(q, keys, trans_b=True, precision=precision)
    load = lambda ref, index, other: _load(ref, index, pl.ds(g0, block_q), pl.ds(c0, width),
                                           row_ok, inside if edge else True, other)
    return masked(s, cols, causal, load), cols, inside

  def sample_scores(m0):
    """Masked scores `[block_q, groups]` of keys (m0 + j) * stride, -inf past kv_len (flat
    gathers: the interpreter has no strided loads)."""
    cols = (m0 + jax.lax.broadcasted_iota(jnp.int32, (1, groups), 1)) * stride
    inside = cols < kv_len
    d = key_ref.shape[2]
    at = ((m0 + jax.lax.broadcasted_iota(jnp.int32, (groups, d), 0)) * stride
          + bh * kv_len) * d + jax.lax.broadcasted_iota(jnp.int32, (groups, d), 1)
    key_ok = (m0 + jax.lax.broadcasted_iota(jnp.int32, (groups, d), 0)) * stride < kv_len
    keys = plgpu.load(flat_refs[0].at[jnp.where(key_ok, at, 0)], mask=key_ok, other=0)
    s = plgpu.dot(q, keys, trans_b=True, precision=precision)
    # The 3-d refs of the masks are matched to their flat copies by identity.
    flat_of = {id(ref): flat for ref, flat in zip((bias_ref, mask_ref, kpm_ref, qpm_ref),
                                                 flat_refs[1:], strict=True)}

    def load(ref, index, other):
      n_q, n_k = ref.shape[1:]
      at = (jnp.asarray(index, jnp.int32) * n_q * n_k
            + (rows[:, None] if n_q != 1 else 0) * n_k + (cols if n_k != 1 else 0))
      ok = row_ok & inside
      at = jnp.broadcast_to(jnp.where(ok, at, 0), (block_q, groups))
      return plgpu.load(flat_of[id(ref)].at[at], mask=jnp.broadcast_to(ok, at.shape),
                        other=other)

    return jnp.where(inside, masked(s, cols, is_causal, load), -jnp.inf)

  # 1. Estimate: group maxima of the strided sample, then the rank-th largest by bisection.

  def sample(j, carry):
    maxima, sampled = carry
    s = sample_scores(j * groups)
    return (jnp.maximum(maxima, s),
            sampled + jnp.sum((s > inputs.NEG).astype(jnp.int32), axis=1))

  maxima, sampled = jax.lax.fori_loop(
      0, pl.cdiv(pl.cdiv(end, stride), groups), sample,
      (jnp.full((block_q, groups), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.int32)))
  real = maxima > inputs.NEG
  # A threshold from the sample where rank groups hold a valid key and the row's valid keys
  # (estimated: sampled ones * stride) would not fit half the room; else NEG (all of them).
  enough = ((jnp.sum(real.astype(jnp.int32), axis=1) >= opt.rank)
            & (sampled * stride > (buffer - k) // 2))
  low = jnp.where(enough, jnp.min(jnp.where(real, maxima, jnp.inf), axis=1), inputs.NEG)

  def bisect(_, interval):
    low, high = interval
    middle = low * 0.5 + high * 0.5
    ok = jnp.sum((maxima >= middle[:, None]).astype(jnp.int32), axis=1) >= opt.rank
    return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

  high = jnp.where(enough, jnp.max(maxima, axis=1), inputs.NEG)
  t = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (low, high))[0]

  # 2. Filter. Flat offsets: row i of the block starts at base[i]; its spare slot is
  #    base[i] + buffer.
  width = buffer + 1
  first = (bh * pl.num_programs(0) * block_q + r0)  # this block's first row in the outputs
  base = (first + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)) * width
  spare = (base + buffer)[:, None]
  clean_end = (jnp.minimum((g0 + 1) // tile, kv_len // tile) if is_causal else kv_len // tile)
  tiles = pl.cdiv(end, tile)

  def plain(causal, edge):
    def step(j, carry):
      count, check = carry
      s, cols, inside = scores(j * tile, tile, causal, edge)
      keep = s >= t[:, None]
      if edge:
        keep = keep & inside
      keep_i = keep.astype(jnp.int32)
      at = (base + count - 1)[:, None] + jnp.cumsum(keep_i, axis=1)
      at = jnp.where(keep, jnp.minimum(at, spare), spare)
      plgpu.store(values_ref.at[at], s, mask=keep)
      plgpu.store(slots_ref.at[at], jnp.broadcast_to(cols, s.shape), mask=keep)
      # s * 0 is NaN where s is NaN or infinite (keys past kv_len score 0: loaded as 0).
      return count + jnp.sum(keep_i, axis=1), check + jnp.sum(s * 0.0, axis=1)
    return step

  room = buffer - k  # masked ties in slots [room, buffer) in the second loop
  low_bits = (1 << _TIE_SHIFT) - 1

  def with_ties(causal, edge):
    def step(j, carry):
      count, ties, check = carry
      s, cols, inside = scores(j * tile, tile, causal, edge)
      keep = s >= t[:, None]
      if edge:
        keep = keep & inside
      masked = s == inputs.NEG
      code = ((keep & ~masked).astype(jnp.int32)
              + ((keep & masked).astype(jnp.int32) << _TIE_SHIFT))
      before = jnp.cumsum(code, axis=1) - code
      slot_above = count[:, None] + (before & low_bits)
      slot_tie = ties[:, None] + (before >> _TIE_SHIFT)
      to_above = ((code & low_bits) != 0) & (slot_above < room)
      to_tie = (code > low_bits) & (slot_tie < k)
      at = base[:, None] + jnp.where(to_above, slot_above, room + slot_tie)
      stored = to_above | to_tie
      at = jnp.where(stored, at, spare)
      plgpu.store(values_ref.at[at], s, mask=stored)
      plgpu.store(slots_ref.at[at], jnp.broadcast_to(cols, s.shape), mask=stored)
      total = jnp.sum(code, axis=1)
      return (count + (total & low_bits), ties + (total >> _TIE_SHIFT),
              check + jnp.sum(s * 0.0, axis=1))
    return step

  zeros = jnp.zeros((block_q,), jnp.int32)
  fzeros = jnp.zeros((block_q,), jnp.float32)
  last_causal = is_causal  # tiles past clean_end may cross the diagonal or kv_len

  def run_plain(_):
    carry = jax.lax.fori_loop(0, clean_end, plain(False, False), (zeros, fzeros))
    count, check = jax.lax.fori_loop(clean_end, tiles, plain(last_causal, True), carry)
    return count, zeros, check

  def run_ties(_):
    carry = jax.lax.fori_loop(0, clean_end, with_ties(False, False), (zeros, zeros, fzeros))
    return jax.lax.fori_loop(clean_end, tiles, with_ties(last_causal, True), carry)

  if plain_only:  # for the operation count: the plain loop alone
    count, ties, check = run_plain(None)
  else:
    count, ties, check = jax.lax.cond(jnp.min(t) > inputs.NEG, run_plain, run_ties, None)
  # Plain blocks may fill the whole buffer; blocks that kept masked ties, [0, room).
  over = jnp.where(jnp.min(t) > inputs.NEG, count > buffer, count > room)
  redo = over | (count + jnp.minimum(ties, k) < k) | (check != 0.0) | (check != check)
  plgpu.store(above_ref.at[pl.ds(first, block_q)], count)
  plgpu.store(ties_ref.at[pl.ds(first, block_q)], ties)
  plgpu.store(redo_ref.at[pl.ds(first, block_q)], redo.astype(jnp.int32))


def largest_array(can: inputs.Canonical, k: int, options: Options = Options()) -> int:
  """Entries of the largest array one launch for a query chunk (`can.chunk_size` queries) takes
  or writes for these inputs and options (as `topk.fused.largest_array`)."""
  b, h, _, d = can.query.shape
  opt = options.resolve(k, can.key.shape[2])
  rows = b * h * pl.cdiv(can.chunk_size, opt.block_q) * opt.block_q
  given = (can.mask, can.bias, can.key_padding_mask, can.query_padding_mask)
  return max(rows * max(d, opt.buffer + 1), math.prod(can.key.shape),
             *(math.prod(x.shape) for x in given if x is not None))


def unsupported(can: inputs.Canonical, k: int, options: Options = Options()) -> str | None:
  """Why the kernel cannot serve these inputs (dtype, head_dim, int32 offsets), or None."""
  return fused_variant.untaken(can, k) or fused_variant.too_large(
      largest_array(can, k, options))


def candidates(can: inputs.Canonical, k: int, precision: Any = None, *, interpret: bool = False,
               options: Options = Options(), plain_only: bool = False) -> Candidates:
  """Steps 1 and 2 for every query, in one launch: `Candidates` `[B, H, Lq_pad, buffer]` and
  `[B, H, Lq_pad]`.

  `plain_only` (for the operation count only: not exact) drops the loop for masked ties.
  """
  can = fused_variant.all_queries(can)
  reason = unsupported(can, k, options)
  if reason is not None:
    raise ValueError(f'topk.filter.candidates: the kernel does not take {reason}.')
  return _candidates(can, k, precision, options, interpret, can.query, 0, plain_only)


def _candidates(can: inputs.Canonical, k: int, precision: Any, options: Options,
                interpret: bool, query: jax.Array, start: Any,
                plain_only: bool = False) -> Candidates:
  """`candidates` of the query rows `query [B, H, C, D]` from row `start` of `can.query`, in one
  launch (`unsupported(can, k, options)` None for `can.chunk_size = C`): positional, as
  `fused_variant.Variant.candidates`."""
  b, h, c, _ = query.shape
  opt = options.resolve(k, can.key.shape[2])
  operands = fused_variant.operands(can, query, start, opt.block_q)
  operands = (*operands, *(None if x is None else x.reshape(-1) for x in operands[2:]))
  present = [x is not None for x in operands]

  def kernel(*refs):
    refs = iter(refs)
    ins = [next(refs) if p else None for p in present]
    _kernel(*ins[:7], ins[7:], *refs, k=k, heads=h, q_len=can.q_len, opt=opt,
            precision=precision, is_causal=can.is_causal, plain_only=plain_only,
            bias_heads=(1, 1) if can.bias is None else can.bias.shape[:2],
            mask_heads=(1, 1) if can.mask is None else can.mask.shape[:2])

  c_b = operands[1].shape[1]
  rows, width = b * h * c_b, opt.buffer + 1
  values, slots, above, ties, redo = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((rows * width,), jnp.float32),
                 jax.ShapeDtypeStruct((rows * width,), jnp.int32),
                 *(jax.ShapeDtypeStruct((rows,), jnp.int32) for _ in range(3))),
      grid=(c_b // opt.block_q, b * h), interpret=interpret, name=KERNEL_NAME,
      compiler_params=plgpu.CompilerParams(num_warps=opt.num_warps,
                                           num_stages=opt.num_stages),
  )(*(x for x in operands if x is not None))
  per_query = lambda x, *tail: x.reshape(b, h, c_b, *tail)[:, :, :c]
  return Candidates(per_query(values, width)[..., :opt.buffer],
                    per_query(slots, width)[..., :opt.buffer], per_query(above),
                    per_query(ties), per_query(redo) != 0)


def select(cands: Candidates, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Step 3: `(kept, indices, redo)`: the top k of each row's buffer (exact where not redo)."""
  values, slots, above, ties, redo = cands
  buffer = values.shape[-1]
  slot = jnp.arange(buffer)
  filled = (slot < above[..., None]) | (
      (slot >= buffer - k) & (slot < buffer - k + jnp.minimum(ties, k)[..., None]))
  kept, position = jax.lax.top_k(jnp.where(filled, values, -jnp.inf), k)
  return kept, jnp.take_along_axis(slots, position, axis=-1), redo


def kept_top_k(can: inputs.Canonical, k: int, precision: Any = None, *, interpret: bool = False,
               options: Options = Options()) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(kept float32 [B, H, Lq_pad, k], indices int32, redo bool [B, H, Lq_pad])`: the entry
  point (`fused.merge` redoes the flagged rows)."""
  return select(candidates(can, k, precision, interpret=interpret, options=options), k)


# The kernel as `topk.fused.VARIANTS['filter']`.
VARIANT = fused_variant.Variant(_candidates, select, largest_array, Options, KERNEL_NAME,
                                select_mix.select_and_mix)


def triton_modules(fn: Any, *args: Any) -> list[str]:
  """The Triton IR (text) of every Pallas-Triton kernel in `jax.jit(fn)` lowered for CUDA on
  any backend, in lowering order (nothing is compiled or run)."""
  from jax._src.pallas.triton import lowering, pallas_call_registration  # noqa: PLC0415
  texts = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):
    result = original(*a, **kw)
    texts.append(result.module.operation.get_asm())
    return result

  pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))
  finally:
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original
  return texts


def _loops(text: str) -> list[list[str]]:
  """The bodies (lines) of the `scf.for` loops of a Triton IR text, outermost first."""
  lines, loops = text.splitlines(), []
  for i, line in enumerate(lines):
    if 'scf.for' in line:
      depth, body = 0, []
      for inner in lines[i:]:
        depth += inner.count('{') - inner.count('}')
        body.append(inner)
        if depth <= 0 and len(body) > 1:
          break
      loops.append(body[1:-1])
  return loops


# Lines not counted as work: layout-only ops (free or folded in Triton's backend) and the dot.
_FREE = ('tt.splat', 'tt.broadcast', 'tt.trans', 'tt.expand_dims', 'tt.dot', 'scf.yield')


def ops_per_score(text: str, block_q: int, tile: int) -> float:
  """Operations per score of the first loop that stores (the compaction or filter loop) of a
  Triton IR text: its own lines that touch a `[block_q, tile]` tensor (an op whose region
  spans lines counts once, by its closing line), less the layout-only ones (`_FREE`) and the
  loads nothing reads (Pallas' `store` is a swap: its load is dead), plus 1/tile per op on
  `[block_q]` vectors. Pick shapes where `[block_q, tile]` is no other tensor's shape (e.g.
  head_dim != tile)."""
  loop = next(body for body in _loops(text) if any('tt.store' in x for x in body))
  tile_type, row_type = f'tensor<{block_q}x{tile}x', f'tensor<{block_q}x'
  code = [line.split(' loc(')[0].strip() for line in loop]
  count = 0.0
  for i, line in enumerate(code):
    if 'scf.for' in line:
      break  # a nested loop: not this loop's own body
    if any(op in line for op in _FREE):
      continue
    if line.startswith('%') and 'tt.load' in line:
      name = line.split(' = ')[0]
      if not any(name + ' ' in x or name + ',' in x or x.endswith(name) for x in code[i + 1:]):
        continue
    if tile_type in line:
      count += 1
    elif row_type in line and ' = ' in line:
      count += 1 / tile
  return count
