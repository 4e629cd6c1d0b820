"""Tests for the GPU selections of topk.select_gpu, forced on CPU (Pallas in interpret mode).

Each must equal `lax.top_k` bit for bit, indices included; shapes stay small because the Pallas
interpreter is slow, and the two-stage block is shrunk so that it recurses on short rows.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import topk
from topk import select, select_gpu

pytestmark = pytest.mark.usefixtures('fast_compilation')  # compilation dominates (conftest.py)

GPU_METHODS = ['two_stage', 'pallas']
MASKED = jnp.finfo(jnp.float32).min  # how topk_attention masks scores


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  monkeypatch.setattr(select_gpu, 'TWO_STAGE_WIDTH', 16)


def _bits(x: jax.Array) -> np.ndarray:
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _assert_matches_lax(scores: jax.Array, k: int, got) -> None:
  values, indices = got
  want_values, want_indices = jax.lax.top_k(scores, k)
  assert values.dtype == scores.dtype and indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
  np.testing.assert_array_equal(_bits(values), _bits(want_values))


def _hard_rows(dtype, n: int = 300) -> jax.Array:
  """`[14, n]` rows that each stress a selection differently (n is no multiple of any block)."""
  keys = jax.random.split(jax.random.key(0), 6)
  normal = jax.random.normal(keys[0], (4, n))
  sparse = jax.random.uniform(keys[1], (n,)) < 0.01  # 3 valid keys: fewer than k
  nan = jnp.where(jax.random.uniform(keys[2], (n,)) < 0.05, jnp.nan, normal[0])
  signed_zeros = jnp.where(jax.random.uniform(keys[3], (n,)) < 0.5, -0.0, 0.0)
  bits = jax.random.bits(keys[4], (n,), jnp.uint32)
  local = -jnp.abs(jnp.arange(n) - 150.0)
  rows = [
      *normal,
      jax.random.randint(keys[5], (n,), 0, 4).astype(jnp.float32),  # ties everywhere
      jnp.full((n,), MASKED),  # all masked
      jnp.where(sparse, normal[1], MASKED),  # mostly masked
      jnp.where(sparse, normal[2], -jnp.inf),
      jnp.where(nan == nan, nan, -nan),  # +NaN and -NaN
      signed_zeros.at[::37].set(1.0),
      normal[3] * 1e38,  # near and at inf in bfloat16
      local,  # clustered maxima
      jax.lax.bitcast_convert_type(bits, jnp.float32),  # every float class
      jnp.full((n,), 3.0),
  ]
  return jnp.stack(rows).astype(dtype)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('method', GPU_METHODS)
def test_hard_rows_match_lax(method, dtype):
  scores = _hard_rows(dtype)
  ks = (1, 8, scores.shape[-1])  # pallas itself runs for k <= n / 16
  results = jax.jit(lambda s: [select.top_k(s, k, method=method) for k in ks])(scores)
  for k, got in zip(ks, results, strict=True):
    _assert_matches_lax(scores, k, got)


def test_pallas_candidates_and_fallback():
  scores, k, buffer = _hard_rows(jnp.float32), 5, 32
  values, indices, count = jax.jit(
      lambda s: select_gpu.candidates(s, k, buffer, interpret=True, block_rows=2, tile=64))(scores)
  exact = np.asarray(count) <= buffer
  # Random rows fit; rows that tie at the bound (masked, constant) or hold a NaN do not.
  np.testing.assert_array_equal(exact, [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
  assert count[8] == count[12] == buffer + 1  # the rows holding NaNs
  _, want = jax.lax.top_k(scores, k)
  for row in np.flatnonzero(exact):
    kept = np.asarray(indices[row, :count[row]])
    assert np.all(np.diff(kept) > 0) and set(np.asarray(want[row])) <= set(kept)
    np.testing.assert_array_equal(_bits(values[row, :count[row]]), _bits(scores[row, kept]))
  # A buffer of k overflows on nearly every row: the exact result comes from the fallback.
  got = jax.jit(lambda s: select_gpu.pallas_top_k(
      s, k, buffer=k, interpret=True, block_rows=2, tile=64))(scores)
  _assert_matches_lax(scores, k, got)


@pytest.mark.parametrize('method', GPU_METHODS)
def test_batch_dims_jit_and_vmap(method):
  scores = jax.random.normal(jax.random.key(1), (2, 3, 160)).astype(jnp.bfloat16)
  fn = lambda s: select.top_k(s, 8, method=method)
  _assert_matches_lax(scores, 8, jax.jit(fn)(scores))
  _assert_matches_lax(scores, 8, jax.jit(jax.vmap(fn, in_axes=1, out_axes=1))(scores))


@pytest.mark.parametrize('method', [None, *GPU_METHODS])
def test_empty_batches_under_jit(method):
  # Tracing traces every platform's branch: the default method on CPU traces 'pallas' too.
  for shape in ((0, 320), (2, 0, 320)):
    scores = jnp.zeros(shape)
    _assert_matches_lax(scores, 8, jax.jit(lambda s: select.top_k(s, 8, method=method))(scores))


def test_two_stage_takes_every_lax_dtype():
  two_stage = jax.jit(lambda s: select_gpu.two_stage_top_k(s, 7))
  ints = jax.random.randint(jax.random.key(2), (3, 100), -5, 5)
  _assert_matches_lax(ints, 7, two_stage(ints))
  halves = jax.random.normal(jax.random.key(3), (3, 100), jnp.float16)
  _assert_matches_lax(halves, 7, two_stage(halves))
  # A method that does not take a dtype leaves it to lax.top_k.
  _assert_matches_lax(ints, 7, select.top_k(ints, 7, method='pallas'))


@pytest.mark.parametrize('method', GPU_METHODS)
def test_gradient_matches_lax(method):
  scores = jax.random.randint(jax.random.key(4), (4, 160), 0, 6).astype(jnp.float32)
  weights = jax.random.normal(jax.random.key(5), (4, 8))
  loss = lambda fn: lambda s: jnp.sum(weights * jnp.sin(fn(s, 8)[0]))
  got = jax.jit(jax.grad(loss(lambda s, k: select.top_k(s, k, method=method))))(scores)
  np.testing.assert_array_equal(got, jax.grad(loss(jax.lax.top_k))(scores))


def test_method_selects_the_cpu_method():
  scores = jnp.zeros((2, 64))
  hlo = jax.jit(lambda s: select.top_k(s, 3, method='two_stage')).lower(scores).as_text()
  assert 'topk_select' not in hlo and 'tensor<2x4x16xf32>' in hlo  # blocks of 16


def _value_and_grads(fn, q, k, v):
  loss = lambda *args: jnp.sum(jnp.sin(fn(*args)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.fixture(scope='module')
def attention_case():
  """Inputs `[2, 64, 2, 8]` (causal, the second sequence padded to 50 keys) and top-k attention
  with `k` kept keys; then value and gradients of the default path (k 4) and of the dense
  reference."""
  length = 64
  q, k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in jax.random.split(
      jax.random.key(6), 3))
  padding = jnp.arange(length) < jnp.array([[length], [50]])
  top = lambda kept, method=None: lambda *a: topk.topk_attention(
      *a, k=kept, query_chunk_size=24, is_causal=True, key_padding_mask=padding, method=method)
  mask = jnp.tril(jnp.ones((length, length), bool)) & padding[:, None, None, :]
  dense = lambda *a: topk.dot_product_attention(*a, mask=mask)
  return (q, k, v), top, _value_and_grads(top(4), q, k, v), _value_and_grads(dense, q, k, v)


@pytest.mark.parametrize('method', GPU_METHODS)
def test_topk_attention_with_each_method(method, attention_case):
  args, top, default, dense = attention_case
  # k < kv_len: the same keys as the default (CPU kernel) path, so the same values and grads.
  jax.tree.map(np.testing.assert_array_equal, _value_and_grads(top(4, method), *args), default)
  # k >= kv_len: the dense reference.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               _value_and_grads(top(200, method), *args), dense)


def _cuda_text(fn, *args):
  """`fn` lowered for CUDA on any backend, as text with debug information (kernel names)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text(debug_info=True)


def test_pallas_kernel_lowers_for_cuda():
  # The kernel's own name, whatever custom call jaxlib wraps a Pallas-Triton kernel in.
  shapes = jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16)
  assert select_gpu.KERNEL_NAME in _cuda_text(lambda s: select_gpu.pallas_top_k(s, 64), shapes)


@pytest.mark.parametrize('method, marker', [
    ('two_stage', 'tensor<8x4x512xbf16>'),  # the first stage's blocks
    ('pallas', select_gpu.KERNEL_NAME),
])
def test_top_k_lowers_the_gpu_branch_for_cuda(method, marker, monkeypatch):
  monkeypatch.setattr(select_gpu, 'TWO_STAGE_WIDTH', 512)
  text = _cuda_text(lambda s: select.top_k(s, 64, method=method),
                    jax.ShapeDtypeStruct((8, 2048), jnp.bfloat16))
  assert marker in text and 'topk_select' not in text

@pytest.mark.parametrize('rows, kernel', [(2048, True), (2049, False)])
def test_pallas_top_k_keeps_arrays_past_int32_offsets_from_the_kernel(rows, kernel):
  # Triton's offsets are int32: `[2048, 2**20]` scores (2**31 entries, last offset 2**31 - 1)
  # are the most the kernel takes; one more row goes to `two_stage_top_k`. Traced, not run.
  spec = jax.ShapeDtypeStruct((rows, 2**20), jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(lambda s: select_gpu.pallas_top_k(s, 64))(spec))
  assert ('pallas_call' in jaxpr) == kernel
  if not kernel:
    with pytest.raises(ValueError, match='an array of 2,148,532,224 entries'):
      jax.eval_shape(lambda s: select_gpu.candidates(s, 64, 256), spec)
