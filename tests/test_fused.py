"""Tests for the fused score-and-select kernel (topk.fused) in Pallas' interpreter on CPU.

Shapes stay small (the interpreter is slow) with tiles of 16 so that a row spans several tiles,
the last one partial. The kernel's score product may round differently from XLA's, so values
are compared to a tolerance, except on integer-valued inputs where both are exact.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, masked_case, value_and_grads

import topk
from topk import fused, inputs, select_gpu

pytestmark = pytest.mark.usefixtures('fast_compilation')  # compilation dominates (conftest.py)

SMALL = dict(block_q=16, key_tile=16)  # and groups max(16, 2k)


def on_cpu(**tiling) -> fused.FusedOptions:
  """`topk_attention` selects with the kernel on CPU (interpreted), with small tiles; rows it
  leaves are redone in two sub-chunks of 8 queries per chunk of 16."""
  return fused.FusedOptions(platforms=('cpu', 'cuda'), tuning=fused.Tiling(**SMALL | tiling),
                            redo_rows=8)


def _kernel_and_dense(args, masks, k, **options):
  """The kernel's `(kept, indices, redo)` and `lax.top_k` of the dense masked scores."""
  def both(args):
    can = inputs.canonicalize(*args, **masks)
    dense = inputs.chunk_scores(can, 0, can.query, None)
    return (fused.kept_top_k(can, k, interpret=True, tiling=fused.Tiling(**options)),
            jax.lax.top_k(dense, k))

  (kept, idx, redo), want = jax.jit(both)(args)
  return (kept, idx, np.asarray(redo)), want


@pytest.mark.parametrize('dtype, integer, k, options', [
    # Small integer scores (exact in both products): many ties, broken toward the lower key.
    (jnp.float32, True, 8, {}),
    # A loose bound (the 15th of 16 group maxima) and room for k + 1 candidates: most rows
    # overflow on purpose.
    (jnp.bfloat16, False, 15, dict(groups=16, buffer=32)),
])
def test_kept_scores_equal_lax_top_k(dtype, integer, k, options):
  args, masks = masked_case(dtype, integer=integer)
  (kept, idx, redo), (want_kept, want_idx) = _kernel_and_dense(args, masks, k,
                                                               **SMALL | options)
  # Causal rows with fewer than k keys, the sequence with 5 valid keys and padded queries
  # come out of the kernel (the masked keys they keep in their own slots) ...
  short = np.zeros(redo.shape, bool)
  short[0, :, :k - 1] = short[1] = True
  short[:, 0, 30] = False  # the row with a -inf bias
  assert not redo[short].any()
  if not options:  # ... and with room enough, only the row with a -inf bias is left over.
    want_redo = np.zeros(redo.shape, bool)
    want_redo[:, 0, 30] = True  # the bias broadcasts over the batch
    np.testing.assert_array_equal(redo, want_redo)
  else:
    assert redo[~short].mean() > 0.5
  np.testing.assert_array_equal(np.asarray(idx)[~redo], np.asarray(want_idx)[~redo])
  tolerance = 0 if integer else 1e-6
  np.testing.assert_allclose(np.asarray(kept)[~redo], np.asarray(want_kept)[~redo],
                             rtol=tolerance, atol=tolerance)
  assert kept.dtype == jnp.float32 and idx.dtype == jnp.int32


@pytest.mark.parametrize('kv_len, masked_groups', [(100, False), (200, True)])
def test_groups_without_valid_keys_do_not_loosen_the_bound(kv_len, masked_groups):
  # Fewer keys than groups (100 < 128), or every other group of 32 fully masked: the bound still
  # comes from the groups that hold valid keys, so more than the buffer's 55 candidate slots
  # of valid keys do not send every row back to the unfused path.
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.standard_normal((1, n, 1, 16)), jnp.float32) for n in (16, kv_len))
  mask = None
  if masked_groups:
    mask = jnp.asarray((np.arange(kv_len) % 32 % 2 == 0)[None, None, None, :])
  options = dict(block_q=16, key_tile=16, groups=32 if masked_groups else 128)

  def both(q, k):
    can = inputs.canonicalize(q, k, k, mask=mask)
    dense = inputs.chunk_scores(can, 0, can.query, None)
    return (fused.kept_top_k(can, 8, interpret=True, tiling=fused.Tiling(**options)),
            jax.lax.top_k(dense, 8))

  (kept, idx, redo), (want_kept, want_idx) = jax.jit(both)(q, k)
  assert not np.asarray(redo).any()
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(kept, want_kept, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('dtype, k, chunk, options, dropout, tolerance', [
    (jnp.float32, 8, 16, {}, 0.1, 1e-5),  # dropout acts on the kept weights, after selection
    # Most rows overflow (as in the test above) and are redone by the unfused path; launches of
    # 24 queries end in a partial block of 16, whose last rows are the next chunk's.
    (jnp.bfloat16, 15, 24, dict(groups=16, buffer=32), 0.0, 2e-2),
])
def test_topk_attention_equals_unfused(dtype, k, chunk, options, dropout, tolerance):
  args, masks = masked_case(dtype)  # query chunks of 16 or 24 do not divide 40 queries
  fn = lambda *a, fused=True: topk.topk_attention(
      *a, k=k, query_chunk_size=chunk, dropout_rate=dropout, dropout_rng=jax.random.key(1),
      fused=fused, fused_options=on_cpu(**options), **masks)
  assert_close(value_and_grads(fn, args),
               value_and_grads(lambda *a: fn(*a, fused=False), args), tolerance)


def test_k_at_least_kv_len_equals_dense():
  args, masks = masked_case(jnp.float32, kv_len=40)
  mask = (masks.pop('mask') & jnp.tril(jnp.ones((40, 40), bool))
          & masks.pop('key_padding_mask')[:, None, None, :]
          & masks.pop('query_padding_mask')[:, None, :, None])
  del masks['is_causal']
  got = value_and_grads(lambda *a: topk.topk_attention(
      *a, k=64, query_chunk_size=16, mask=mask, fused_options=on_cpu(), **masks), args)
  want = value_and_grads(lambda *a: topk.dot_product_attention(*a, mask=mask, **masks), args)
  assert_close(got, want, 1e-5)


def _traced(fn, depth=16):
  """`fn(canonical inputs)` traced (not run) on a `[1, 32, 1, depth]` query, key and value."""
  x = jax.ShapeDtypeStruct((1, 32, 1, depth), jnp.float32)
  return jax.eval_shape(lambda x: fn(inputs.canonicalize(x, x, x)), x)


def test_fused_false_keeps_the_unfused_path():
  x = jax.ShapeDtypeStruct((1, 32, 1, 16), jnp.float32)
  jaxpr = lambda **option: str(jax.make_jaxpr(
      lambda x: topk.topk_attention(x, x, x, k=4, fused_options=on_cpu(), **option))(x))
  assert 'pallas_call' in jaxpr() and 'pallas_call' not in jaxpr(fused=False)
  with pytest.raises(ValueError, match='fused must be True or False'):
    topk.topk_attention(jnp.ones((1, 4, 1, 16)), *(jnp.ones((1, 4, 1, 16)),) * 2, k=2,
                        fused='off')


def test_switch_and_unsupported_inputs():
  chosen = []
  _traced(lambda can: chosen.append(fused.platforms(can, 4, None, on_cpu())), depth=8)
  _traced(lambda can: chosen.append(fused.platforms(can, 4, None, on_cpu())))
  assert chosen == [(), ('cpu', 'cuda')]  # head_dim 8: Triton's dot needs 16
  for k, options, message in ((4, dict(depth=8), 'head_dim 8'),
                              (4, dict(block_q=24), 'block_q must be a power of two'),
                              (4, dict(key_tile=8), 'key_tile must be a power of two'),
                              (4, dict(buffer=8), r'buffer >= 2k \+ 1'),
                              (33, {}, r'k must be in \[1, kv_len = 32\]')):
    depth = options.pop('depth', 16)
    with pytest.raises(ValueError, match=message):
      _traced(lambda can, k=k, options=options: fused.kept_top_k(
          can, k, interpret=True, tiling=fused.Tiling(**options)), depth)
  with pytest.raises(ValueError, match='unknown platforms'):
    fused.FusedOptions(platforms=('tpu',))
  with pytest.raises(ValueError, match="Unknown fused kernel 'radix'"):
    fused.FusedOptions(variant='radix')


def test_compiles_answers_once_per_configuration(monkeypatch):
  monkeypatch.setattr(fused, '_COMPILES', {})
  monkeypatch.setattr(fused, 'PROBE_LENGTH', 32)
  answers = []

  def trace(x, mask):  # asked while tracing, as `platforms` is
    can = inputs.canonicalize(x, x, x, mask=mask, is_causal=True)
    answers.append(fused.compiles(can, 4, options=on_cpu(), interpret=True))
    return x

  for length in (48, 80, 112):  # the length is not part of the configuration
    x = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.bfloat16)
    jax.eval_shape(trace, x, jax.ShapeDtypeStruct((1, 1, length, length), bool))
  assert answers == [True] * 3 and len(fused._COMPILES) == 1


def test_kernel_that_does_not_compile_falls_back(monkeypatch, caplog):
  # On a GPU backend `platforms` compiles the kernel first; where that fails (here: Triton on a
  # CPU backend) the GPU platforms are dropped with a warning and the unfused path runs.
  monkeypatch.setattr(fused, '_COMPILES', {})
  monkeypatch.setattr(fused.jax, 'default_backend', lambda: 'gpu')
  fused._say.cache_clear()  # a message is logged once per process: maybe by another test
  chosen = []
  with caplog.at_level('WARNING', logger='topk.fused'):
    _traced(lambda can: chosen.append(fused.platforms(can, 4, None, on_cpu())))
  assert chosen == [('cpu',)]
  assert 'the fused kernel does not compile here' in caplog.text
  assert list(fused._COMPILES.values()) == [False]


def _lowered_for_cuda(fn, *args):
  """`fn` jitted and lowered for CUDA on any backend (nothing is compiled or run)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))


def test_lowers_for_cuda_and_stays_off_cpu():
  # On for CUDA by default: the kernel in the CUDA lowering of forward and backward, not on CPU.
  # `runs_kernel` looks for the kernel's own name, whatever custom call jaxlib wraps it in.
  assert fused.FusedOptions().platforms == ('cuda',)
  spec, length = jax.ShapeDtypeStruct, 1000
  args = (spec((1, length, 2, 64), jnp.bfloat16),) * 3
  masks = dict(bias=spec((1, 2, length, length), jnp.float32),
               mask=spec((1, 1, 1, length), bool), key_padding_mask=spec((1, length), bool),
               query_padding_mask=spec((1, length), bool))

  def grads(args, masks):
    loss = lambda *a: jnp.sum(topk.topk_attention(*a, k=64, query_chunk_size=256,
                                                  is_causal=True, **masks))
    return jax.grad(loss, argnums=(0, 1, 2))(*args)

  assert fused.runs_kernel(_lowered_for_cuda(grads, args, masks))
  assert not fused.runs_kernel(jax.jit(grads).lower(args, masks))


def _million_tokens(heads, variant):
  """Whether `topk_attention` (k 64, query chunk 1024) on abstract bfloat16 `[1, 2**20, heads,
  64]` inputs, lowered for CUDA (where the kernel is on), runs `variant`'s kernel; and the
  largest array of one launch for them."""
  spec = jax.ShapeDtypeStruct((1, 2**20, heads, 64), jnp.bfloat16)
  options = fused.FusedOptions(variant=variant)
  attend = lambda q, key, v: topk.topk_attention(q, key, v, k=64, query_chunk_size=1024,
                                                 fused_options=options)
  largest = []
  jax.eval_shape(lambda x: largest.append(fused.VARIANTS[variant].largest_array(
      inputs.canonicalize(x, x, x, query_chunk_size=1024), 64, options.tuning)), spec)
  return fused.runs_kernel(_lowered_for_cuda(attend, spec, spec, spec), variant), largest[0]


@pytest.mark.parametrize('variant', sorted(fused.VARIANTS))
def test_arrays_past_int32_offsets_never_reach_the_kernel(variant, caplog):
  # Triton's offsets are int32: an array of 2**31 entries is the most a kernel can address
  # (last offset 2**31 - 1). Launched per query chunk, the candidate buffers stay small (8
  # heads, 1024 queries, at most 769 slots: 6.3M entries), so at 1M tokens the largest array
  # is the key [8 * 2**20, 64] and the kernel runs.
  assert _million_tokens(8, variant) == (True, 8 * 2**20 * 64)
  # 64 heads make the key 2**32 entries: the unfused path runs, with a warning.
  fused._say.cache_clear()  # a message is logged once per process: maybe by another test
  with caplog.at_level('WARNING', logger='topk.fused'):
    assert _million_tokens(64, variant) == (False, 2**32)
  assert "an array of 4,294,967,296 entries: Triton's int32 offsets" in caplog.text


@pytest.mark.parametrize('variant', sorted(fused.VARIANTS))
@pytest.mark.parametrize('length, runs', [(46340, True), (46341, False)])
def test_full_mask_past_int32_offsets_never_reaches_the_kernel(length, runs, variant):
  # A [q_len, kv_len] mask: 46,340**2 entries fit in int32 offsets, 46,341**2 do not; every
  # launch takes all of it (the kernels index it by their rows). Chunks of 1324 queries divide
  # 46,340: no padded query rows.
  spec = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 1, length, length), bool)
  attend = lambda q, mask: topk.topk_attention(q, q, q, k=8, mask=mask, query_chunk_size=1324,
                                               fused_options=fused.FusedOptions(variant=variant))
  assert fused.runs_kernel(_lowered_for_cuda(attend, spec, mask), variant) == runs
  assert (length**2 <= select_gpu.MAX_ENTRIES) == runs
  if not runs:
    with pytest.raises(ValueError, match='does not take an array of 2,147,488,281 entries'):
      jax.eval_shape(lambda q, mask: fused.candidates(
          inputs.canonicalize(q, q, q, mask=mask), 8), spec, mask)
