"""Tests for the select-and-mix kernel (topk.select_mix) in Pallas' interpreter on CPU: against
`topk.filter.select` and the XLA mix, alone and inside `topk_attention`
(`FusedOptions(mix_in_kernel=True)`), and its Triton IR lowered for CUDA.

Candidates come from the filter kernel with small tiles (as tests/test_filter.py), so rows span
several tiles, plain blocks and blocks that keep masked ties both occur, and the buffers hold a
few dozen entries.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, masked_case, value_and_grads

import topk
from topk import filter as filt
from topk import fused, inputs, select_gpu, select_mix
from topk.topk_attention import _mix_rows

pytestmark = pytest.mark.usefixtures('fast_compilation')  # compilation dominates (conftest.py)

SMALL = dict(block_q=16, key_tile=16, stride=2, groups=16)


def _by_score(kept, idx):
  """Each row's entries by descending score, ties by ascending key (`lax.top_k`'s order)."""
  kept, idx = np.asarray(kept), np.asarray(idx)
  order = np.lexsort((idx, -kept), axis=-1)
  return np.take_along_axis(kept, order, -1), np.take_along_axis(idx, order, -1)


def _both(q, key, value, masks, k, weights_dtype=jnp.float32, **options):
  """The kernel's `(out, kept, idx, redo)` and the reference: `filter.select` of the same
  candidates and `_mix_rows` of their softmax."""
  statics = {n: v for n, v in masks.items() if n == 'is_causal'}
  arrays = {n: v for n, v in masks.items() if n != 'is_causal'}

  def run(q, key, value, arrays):
    can = inputs.canonicalize(q, key, value, **arrays, **statics)
    cands = filt.candidates(can, k, interpret=True, options=filt.Options(**SMALL | options))
    got = select_mix.select_and_mix(cands, can.value, k, weights_dtype, interpret=True)
    kept, idx, redo = filt.select(cands, k)
    want = _mix_rows(jax.nn.softmax(kept), idx, can.value, weights_dtype)
    return got, (want, kept, idx, redo)

  return jax.tree.map(np.asarray, jax.jit(run)(q, key, value, arrays))


def _assert_rows_equal(got, want, tolerance):
  (out, kept, idx, redo), (want_out, want_kept, want_idx, want_redo) = got, want
  np.testing.assert_array_equal(redo, want_redo)
  ok = ~redo
  assert ok.mean() > 0.9
  for a, b in zip(_by_score(kept, idx), _by_score(want_kept, want_idx), strict=True):
    np.testing.assert_array_equal(a[ok], b[ok])
  np.testing.assert_allclose(out[ok], want_out[ok], rtol=tolerance, atol=tolerance)
  assert out.dtype == kept.dtype == np.float32 and idx.dtype == np.int32


@pytest.mark.parametrize('dtype, integer, k, weights_dtype, tolerance', [
    (jnp.float32, True, 8, jnp.float32, 1e-5),  # integer scores: many exact ties
    (jnp.bfloat16, False, 8, jnp.bfloat16, 1e-2),  # weights rounded to bfloat16 before mixing
    (jnp.float16, False, 5, jnp.float32, 1e-3),  # k not a power of two
])
def test_masks_causal_padding_bias_equal_filter_select_and_xla_mix(dtype, integer, k,
                                                                   weights_dtype, tolerance):
  (q, key, value), masks = masked_case(dtype, integer=integer)
  _assert_rows_equal(*_both(q, key, value, masks, k, weights_dtype), tolerance)


def test_ties_masked_rows_and_value_width_other_than_head_dim():
  # Duplicated keys (every score tied with another), a sequence with 5 valid keys for k 8 (its
  # rows keep masked entries: softmax over them is uniform where no key is valid), values 24
  # wide against head_dim 16.
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.integers(-2, 3, (2, 24, 1, 16)), jnp.float32)
  half = rng.integers(-2, 3, (2, 40, 1, 16))
  key = jnp.asarray(np.concatenate([half, half], axis=1), jnp.float32)
  value = jnp.asarray(rng.standard_normal((2, 80, 1, 24)), jnp.float32)
  masks = dict(key_padding_mask=jnp.arange(80) < jnp.array([[80], [5]]),
               query_padding_mask=jnp.arange(24) < jnp.array([[24], [20]]))
  got, want = _both(q, key, value, masks, 8)
  _assert_rows_equal(got, want, 1e-5)
  assert got[0].shape == (2, 1, 24, 24)


def test_hand_made_buffers_signed_zeros_and_garbage_in_unfilled_slots():
  # Rows of every kind, k 4 of 16 slots (masked ties in slots 12-15): plain, full, with masked
  # ties, only masked, overflowed or empty (redone: not compared), and buffers whose scores tie
  # in every way (0.0 against -0.0 included). Unfilled slots hold NaN, inf and keys past
  # kv_len: the kernel must neither keep nor gather them.
  rng = np.random.default_rng(3)
  neg = inputs.NEG
  values = np.full((8, 16), np.nan, np.float32)
  values[:, 1::3] = np.inf
  slots = np.full((8, 16), 10**6, np.int32)
  slots[:, ::2] = -5
  rows = {0: [0.0, -0.0, 1.0, 0.0, -0.0, 1.0, -1.0, 0.0, -0.0, 1.0],  # plain, above 10
          1: list(rng.integers(-2, 3, 16).astype(float)),  # full: above 16
          5: [3.0, 1.0],  # above 2, and 2 masked ties
          6: list(rng.standard_normal(7)),
          7: [2.0, 2.0, 2.0, 2.0, 2.0]}
  above, ties = np.zeros(8, np.int32), np.zeros(8, np.int32)
  for r, row in rows.items():
    values[r, :len(row)] = row
    slots[r, :len(row)] = rng.permutation(32)[:len(row)]
    above[r] = len(row)
  ties[5], ties[3] = 2, 6  # row 3: only masked keys (more than k of them)
  values[5, 12:14] = values[3, 12:16] = neg
  slots[5, 12:14], slots[3, 12:16] = (20, 21), (7, 8, 9, 10)
  above[4], values[4], slots[4] = 40, np.nan, 10**6  # overflowed, garbage: redone
  redo = np.isin(np.arange(8), (2, 4))  # row 2 holds nothing: fewer than k, redone too
  cands = filt.Candidates(*(jnp.asarray(x)[None, None] for x in (values, slots, above, ties,
                                                                 redo)))
  value = jnp.asarray(rng.standard_normal((1, 1, 32, 16)), jnp.float32)

  def both(cands, value):
    got = select_mix.select_and_mix(cands, value, 4, jnp.float32, interpret=True)
    kept, idx, redo = filt.select(cands, 4)
    return got, (_mix_rows(jax.nn.softmax(kept), idx, value, jnp.float32), kept, idx, redo)

  got, want = jax.tree.map(np.asarray, jax.jit(both)(cands, value))
  ok = ~redo[None, None]
  assert np.isfinite(got[0][ok]).all()  # the redone row's output is the caller's to replace
  for a, b in zip(_by_score(*got[1:3]), _by_score(*want[1:3]), strict=True):
    np.testing.assert_array_equal(a[ok], b[ok])
  np.testing.assert_allclose(got[0][ok], want[0][ok], rtol=1e-6, atol=1e-6)
  # Row 0 keeps the three 1.0s and the first +0.0 (below it: -0.0, as lax.top_k orders them).
  assert sorted(got[2][0, 0, 0]) == sorted(slots[0, [0, 2, 5, 9]])


def test_arguments_are_checked():
  cands = filt.Candidates(jnp.zeros((1, 1, 4, 16)), jnp.zeros((1, 1, 4, 16), jnp.int32),
                          *(jnp.zeros((1, 1, 4), t) for t in (jnp.int32, jnp.int32, bool)))
  value = jnp.zeros((1, 1, 32, 16))
  with pytest.raises(ValueError, match=r'k must be an int in \[1, buffer / 2 = 8\]'):
    select_mix.select_and_mix(cands, value, 9, jnp.float32, interpret=True)
  with pytest.raises(ValueError, match='block_rows must be a power of two'):
    select_mix.select_and_mix(cands, value, 4, jnp.float32, interpret=True, block_rows=6)
  with pytest.raises(ValueError, match='does not match candidates'):
    select_mix.select_and_mix(cands, jnp.zeros((1, 2, 32, 16)), 4, jnp.float32)
  with pytest.raises(ValueError, match="variant 'compact' has no kernel that selects and mixes"):
    fused.FusedOptions(mix_in_kernel=True)
  with pytest.raises(ValueError, match='mix_in_kernel must be True or False'):
    fused.FusedOptions(variant='filter', mix_in_kernel='yes')


def _options(**tuning):
  return fused.FusedOptions(variant='filter', platforms=('cpu', 'cuda'),
                            tuning=filt.Options(**SMALL | tuning), redo_rows=8,
                            mix_in_kernel=True)


@pytest.mark.slow  # both interpreted kernels inside attention, forward and backward
@pytest.mark.parametrize('dtype, chunk, tuning, tolerance', [
    (jnp.float32, 16, {}, 1e-5),
    (jnp.bfloat16, 24, {}, 2e-2),  # launches of 24 queries: a partial last block
    (jnp.float32, 16, dict(buffer=16), 1e-5),  # 16 slots for k 8: many rows redone
])
def test_topk_attention_mixing_in_the_kernel_equals_unfused(dtype, chunk, tuning, tolerance):
  args, masks = masked_case(dtype)
  fn = lambda *a, fused=True: topk.topk_attention(
      *a, k=8, query_chunk_size=chunk, fused=fused, fused_options=_options(**tuning), **masks)
  assert select_mix.KERNEL_NAME in jax.jit(fn).lower(*args).as_text(debug_info=True)
  assert_close(value_and_grads(fn, args),
               value_and_grads(lambda *a: fn(*a, fused=False), args), tolerance)


def test_other_kernels_and_dropout_mix_in_xla():
  # The kernel mixes with softmax weights only; relu or dropout keep the XLA mix (same result).
  spec = jax.ShapeDtypeStruct((1, 64, 1, 16), jnp.float32)
  lowered = lambda **kw: jax.jit(lambda q: topk.topk_attention(
      q, q, q, k=4, query_chunk_size=32, fused_options=_options(), **kw)).lower(spec)
  text = lambda **kw: lowered(**kw).as_text(debug_info=True)
  assert select_mix.KERNEL_NAME in text()
  assert select_mix.KERNEL_NAME not in text(kernel='relu')
  assert select_mix.KERNEL_NAME not in text(dropout_rate=0.1, dropout_rng=jax.random.key(0))
  assert fused.runs_kernel(lowered(kernel='relu'), 'filter')


def test_lowers_for_cuda():
  # Triton lowers the forward's kernels: the filter, the select-and-mix, and the unfused
  # selection of the rows they leave (`select_gpu`'s, the default method on CUDA).
  spec = jax.ShapeDtypeStruct((1, 2048, 2, 64), jnp.bfloat16)
  options = fused.FusedOptions(variant='filter', mix_in_kernel=True)
  attend = lambda q, key, v: topk.topk_attention(q, key, v, k=64, is_causal=True,
                                                 fused_options=options)
  names = [text.split('tt.func public @')[1].split('(')[0]
           for text in filt.triton_modules(attend, spec, spec, spec)]
  assert names == [filt.KERNEL_NAME, select_mix.KERNEL_NAME, select_gpu.KERNEL_NAME]


def test_compiles_probes_the_mixing_kernel_too(monkeypatch):
  # Where the select-and-mix kernel fails to compile, the fused path is not chosen.
  monkeypatch.setattr(fused, '_COMPILES', {})
  monkeypatch.setattr(fused, 'PROBE_LENGTH', 32)

  def fails(*args, **kwargs):
    raise RuntimeError('no such Triton op')

  answers = []

  def trace(x):
    can = inputs.canonicalize(x, x, x)
    answers.extend(fused.compiles(can, 4, options=o, interpret=True)
                   for o in (_options(), dataclasses.replace(_options(), mix_in_kernel=False)))
    return x

  monkeypatch.setitem(fused.VARIANTS, 'filter',
                      fused.VARIANTS['filter']._replace(select_and_mix=fails))
  jax.eval_shape(trace, jax.ShapeDtypeStruct((1, 48, 1, 16), jnp.float32))
  assert answers == [False, True]
