"""Tests for the one-pass filter kernel (topk.filter) in Pallas' interpreter on CPU, alone and
as the fused variant 'filter' of `topk_attention`, and its Triton IR lowered for CUDA (operation
count per score, int32 offsets, the kernel in `topk_attention`'s program).

Small shapes (the interpreter is slow): tiles of 16 keys, a sample of every 2nd key in 16
groups, so rows span several tiles, the last one partial, and both filter loops run (plain
blocks, and blocks with a row whose threshold is the masked score: causal starts, padding).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, masked_case, reference_topk, value_and_grads

import topk
from topk import filter as filt
from topk import fused, inputs, select_gpu

pytestmark = pytest.mark.usefixtures('fast_compilation')  # compilation dominates (conftest.py)

SMALL = dict(block_q=16, key_tile=16, stride=2, groups=16)


def _both(q, key, masks, k, **options):
  """The kernel's `(kept, indices, redo)` and `lax.top_k` of the dense masked scores."""
  def run(q, key, masks):
    can = inputs.canonicalize(q, key, key, **masks)
    dense = inputs.chunk_scores(can, 0, can.query, None)
    return (filt.kept_top_k(can, k, interpret=True, options=filt.Options(**options)),
            jax.lax.top_k(dense, k))

  statics = {n: v for n, v in masks.items() if n == 'is_causal'}
  arrays = {n: v for n, v in masks.items() if n != 'is_causal'}
  (kept, idx, redo), want = jax.jit(lambda q, key, m: run(q, key, m | statics))(q, key, arrays)
  return (np.asarray(kept), np.asarray(idx), np.asarray(redo)), tuple(map(np.asarray, want))


def _assert_exact_rows(got, want, tolerance):
  (kept, idx, redo), (want_kept, want_idx) = got, want
  np.testing.assert_array_equal(idx[~redo], want_idx[~redo])
  np.testing.assert_allclose(kept[~redo], want_kept[~redo], rtol=tolerance, atol=tolerance)
  assert kept.dtype == np.float32 and idx.dtype == np.int32


@pytest.mark.parametrize('dtype, integer, k', [
    (jnp.float32, True, 8),  # integer scores: exact in both products, many ties
    (jnp.bfloat16, False, 8),
    (jnp.float16, False, 5),
])
def test_masks_causal_padding_bias_equal_lax_top_k(dtype, integer, k):
  (q, key, _), masks = masked_case(dtype, integer=integer)
  got, want = _both(q, key, masks, k, **SMALL)
  _assert_exact_rows(got, want, 0 if integer else 1e-6)
  redo = got[2]
  # Only the row with a -inf bias (it broadcasts over the batch) is left over: causal starts,
  # the sequence with 5 valid keys and padded queries come out of the kernel.
  want_redo = np.zeros(redo.shape, bool)
  want_redo[:, 0, 30] = True
  np.testing.assert_array_equal(redo, want_redo)


def test_duplicate_top_keys_overflow_and_are_flagged():
  # 60 copies of the same key score highest for every query: more entries >= t than the 32
  # slots, so every row is flagged; with room enough, none is, and ties go to lower keys.
  rng = np.random.default_rng(2)
  q = jnp.asarray(np.abs(rng.standard_normal((1, 24, 1, 16))), jnp.float32)
  key = rng.standard_normal((1, 150, 1, 16))
  key[0, 40:100] = 3.0
  key = jnp.asarray(key, jnp.float32)
  for buffer, all_redone in ((32, True), (128, False)):
    got, want = _both(q, key, {}, 8, **SMALL, buffer=buffer)
    assert got[2].all() == all_redone and (got[2].any() == all_redone)
    _assert_exact_rows(got, want, 1e-6)
    if not all_redone:
      np.testing.assert_array_equal(got[1][0, 0, :, :], np.arange(40, 48)[None].repeat(24, 0))


def test_all_masked_rows_k_equal_kv_len_and_nan():
  # Rows 3 and 17 see no key; k = kv_len = 37 (not a multiple of the tile); row 5 meets a NaN.
  rng = np.random.default_rng(3)
  q = rng.standard_normal((1, 20, 1, 16)).astype(np.float32)
  key = jnp.asarray(rng.standard_normal((1, 37, 1, 16)), jnp.float32)
  mask = np.ones((1, 1, 20, 37), bool)
  mask[..., [3, 17], :] = False
  q[0, 5, 0, 0] = np.nan
  got, want = _both(jnp.asarray(q), key, dict(mask=jnp.asarray(mask)), 37, **SMALL)
  want_redo = np.zeros(got[2].shape, bool)
  want_redo[0, 0, 5] = True
  np.testing.assert_array_equal(got[2], want_redo)
  _assert_exact_rows(got, want, 1e-6)
  np.testing.assert_array_equal(got[1][0, 0, 3], np.arange(37))


def test_clustered_scores_and_lengths_off_the_block():
  # A causal, unmasked case whose top keys cluster near the diagonal (keys drift with their
  # position): the sampled threshold is loose for some rows, which are flagged, the rest exact.
  rng = np.random.default_rng(4)
  length = 70  # not a multiple of block_q or key_tile
  drift = np.linspace(0, 3, length)[None, :, None, None]
  q = jnp.asarray(rng.standard_normal((1, length, 1, 16)) + drift, jnp.float32)
  key = jnp.asarray(rng.standard_normal((1, length, 1, 16)) + drift, jnp.float32)
  got, want = _both(q, key, dict(is_causal=True), 6, **SMALL, buffer=12)
  _assert_exact_rows(got, want, 1e-5)
  assert 0 < got[2].mean() < 0.9


def test_options_are_checked():
  # Sizes when the options are built; their relation to k where k is known.
  for options, message in ((dict(block_q=24), 'block_q must be a power of two'),
                           (dict(groups=8), 'groups must be a power of two'),
                           (dict(key_tile=2**15), 'key_tile must be below 32768'),
                           (dict(stride=0), 'stride must be an integer >= 1'),
                           (dict(num_warps=2.5), 'num_warps must be an integer >= 1')):
    with pytest.raises(ValueError, match=message):
      filt.Options(**options)
  spec = jax.ShapeDtypeStruct((1, 32, 1, 16), jnp.float32)
  for k, options, message in ((4, dict(rank=5), r'rank must be in \[1, min\(k, groups\)\]'),
                              (33, {}, r'k must be in \[1, kv_len = 32\]')):
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(lambda x, k=k, options=options: filt.kept_top_k(
          inputs.canonicalize(x, x, x), k, interpret=True, options=filt.Options(**options)),
          spec)
  opt = filt.Options().resolve(64, 65536)
  assert (opt.rank, opt.groups, opt.buffer) == (32, 128, 768)
  assert filt.Options().resolve(8, 100).buffer == 256  # 3 * 8 * 8 rounded up to 128


def test_arrays_past_int32_offsets_are_refused():
  # One launch judges its own arrays: for a query chunk of 1024 at 1M tokens and 8 heads they fit
  # (the key [8 * 2**20, 64] is the largest); for all queries at once the candidate buffers
  # [8 * 2**20 rows, 769 slots] are past 2**31 entries, refused (at abstract shapes).
  spec = jax.ShapeDtypeStruct((1, 2**20, 8, 64), jnp.bfloat16)
  reasons = []
  jax.eval_shape(lambda x: reasons.extend(filt.unsupported(
      inputs.canonicalize(x, x, x, query_chunk_size=chunk), 64) for chunk in (1024, 2**20)),
                 spec)
  assert reasons[0] is None and "Triton's int32 offsets" in reasons[1]
  assert 8 * 2**20 * 769 > select_gpu.MAX_ENTRIES >= 8 * 2**20 * 64
  with pytest.raises(ValueError, match='does not take an array of 6,450,839,552 entries'):
    jax.eval_shape(lambda x: filt.candidates(inputs.canonicalize(x, x, x), 64), spec)


# Ceiling on the filter loop's operations per score (Triton IR; 19 when written), against the
# present kernel's compaction loop (51 by the same count).
OPS_CEILING = 24


def test_lowers_for_cuda_and_counts_operations_per_score():
  spec = jax.ShapeDtypeStruct((1, 1024, 1, 64), jnp.bfloat16)
  plain = lambda q, key: filt.candidates(inputs.canonicalize(q, key, key), 64, plain_only=True,
                                         options=filt.Options(block_q=64, key_tile=128))
  (text,) = filt.triton_modules(plain, spec, spec)
  ops = filt.ops_per_score(text, 64, 128)
  (present,) = filt.triton_modules(
      lambda q, key: fused.candidates(inputs.canonicalize(q, key, key), 64), spec, spec)
  present_ops = filt.ops_per_score(present, 32, 128)
  print(f'ops per score: filter {ops:.2f}, present kernel {present_ops:.2f}')
  assert 10 < ops <= OPS_CEILING < present_ops
  # The full kernel (both loops, masks, causal) lowers for CUDA and is found by name.
  masks = dict(mask=jax.ShapeDtypeStruct((1, 1, 1024, 1024), bool),
               bias=jax.ShapeDtypeStruct((1, 1, 1024, 1024), jnp.float32),
               key_padding_mask=jax.ShapeDtypeStruct((1, 1024), bool))
  full = lambda q, key, m: filt.kept_top_k(
      inputs.canonicalize(q, key, key, is_causal=True, **m), 64)
  lowered = jax.jit(full).trace(spec, spec, masks).lower(lowering_platforms=('cuda',))
  assert fused.runs_kernel(lowered, 'filter') and not fused.runs_kernel(lowered)


@pytest.mark.slow  # a benchmark run, end to end
def test_benchmark_runs_on_cpu_with_tiny_shapes(tmp_path):
  from benchmarks import filter as bench  # noqa: PLC0415
  rows = bench.main(['--check_length', '48', '--lengths', '64', '--causal', 'true',
                     '--heads', '1', '--head_dim', '16', '--k', '4', '--dtypes', 'float32',
                     '--repeats', '1', '--tilings', '16:16:4:2', '--small', 'groups=16',
                     '--out', str(tmp_path)])
  checks = [r for r in rows if r['stage'] == 'check']
  assert [r['name'] for r in checks] == ['filter', 'select_mix'] * 2
  assert all(r['detail'].startswith('PASS') for r in checks)
  timed = [r for r in rows if r['stage'] == 'time']
  assert [r['name'][:6] for r in timed] == ['presen', 'filter']
  assert all(r['ms'] > 0 for r in timed) and timed[1]['candidates'] >= 4
  assert (tmp_path / 'filter.csv').read_text().count('\n') == len(rows) + 1


# `topk_attention` with the filter variant, in the interpreter on CPU: rows the kernel leaves
# are redone in sub-chunks of 8 queries per chunk of 16.
def _on_cpu(**options) -> fused.FusedOptions:
  return fused.FusedOptions(variant='filter', platforms=('cpu',),
                            tuning=filt.Options(**SMALL | options), redo_rows=8)


def _attention_case(dtype, length=56, heads=2, depth=16):
  """`(q, k, v)` `[2, length, heads, depth]`, `topk_attention`'s masking arguments (a full
  mask, causal, key padding with 5 valid keys in the second sequence, query padding) and the
  one mask they make together, for the reference."""
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal((2, length, heads, depth)), dtype)
             for _ in range(3))
  masks = dict(is_causal=True,
               mask=jnp.asarray(rng.uniform(size=(1, 1, length, length)) < 0.9),
               key_padding_mask=jnp.arange(length) < jnp.array([[length], [5]]),
               query_padding_mask=jnp.arange(length) < jnp.array([[length], [45]]))
  combined = (masks['mask'] & jnp.tril(jnp.ones((length, length), bool))
              & masks['key_padding_mask'][:, None, None, :]
              & masks['query_padding_mask'][:, None, :, None])
  bias = jnp.asarray(rng.standard_normal((1, heads, length, length)), jnp.float32)
  return (q, k, v, bias), masks, combined


@pytest.mark.slow  # the interpreted kernel inside attention, forward and backward
@pytest.mark.parametrize('dtype, k, options, tolerance', [
    (jnp.float32, 6, {}, 1e-5),
    (jnp.bfloat16, 4, {}, 2e-2),
    # 12 slots for k 6: most rows overflow and are redone by the unfused path.
    (jnp.float32, 6, dict(buffer=12), 1e-5),
])
def test_topk_attention_with_the_filter_equals_unfused_and_reference(dtype, k, options,
                                                                     tolerance):
  args, masks, combined = _attention_case(dtype)
  fn = lambda q, key, v, bias, fused=True: topk.topk_attention(
      q, key, v, bias=bias, k=k, query_chunk_size=16, fused=fused,  # 16 does not divide 56
      fused_options=_on_cpu(**options), **masks)
  assert fused.runs_kernel(jax.jit(fn).lower(*args), 'filter')
  got = value_and_grads(fn, args)
  assert_close(got, value_and_grads(lambda *a: fn(*a, fused=False), args), tolerance)
  reference = lambda q, key, v, bias: reference_topk(
      *(x.astype(jnp.float32) for x in (q, key, v)), k, mask=combined, bias=bias)[0]
  assert_close(got, value_and_grads(reference, args), 2 * tolerance)
  if options:  # the redo path ran: the kernel flagged rows of these inputs
    statics = dict(is_causal=True)
    arrays = {n: x for n, x in masks.items() if n != 'is_causal'}
    redo = jax.jit(lambda q, key, bias, m: filt.kept_top_k(
        inputs.canonicalize(q, key, key, bias=bias, **m, **statics), k, interpret=True,
        options=filt.Options(**SMALL | options))[2])(args[0], args[1], args[3], arrays)
    assert 0.1 < np.asarray(redo).mean() < 1


def test_topk_attention_lowers_the_filter_kernel_for_cuda():
  # Chosen by `FusedOptions(variant='filter')`, on CUDA, the forward runs the filter kernel and
  # not the compact one; by default (compact) the other way round.
  spec, length = jax.ShapeDtypeStruct, 1000
  args = (spec((1, length, 2, 64), jnp.bfloat16),) * 3
  masks = dict(bias=spec((1, 2, length, length), jnp.float32),
               key_padding_mask=spec((1, length), bool))

  def lowered(options):
    def grads(args, masks):
      loss = lambda *a: jnp.sum(topk.topk_attention(
          *a, k=64, query_chunk_size=256, is_causal=True, fused_options=options, **masks))
      return jax.grad(loss, argnums=(0, 1, 2))(*args)
    return jax.jit(grads).trace(args, masks).lower(lowering_platforms=('cuda',))

  filtered = lowered(fused.FusedOptions(variant='filter'))
  assert fused.runs_kernel(filtered, 'filter') and not fused.runs_kernel(filtered)
  compact = lowered(fused.FusedOptions())
  assert fused.runs_kernel(compact) and not fused.runs_kernel(compact, 'filter')


def test_fused_options_hold_the_variants_tuning():
  assert fused.FusedOptions().variant == 'compact'  # the filter stays off by default
  assert fused.FusedOptions(variant='filter').tuning == filt.Options()
  assert fused.FusedOptions().tuning == fused.Tiling()
  with pytest.raises(ValueError, match="tuning of variant 'filter' must be a topk.filter.Options"):
    fused.FusedOptions(variant='filter', tuning=fused.Tiling())
  with pytest.raises(ValueError, match="tuning of variant 'compact' must be a topk.fused.Tiling"):
    fused.FusedOptions(tuning=filt.Options())
