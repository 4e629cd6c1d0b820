"""A fused score-and-select Pallas kernel (Triton backend) for `topk_attention`'s forward.

The unfused forward writes each query chunk's float32 scores `[C, kv_len]` to memory and reads
them back to select. Here one kernel instance per block of `block_q` queries streams the keys
tile by tile, computes the scaled, biased, masked scores of each tile in fast memory (`dot`)
and writes only a small buffer of candidates per query, `[B, H, Lq, buffer]`:

1. bound: the maximum of each of `G` strided key groups (key `j` is in group `j mod G`,
   `G >= k`), then a value `t` with at least k group maxima at or above it, found by bisection
   (it ends within a millionth of the k-th largest maximum). Those k maxima are k distinct
   entries, so `t` is at most the row's k-th largest score.
2. compaction: the scores are recomputed tile by tile; entries `>= t` above the masked score
   `inputs.NEG` go, in key order, to the row's candidate buffer, and entries equal to `NEG`
   (masked keys) to a second region of `k` slots, so rows with fewer than k valid keys (causal
   starts, padding) stay exact without storing every masked key. One `cumsum` of the two kinds'
   packed counts places both; the counts carry across tiles.
3. selection, outside the kernel: `lax.top_k` of each row's buffer (a few hundred slots).
   Every entry that can be in the top k is in the buffer, in key order, masked ones after the
   rest, and `lax.top_k` prefers the lower slot among equal values, so the kept values and
   indices equal `lax.top_k` of the dense scores, tie order included. Exactness is per row up
   to the score product's rounding: Triton's and XLA's products may round differently, so two
   keys whose scores differ by that much may swap.

A row whose buffer overflows, or that holds a NaN score or one below `NEG` (a bias of -inf),
comes back flagged in `redo`; `merge` takes such rows from the unfused selection. On a GPU,
`platforms` chooses the kernel only for a configuration that `compiles` (checked once, on a
small copy of the inputs), so a Triton failure costs speed, not the program.

Launches: `topk_attention` launches the kernel once per query chunk (`Variant.candidates`
takes the chunk's queries and its first row), so the candidate buffers (float32 and int32) are
O(C * k) per chunk, never `[Lq, kv_len]`, and no buffer nears Triton's int32 offsets at any
length; `candidates` and `kept_top_k` launch once for all queries.

Variants: `VARIANTS` maps a name to the functions `topk_attention` calls for a fused kernel
(`topk.fused_variant.Variant`): this module's kernel is 'compact' (the default), `topk.filter`'s
one-pass kernel 'filter'. `FusedOptions` (a field of `topk.AttentionSpec`) names the variant,
the platforms it runs on and its tuning options (`Tiling` here), so another kernel is one more
entry in `VARIANTS`.

Speed: the kernel is tested in Pallas' interpreter and lowered for CUDA on CPU; its GPU time is
measured by `benchmarks.fused` (benchmarks/README.md has the figures and the code they measured).
"""
import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from topk import filter as filt
from topk import fused_variant, inputs, select_gpu
from topk.fused_variant import Variant

# Platforms where the kernel compiles with Triton; on 'cpu' it runs in Pallas' interpreter.
GPU_PLATFORMS = ('cuda',)
# The 'compact' kernel's name in lowered programs (`runs_kernel`).
KERNEL_NAME = 'topk_fused_candidates'


class Candidates(NamedTuple):
  """Each query's candidate buffer (the kernel's output), `[..., buffer]` and `[...]`.

  Slots `[0, above)` hold the candidates above the masked score in key order, slots
  `[buffer - k - 1, buffer - k - 1 + min(ties, k))` the first masked keys; other slots hold
  nothing. `above > buffer - k - 1` (overflow) or `bad > 0` (a NaN score, or one below the
  masked score) mark a row the kernel cannot select exactly.
  """
  values: jax.Array  # float32 scores
  slots: jax.Array  # int32 key indices
  above: jax.Array  # int32
  ties: jax.Array  # int32
  bad: jax.Array  # int32


def _row_block(ref: jax.Array | None, index: jax.Array, rows: jax.Array, r0: jax.Array,
               c0: jax.Array, block_q: int, tile: int, q_len: int, kv_len: int,
               other: Any) -> jax.Array | None:
  """Loads tile `[block_q|1, tile|1]` at `(r0, c0)` of `ref [N, Lq|1, Lk|1]` entry `index`,
  keeping its broadcast axes of size 1; `other` outside `[q_len, kv_len]`."""
  if ref is None:
    return None
  lq, lk = ref.shape[1:]
  row_ok = (rows < q_len)[:, None] if lq != 1 else jnp.ones((1, 1), bool)
  col_ok = (c0 + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1) < kv_len) if lk != 1 else (
      jnp.ones((1, 1), bool))
  index = jnp.asarray(index, jnp.int32)  # also where the entry is always 0
  return plgpu.load(ref.at[index, pl.ds(r0, block_q) if lq != 1 else pl.ds(0, 1),
                           pl.ds(c0, tile) if lk != 1 else pl.ds(0, 1)],
                    mask=row_ok & col_ok, other=other)


# Bisection steps of the bound: each halves the interval that holds the k-th largest group
# maximum, so after 20 the bound is within a millionth of the row's range below it.
BISECTION_STEPS = 20
# Bits of the packed per-tile counts (candidates below, masked ties above): tiles of at most
# 2**15 keys.
_TIE_SHIFT = 16


def _kernel(start_ref, q_ref, key_ref, bias_ref, mask_ref, kpm_ref, qpm_ref, values_ref,
            slots_ref, above_ref, ties_ref, bad_ref, *, k: int, heads: int,
            bias_heads: tuple[int, int], mask_heads: tuple[int, int], is_causal: bool,
            q_len: int, block_q: int, groups: int, tile: int, buffer: int, precision: Any):
  """One block of `block_q` queries of one (batch, head): see the module docstring.

  Refs (`fused_variant.operands`): `start [1]`, the launch's first query row in `can.query`;
  `q [BH, C_b, D]` (scaled), `key [BH, Lk, D]`, `bias [Nb, Lq|1, Lk|1]` float32 and
  `mask [Nm, Lq|1, Lk|1]` int8 (entry chosen by `bias_heads`/`mask_heads`: their batch and head
  counts, 1 if broadcast), `kpm [B, 1, Lk]` and `qpm [B, Lq, 1]` int8, indexed by the rows of
  `can.query`; outputs: the candidate buffers `values, slots [BH * C_b, buffer]` and per row
  `[BH * C_b]` int32: the candidates above the masked score (`above`), the masked ties (`ties`)
  and the invalid scores (`bad`: NaN, or below the masked score). Absent refs are None.
  """
  bh, r0 = pl.program_id(0), pl.program_id(1) * block_q
  b, h = bh // heads, bh % heads
  kv_len = key_ref.shape[1]
  g0 = start_ref[0] + r0  # the block's first row in `can.query`: masks, bias, causality
  rows = g0 + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  q = plgpu.load(q_ref.at[bh, pl.ds(r0, block_q), :])
  entry = lambda counts: (b if counts[0] != 1 else 0) * counts[1] + (h if counts[1] != 1 else 0)

  def scores(c0, width):
    # Masked float32 scores [block_q, width] of keys c0 ... c0 + width - 1, as
    # `inputs.chunk_scores`; keys past kv_len are marked by `inside`.
    cols = c0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, width), 1)
    inside = cols < kv_len
    key_ok = c0 + jax.lax.broadcasted_iota(jnp.int32, (width, 1), 0) < kv_len
    keys = plgpu.load(key_ref.at[bh, pl.ds(c0, width), :], mask=key_ok, other=0)
    s = plgpu.dot(q, keys, trans_b=True, precision=precision)
    load = functools.partial(_row_block, rows=rows, r0=g0, c0=c0, block_q=block_q, tile=width,
                             q_len=q_len, kv_len=kv_len)
    if bias_ref is not None:
      s = s + load(bias_ref, entry(bias_heads), other=0.0)
    valid = None
    for ok in (None if mask_ref is None else load(mask_ref, entry(mask_heads), other=1) != 0,
               cols <= rows[:, None] if is_causal else None,
               None if kpm_ref is None else load(kpm_ref, b, other=1) != 0,
               None if qpm_ref is None else load(qpm_ref, b, other=1) != 0):
      if ok is not None:
        valid = ok if valid is None else valid & ok
    return (s if valid is None else jnp.where(valid, s, inputs.NEG)), cols, inside

  # 1. The bound: maxima of strided groups (groups past kv_len count as masked), then a value
  #    with at least k of them at or above it, by bisection up from a value that has.
  def group_maxima(j, maxima):
    s, _, inside = scores(j * groups, groups)
    return jnp.maximum(maxima, jnp.where(inside, s, inputs.NEG))

  maxima = jax.lax.fori_loop(0, pl.cdiv(kv_len, groups), group_maxima,
                             jnp.full((block_q, groups), inputs.NEG, jnp.float32))

  def bisect(_, interval):
    low, high = interval
    middle = low * 0.5 + high * 0.5  # halves first: no overflow across float32's range
    enough = jnp.sum((maxima >= middle[:, None]).astype(jnp.int32), axis=1) >= k
    return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

  # Start at the least maximum above the masked score where k maxima are above it (masked or
  # empty groups would leave the bisection far below every real score), else at NEG.
  real = maxima > inputs.NEG
  low = jnp.min(jnp.where(real, maxima, jnp.inf), axis=1)
  low = jnp.where(jnp.sum(real.astype(jnp.int32), axis=1) >= k, low, inputs.NEG)
  bound = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (low, jnp.max(maxima, axis=1)))[0]

  # 2. Compaction: candidates above NEG in slots [0, room), masked ties in [room, room + k),
  #    both placed by one cumsum of their packed counts; lanes not stored point at the spare
  #    last slot (the interpreter writes masked-out lanes too).
  room = buffer - k - 1
  first = bh * pl.num_programs(1) * block_q + r0  # of this block in the candidate buffers
  row_ids = jax.lax.broadcasted_iota(jnp.int32, (block_q, tile), 0) + first
  low_bits = (1 << _TIE_SHIFT) - 1

  def compact(j, carry):
    above, ties, bad = carry
    s, cols, inside = scores(j * tile, tile)
    keep = inside & (s >= bound[:, None])
    code = ((keep & (s > inputs.NEG)).astype(jnp.int32)
            + ((keep & (s == inputs.NEG)).astype(jnp.int32) << _TIE_SHIFT))
    before = jnp.cumsum(code, axis=1) - code  # kept entries before each, both kinds packed
    slot_above = above[:, None] + (before & low_bits)
    slot_tie = ties[:, None] + (before >> _TIE_SHIFT)
    to_above = ((code & low_bits) != 0) & (slot_above < room)
    to_tie = (code > low_bits) & (slot_tie < k)
    slot = jnp.where(to_above, slot_above, jnp.where(to_tie, room + slot_tie, buffer - 1))
    stored = to_above | to_tie
    plgpu.store(values_ref.at[row_ids, slot], s, mask=stored)
    plgpu.store(slots_ref.at[row_ids, slot], cols, mask=stored)
    total = jnp.sum(code, axis=1)
    return (above + (total & low_bits), ties + (total >> _TIE_SHIFT),
            bad | (inside & ~(s >= inputs.NEG)).astype(jnp.int32))

  zeros = jnp.zeros((block_q,), jnp.int32)
  above, ties, bad = jax.lax.fori_loop(0, pl.cdiv(kv_len, tile), compact,
                                       (zeros, zeros, jnp.zeros((block_q, tile), jnp.int32)))
  for ref, count in ((above_ref, above), (ties_ref, ties), (bad_ref, jnp.max(bad, axis=1))):
    plgpu.store(ref.at[pl.ds(first, block_q)], count)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """The kernel's tuning options; the sizes are checked here, their relations to k by
  `resolve` (where k is known).

  block_q: queries per kernel instance (16 and 32 timed fastest on an H100 at 16K tokens;
  larger blocks read the keys fewer times); key_tile: keys per compaction step; groups: strided
  key groups of the bound (default: `max(key_tile, 2k)` rounded up to a power of two), also the
  keys per bound step; buffer: candidate slots per row, at least `2k + 1` (default `max(4k, 64)`
  rounded up to a power of two, less where kv_len needs less); all powers of two, the first
  three at least 16 (Triton's dot). num_warps, num_stages: Triton's.
  """
  block_q: int = 32
  key_tile: int = 128
  groups: int | None = None
  buffer: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    sizes = dict(block_q=self.block_q, key_tile=self.key_tile, groups=self.groups,
                 buffer=self.buffer)
    for name, size in sizes.items():
      if size is None and name in ('groups', 'buffer'):
        continue
      if not (isinstance(size, int) and fused_variant.power_of_2(size)
              and (name == 'buffer' or size >= 16)):
        raise ValueError(f'topk.fused.Tiling: {name} must be a power of two (>= 16 but '
                         f'buffer), got {size!r}.')
    for name in ('num_warps', 'num_stages'):
      inputs.check_positive_int(getattr(self, name), f'topk.fused.Tiling: {name}')

  def resolve(self, k: int, kv_len: int) -> 'Tiling':
    """These options for `k` of `kv_len` keys (`1 <= k <= kv_len`), defaults filled in; raises
    ValueError unless groups >= k and buffer >= 2k + 1."""
    groups = self.groups or max(self.key_tile, select_gpu.next_power_of_2(2 * k))
    buffer = self.buffer or min(select_gpu.next_power_of_2(max(4 * k, 64)),
                                select_gpu.next_power_of_2(kv_len + k + 1))
    if groups < k or buffer < 2 * k + 1:
      raise ValueError(f'topk.fused: needs groups >= k and buffer >= 2k + 1 (k = {k}), got '
                       f'groups {groups}, buffer {buffer}.')
    return dataclasses.replace(self, groups=groups, buffer=buffer)


def largest_array(can: inputs.Canonical, k: int, tiling: Tiling = Tiling()) -> int:
  """Entries of the largest array one launch for a query chunk (`can.chunk_size` queries)
  addresses: its query `[B*H, C_b, D]` (C rounded up to block_q), the key `[B*H, Lk, D]`, the
  whole mask, bias and padding masks, or the candidate buffers `[B*H*C_b, buffer]` it writes.

  The kernel takes none past `select_gpu.MAX_ENTRIES` (Triton's int32 offsets). Launched per
  query chunk, the buffers stay far below it (8 heads, chunk 1024, buffer 256: 2M entries); the
  key reaches it at 4M tokens for 8 heads and head_dim 64, a full `[Lq_pad, kv_len]` mask or
  bias past 46,340 tokens. `compiles` cannot see it: it compiles for `PROBE_LENGTH` tokens.
  """
  b, h, _, d = can.query.shape
  tiling = tiling.resolve(k, can.key.shape[2])
  rows = b * h * pl.cdiv(can.chunk_size, tiling.block_q) * tiling.block_q
  given = (can.mask, can.bias, can.key_padding_mask, can.query_padding_mask)
  return max(rows * max(d, tiling.buffer), math.prod(can.key.shape),
             *(math.prod(x.shape) for x in given if x is not None))


def unsupported(can: inputs.Canonical, k: int, tiling: Tiling = Tiling()) -> str | None:
  """Why the kernel cannot serve these inputs with this `tiling` (the unfused path then runs),
  or None."""
  return fused_variant.untaken(can, k) or fused_variant.too_large(largest_array(can, k, tiling))


def runs_kernel(lowered: jax.stages.Lowered, variant: str = 'compact') -> bool:
  """Whether a lowered program runs `variant`'s kernel (a key of `VARIANTS`): `topk_attention`
  falls back to the unfused path where the kernel does not take the inputs or does not compile,
  and only the program says which. Its text with debug information names the kernel wherever it
  is (Triton or interpreted)."""
  return VARIANTS[variant].kernel_name in lowered.as_text(debug_info=True)


@functools.cache
def _say(message: str, level: int = logging.INFO) -> None:
  logging.getLogger(__name__).log(level, message)


# Length of the small copy of the inputs `compiles` compiles the kernel for, and its answers.
PROBE_LENGTH = 256
_COMPILES: dict[tuple, bool] = {}


def compiles(can: inputs.Canonical, k: int, precision: Any = None,
             options: 'FusedOptions | None' = None, *, interpret: bool = False) -> bool:
  """Whether `options`' kernels (default `FusedOptions()`) compile, on the default backend, for
  inputs like these (the same dtype, head_dim, masks, bias and broadcasting, `k` and options, at
  `PROBE_LENGTH` tokens).

  The answer is kept per configuration, so a process compiles each one once (a second or two
  with Triton). A failure is logged as a warning with the compiler's message: the caller then
  runs the unfused path instead of failing the whole program.
  """
  options = options or FusedOptions()
  length = max(PROBE_LENGTH, k)
  def small(x, axes):  # x with its sequence axes (those not broadcast) at `length`
    if x is None:
      return None
    shape = [length if axis in axes and n != 1 else n for axis, n in enumerate(x.shape)]
    return jax.ShapeDtypeStruct(shape, x.dtype)

  axes = dict(query=(2,), key=(2,), value=(2,), mask=(2, 3), bias=(2, 3), key_padding_mask=(1,),
              query_padding_mask=(1,))
  probe = dataclasses.replace(can, q_len=length, chunk_size=length, **{
      name: small(getattr(can, name), a) for name, a in axes.items()})
  signature = (probe, k, repr(precision), options, interpret, jax.default_backend())
  if signature not in _COMPILES:
    variant = VARIANTS[options.variant]

    def kernels(p):  # every kernel `options` runs, on the probe
      state = variant.candidates(fused_variant.prepared(p), k, precision, options.tuning,
                                 interpret, p.query, 0)
      if options.mix_in_kernel:
        return variant.select_and_mix(state, p.value, k, p.weights_dtype, interpret=interpret)
      return state

    try:
      jax.jit(kernels).lower(probe).compile()
      _COMPILES[signature] = True
    except Exception as error:  # noqa: BLE001 (Triton's and XLA's errors have many types)
      first_line = (str(error).strip().splitlines() or [''])[0]
      _say(f'top-k attention: the fused kernel does not compile here ({type(error).__name__}: '
           f'{first_line}); the unfused path runs instead', logging.WARNING)
      _COMPILES[signature] = False
  return _COMPILES[signature]


def platforms(can: inputs.Canonical, k: int, precision: Any,
              options: 'FusedOptions') -> tuple[str, ...]:
  """The platforms of `options.platforms` where `topk_attention` runs the kernel on these inputs
  (none if it does not take them, or, on a GPU, if it does not compile for them: `compiles`);
  logs the choice once per distinct message.

  Inputs past one launch's int32 offsets (`Variant.largest_array`: the key, or a full mask or
  bias, past the limit alone) go to the unfused path whole, with a warning: it is slower and
  needs a query chunk's dense scores.
  """
  reason, level = fused_variant.untaken(can, k), logging.INFO
  too_large = None if reason or not options.platforms else fused_variant.too_large(
      VARIANTS[options.variant].largest_array(can, k, options.tuning))
  if too_large:
    reason, level = too_large, logging.WARNING
  chosen = () if reason else tuple(sorted(options.platforms))
  if (jax.default_backend() == 'gpu' and set(chosen) & set(GPU_PLATFORMS)
      and not compiles(can, k, precision, options)):
    chosen = tuple(p for p in chosen if p not in GPU_PLATFORMS)
    reason = 'it does not compile on this GPU'
  if chosen:
    _say(f'top-k attention: fused kernel on {", ".join(chosen)}, unfused elsewhere')
  else:
    _say(f'top-k attention: unfused ({reason or "FusedOptions.platforms is empty"})', level)
  return chosen


def _candidates(can: inputs.Canonical, k: int, precision: Any, tiling: Tiling, interpret: bool,
                query: jax.Array, start: Any) -> Candidates:
  """`candidates` of the query rows `query [B, H, C, D]` from row `start` of `can.query`, in one
  launch (`unsupported(can, k, tiling)` None for `can.chunk_size = C`, `1 <= k <= kv_len`)."""
  b, h, c, _ = query.shape
  tiling = tiling.resolve(k, can.key.shape[2])
  block_q, buffer = tiling.block_q, tiling.buffer
  operands = fused_variant.operands(can, query, start, block_q)
  present = [x is not None for x in operands]

  def kernel(*refs):
    refs = iter(refs)
    ins = [next(refs) if p else None for p in present]
    _kernel(*ins, *refs, k=k, heads=h, q_len=can.q_len, block_q=block_q, groups=tiling.groups,
            tile=tiling.key_tile, buffer=buffer, precision=precision, is_causal=can.is_causal,
            bias_heads=(1, 1) if can.bias is None else can.bias.shape[:2],
            mask_heads=(1, 1) if can.mask is None else can.mask.shape[:2])

  c_b = operands[1].shape[1]
  rows = b * h * c_b
  values, slots, above, ties, bad = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((rows, buffer), jnp.float32),
                 jax.ShapeDtypeStruct((rows, buffer), jnp.int32),
                 *(jax.ShapeDtypeStruct((rows,), jnp.int32) for _ in range(3))),
      grid=(b * h, c_b // block_q), interpret=interpret, name=KERNEL_NAME,
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages),
  )(*(x for x in operands if x is not None))
  per_query = lambda x: x.reshape(b, h, c_b, *x.shape[1:])[:, :, :c]
  return Candidates(*map(per_query, (values, slots, above, ties, bad)))


def candidates(can: inputs.Canonical, k: int, precision: Any = None, *, interpret: bool = False,
               tiling: Tiling = Tiling()) -> Candidates:
  """Steps 1 and 2: the candidates for the top k of every query, without the dense scores.

  Args:
    can: canonical inputs (`unsupported(can, k, tiling)` must be None); their masks, bias and
      `is_causal` apply as in `inputs.chunk_scores`.
    k: keys kept per query, `1 <= k <= kv_len`.
    precision: the score product's precision (`dot`'s).
    interpret: run in Pallas' interpreter (any platform) instead of compiling with Triton.
    tiling: the kernel's tuning options.

  Returns:
    `Candidates` with `values, slots [B, H, Lq_pad, buffer]` and counts `[B, H, Lq_pad]`.
  """
  kv_len = can.key.shape[2]
  if not 1 <= k <= kv_len:
    raise ValueError(f'topk.fused.candidates: k must be in [1, kv_len = {kv_len}], got {k}.')
  can = fused_variant.all_queries(can)
  reason = unsupported(can, k, tiling)
  if reason is not None:
    raise ValueError(f'topk.fused.candidates: the kernel does not take {reason}.')
  return _candidates(can, k, precision, tiling, interpret, can.query, 0)


def select(candidates: Candidates, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Step 3: the top k of each row's candidate buffer, `(kept, indices, redo)` `[..., k]`.

  The filled slots hold every entry that can be in the row's top k, in key order, masked ones
  after the rest, and `lax.top_k` prefers the lower slot among equal values: the result equals
  `lax.top_k` of the dense scores, ties included, where `redo` is False.
  """
  values, slots, above, ties, bad = candidates
  room = values.shape[-1] - k - 1
  slot = jnp.arange(values.shape[-1])
  filled = (slot < above[..., None]) | (
      (slot >= room) & (slot < room + jnp.minimum(ties, k)[..., None]))
  kept, position = jax.lax.top_k(jnp.where(filled, values, -jnp.inf), k)
  return kept, jnp.take_along_axis(slots, position, axis=-1), (above > room) | (bad > 0)


def kept_top_k(can: inputs.Canonical, k: int, precision: Any = None, *,
               interpret: bool = False,
               tiling: Tiling = Tiling()) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`select(candidates(can, k, precision, ...), k)`: `(kept float32 [B, H, Lq_pad, k],
  indices int32 [B, H, Lq_pad, k], redo bool [B, H, Lq_pad])`, the kept scores in descending
  order and their keys, exact (as `lax.top_k` of the masked scores) where `redo` is False."""
  return select(candidates(can, k, precision, interpret=interpret, tiling=tiling), k)


def merge(rows: tuple[jax.Array, ...], redo: jax.Array,
          unfused: Callable[[], tuple[jax.Array, ...]]) -> tuple[jax.Array, ...]:
  """The kernel's per-row arrays `rows` (each `[B, H, C, ...]`), with the rows flagged in
  `redo [B, H, C]` taken from `unfused()` (a thunk giving the same arrays for the same rows),
  which runs only if some row is flagged."""
  def redo_rows():
    flag = lambda x: redo.reshape(redo.shape + (1,) * (x.ndim - redo.ndim))
    return tuple(jnp.where(flag(x), again, x) for x, again in zip(rows, unfused(), strict=True))

  return jax.lax.cond(jnp.any(redo), redo_rows, lambda: tuple(rows))


# The fused kernels by name (`FusedOptions.variant`): 'compact', the bound-then-compaction
# kernel of the module docstring; 'filter', the one-pass estimate-and-filter kernel of
# `topk.filter` (off by default: its GPU speed is not yet measured).
VARIANTS: dict[str, Variant] = {
    'compact': Variant(_candidates, select, largest_array, Tiling, KERNEL_NAME),
    'filter': filt.VARIANT,
}


@dataclasses.dataclass(frozen=True)
class FusedOptions:
  """Which fused kernel `topk_attention` runs, where and how (`topk.AttentionSpec.fused_options`).

  Attributes:
    variant: a key of `VARIANTS`.
    platforms: where the kernel selects (for inputs it takes; `unsupported` says which), the
      unfused path elsewhere: NVIDIA GPUs ('cuda'); 'cpu' runs the kernel in Pallas'
      interpreter (tests).
    tuning: the variant's tuning options, an instance of its `tuning_type` (`Tiling` for
      'compact', `topk.filter.Options` for 'filter'); None (the default) for that type's
      defaults.
    redo_rows: queries per sub-chunk (at most; a divisor of the query chunk) in which the rows
      the kernel leaves are redone: their dense scores would otherwise be the fused path's
      largest temporary.
    mix_in_kernel: select the kept keys and mix their values in a second kernel (the
      variant's `select_and_mix`: 'filter' has one, `topk.select_mix`) instead of `lax.top_k`
      of the candidate buffers and XLA's gathers; for the softmax kernel without dropout (the
      XLA mix runs otherwise). Off by default: not yet timed on a GPU.
  """
  variant: str = 'compact'
  platforms: tuple[str, ...] = ('cuda',)
  tuning: Tiling | filt.Options | None = None
  redo_rows: int = 128
  mix_in_kernel: bool = False

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f'Unknown fused kernel {self.variant!r}; valid variants: '
                       f'{sorted(VARIANTS)}.')
    valid = {'cpu', *GPU_PLATFORMS}
    if not isinstance(self.platforms, tuple) or not set(self.platforms) <= valid:
      raise ValueError(f'topk.fused.FusedOptions: platforms must be a tuple of {sorted(valid)}, '
                       f'got {self.platforms!r} (unknown platforms).')
    tuning_type = VARIANTS[self.variant].tuning_type
    if self.tuning is None:  # a frozen dataclass: its own field, set once here
      object.__setattr__(self, 'tuning', tuning_type())
    if not isinstance(self.tuning, tuning_type):
      raise ValueError(f'topk.fused.FusedOptions: tuning of variant {self.variant!r} must be a '
                       f'{tuning_type.__module__}.{tuning_type.__qualname__}, got '
                       f'{self.tuning!r}.')
    inputs.check_positive_int(self.redo_rows, 'topk.fused.FusedOptions: redo_rows')
    inputs.check_bool(self.mix_in_kernel, 'topk.fused.FusedOptions: mix_in_kernel')
    if self.mix_in_kernel and VARIANTS[self.variant].select_and_mix is None:
      raise ValueError(f'topk.fused.FusedOptions: variant {self.variant!r} has no kernel that '
                       'selects and mixes (mix_in_kernel=True); variants that do: '
                       f'{sorted(v for v, x in VARIANTS.items() if x.select_and_mix)}.')


def check_options(options: Any) -> None:
  """Raises ValueError unless `options` is a `FusedOptions` (whose fields it checked when it
  was built)."""
  if not isinstance(options, FusedOptions):
    raise ValueError(f'fused_options must be a topk.fused.FusedOptions, got {options!r}.')
