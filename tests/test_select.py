"""Tests for topk.select: exact equality with lax.top_k, on the FFI kernel when it is built."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk import select

requires_kernel = pytest.mark.skipif(
    not select.LIBRARY.exists(), reason=f'{select.LIBRARY} not built; run `make build`')


def _bits(x: jax.Array) -> np.ndarray:
  """Raw bits, so NaN payloads and signed zeros compare exactly."""
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _assert_matches_lax(scores: jax.Array, k: int, got=None) -> None:
  values, indices = select.top_k(scores, k) if got is None else got
  want_values, want_indices = jax.lax.top_k(scores, k)
  assert values.dtype == scores.dtype and indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
  np.testing.assert_array_equal(_bits(values), _bits(want_values))


def _random_bits(seed: int, shape: tuple[int, ...], dtype) -> jax.Array:
  """Arbitrary bit patterns: every float class, NaNs with payloads and both signs included."""
  width = jnp.dtype(dtype).itemsize * 8
  bits = np.random.default_rng(seed).integers(0, 2**width, shape, dtype=np.uint64)
  return jnp.asarray(bits.astype({16: np.uint16, 32: np.uint32}[width]).view(jnp.dtype(dtype)))


@requires_kernel
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_kernel_is_active_and_compiled_in(dtype):
  assert select.BACKEND == 'ffi'
  scores = jnp.zeros((2, 8), dtype)
  hlo = jax.jit(lambda s: select.top_k(s, 3)).lower(scores).compile().as_text()
  assert 'custom_call_target="topk_select"' in hlo


@pytest.mark.parametrize('shape', [(1,), (7,), (3, 33), (2, 3, 100), (2, 4096)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_random_normal_matches_lax(shape, dtype):
  scores = jax.random.normal(jax.random.key(sum(shape)), shape, dtype)
  n = shape[-1]
  for k in sorted({1, max(1, n // 16), max(1, n // 2), n}):
    _assert_matches_lax(scores, k)


def test_every_k_matches_lax():
  scores = jax.random.normal(jax.random.key(1), (5, 13))
  for k in range(14):
    _assert_matches_lax(scores, k)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_ties_break_by_lower_index(dtype):
  # Few distinct integer values: every selection cuts through a run of ties.
  scores = jax.random.randint(jax.random.key(2), (16, 300), 0, 4).astype(dtype)
  for k in (1, 5, 64, 150, 300):
    _assert_matches_lax(scores, k)
  _assert_matches_lax(jnp.zeros((3, 50), dtype), 7)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_special_values_follow_total_order(dtype):
  # Matches XLA's CPU TopK: -NaN < -inf < -0 < +0 < inf < +NaN.
  row = jnp.array([1.0, -jnp.inf, jnp.nan, -0.0, 0.0, jnp.inf, -jnp.nan, -2.0, jnp.nan], dtype)
  _, indices = select.top_k(row, 9)
  np.testing.assert_array_equal(indices, [2, 8, 5, 0, 4, 3, 7, 1, 6])
  for seed, k in enumerate((1, 10, 100, 500)):
    _assert_matches_lax(_random_bits(seed, (6, 500), dtype), k)


def test_masked_rows_with_fewer_valid_entries_than_k():
  # As in causal or padded attention: most of a row is -inf or the dtype's minimum.
  scores = jax.random.normal(jax.random.key(3), (8, 256))
  valid = jnp.arange(256) < jnp.arange(1, 9)[:, None] * 5
  _assert_matches_lax(jnp.where(valid, scores, -jnp.inf), 32)
  _assert_matches_lax(jnp.where(valid, scores, jnp.finfo(jnp.float32).min), 32)


def test_many_rows_split_over_threads():
  scores = jax.random.normal(jax.random.key(4), (4, 2048, 64))
  _assert_matches_lax(scores, 16)


def test_jit_vmap_and_lax_map():
  scores = jax.random.normal(jax.random.key(5), (3, 4, 70))
  _assert_matches_lax(scores, 9, jax.jit(lambda s: select.top_k(s, 9))(scores))
  _assert_matches_lax(scores, 9, jax.vmap(lambda s: select.top_k(s, 9))(scores))
  _assert_matches_lax(scores, 9, jax.vmap(jax.vmap(lambda s: select.top_k(s, 9)))(scores))
  _assert_matches_lax(scores, 9, jax.lax.map(lambda s: select.top_k(s, 9), scores))


def test_gradient_matches_lax():
  scores = jax.random.randint(jax.random.key(6), (4, 40), 0, 6).astype(jnp.float32)
  weights = jax.random.normal(jax.random.key(7), (4, 10))
  loss = lambda fn: lambda s: jnp.sum(weights * jnp.sin(fn(s, 10)[0]))
  got = jax.jit(jax.grad(loss(select.top_k)))(scores)
  np.testing.assert_array_equal(got, jax.grad(loss(jax.lax.top_k))(scores))
  _, tangent = jax.jvp(lambda s: select.top_k(s, 10)[0], (scores,), (jnp.ones_like(scores),))
  np.testing.assert_array_equal(tangent, jnp.ones((4, 10)))


def test_other_dtypes_and_approximate():
  _assert_matches_lax(jnp.arange(50, dtype=jnp.int32) % 7, 5)
  _assert_matches_lax(jax.random.normal(jax.random.key(8), (3, 40), jnp.float16), 5)
  scores = jax.random.normal(jax.random.key(9), (3, 40))
  values, indices = select.top_k(scores, 5, approximate=True, recall_target=0.9)
  assert values.shape == indices.shape == (3, 5)
  np.testing.assert_array_equal(values, jnp.take_along_axis(scores, indices, axis=-1))


@pytest.mark.parametrize('k', [-1, 11])
def test_bad_k_raises(k):
  with pytest.raises(ValueError, match='k must be in'):
    select.top_k(jnp.zeros((2, 10)), k)


def test_scalar_raises():
  with pytest.raises(ValueError, match='at least one axis'):
    select.top_k(jnp.float32(1.0), 1)
