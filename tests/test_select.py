"""Tests for topk.select: exact equality with lax.top_k, on the FFI kernel when it is built."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk import select

pytestmark = pytest.mark.usefixtures('fast_compilation')  # compilation dominates (conftest.py)

requires_kernel = pytest.mark.skipif(
    not select.LIBRARY.exists(), reason=f'{select.LIBRARY} not built; run `make build`')


def _bits(x: jax.Array) -> np.ndarray:
  """Raw bits, so NaN payloads and signed zeros compare exactly."""
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _portable(scores: jax.Array, k: int):
  return select._ffi_top_k(scores, k, vectorized=False)


# The public entry point (AVX2 kernel where available) and the kernel's portable code.
SELECTORS = [
    pytest.param(select.top_k, id='top_k'),
    pytest.param(_portable, id='portable', marks=requires_kernel),
]


def _assert_matches_lax(scores: jax.Array, k: int, got=None, select_fn=select.top_k) -> None:
  values, indices = select_fn(scores, k) if got is None else got
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
  assert select.DEFAULT_METHODS['cpu'] == 'ffi'
  scores = jnp.zeros((2, 8), dtype)
  hlo = jax.jit(lambda s: select.top_k(s, 3)).lower(scores).compile().as_text()
  assert 'custom_call_target="topk_select"' in hlo


@pytest.mark.parametrize('shape', [(1,), (7,), (3, 33), (2, 3, 100), (2, 4096)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('select_fn', SELECTORS)
def test_random_normal_matches_lax(shape, dtype, select_fn):
  scores = jax.random.normal(jax.random.key(sum(shape)), shape, dtype)
  n = shape[-1]
  for k in sorted({1, max(1, n // 16), max(1, n // 2), n}):
    _assert_matches_lax(scores, k, select_fn=select_fn)


@pytest.mark.parametrize('select_fn', SELECTORS)
def test_every_k_matches_lax(select_fn):
  scores = jax.random.normal(jax.random.key(1), (5, 13))
  for k in range(14):
    _assert_matches_lax(scores, k, select_fn=select_fn)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('select_fn', SELECTORS)
def test_ties_break_by_lower_index(dtype, select_fn):
  # Few distinct integer values: every selection cuts through a run of ties.
  scores = jax.random.randint(jax.random.key(2), (16, 300), 0, 4).astype(dtype)
  for k in (1, 5, 64, 150, 300):
    _assert_matches_lax(scores, k, select_fn=select_fn)
  _assert_matches_lax(jnp.zeros((3, 50), dtype), 7, select_fn=select_fn)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('select_fn', SELECTORS)
def test_special_values_follow_total_order(dtype, select_fn):
  # Matches XLA's CPU TopK: -NaN < -inf < -0 < +0 < inf < +NaN.
  row = jnp.array([1.0, -jnp.inf, jnp.nan, -0.0, 0.0, jnp.inf, -jnp.nan, -2.0, jnp.nan], dtype)
  _, indices = select_fn(row, 9)
  np.testing.assert_array_equal(indices, [2, 8, 5, 0, 4, 3, 7, 1, 6])
  for seed, k in enumerate((1, 10, 100, 500)):
    _assert_matches_lax(_random_bits(seed, (6, 500), dtype), k, select_fn=select_fn)


@pytest.mark.parametrize('select_fn', SELECTORS)
def test_masked_rows_with_fewer_valid_entries_than_k(select_fn):
  # As in causal or padded attention: most of a row is -inf or the dtype's minimum.
  scores = jax.random.normal(jax.random.key(3), (8, 256))
  valid = jnp.arange(256) < jnp.arange(1, 9)[:, None] * 5
  _assert_matches_lax(jnp.where(valid, scores, -jnp.inf), 32, select_fn=select_fn)
  _assert_matches_lax(jnp.where(valid, scores, jnp.finfo(jnp.float32).min), 32,
                      select_fn=select_fn)


@pytest.mark.parametrize('select_fn', SELECTORS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_long_rows_mostly_tied(dtype, select_fn):
  # Padded or causal attention on long rows: fewer valid keys than k (then the first masked keys
  # fill the top k), as many, or a few more; valid keys as a prefix or scattered; constant rows.
  n = 2048
  scores = jax.random.normal(jax.random.key(11), (12, n))
  counts = jnp.array([0, 1, 31, 32, 33, 63, 64, 65, 100, 300, 1000, n])[:, None]
  prefix = jnp.arange(n) < counts
  scattered = jax.random.permutation(jax.random.key(12), prefix, axis=1, independent=True)
  for valid in (prefix, scattered):
    for masked in (-jnp.inf, jnp.finfo(jnp.float32).min, 0.0):
      rows = jnp.where(valid, scores, masked).astype(dtype)
      for k in (1, 64, 300):
        _assert_matches_lax(rows, k, select_fn=select_fn)
  _assert_matches_lax(jnp.full((2, n), 3.0, dtype), 64, select_fn=select_fn)


@pytest.mark.parametrize('select_fn', SELECTORS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_thresholds_of_every_sign_and_size(dtype, select_fn):
  # The kernel compares raw bits when its bound is a non-negative number and keys otherwise:
  # rows of negative scores, of huge ones near inf and NaN, and clustered (local) high scores.
  scores = jax.random.normal(jax.random.key(10), (4, 1000))
  for shifted in (scores - 10.0, scores * 1e38, jnp.where(scores > 1.5, jnp.inf, scores)):
    for k in (1, 16, 64, 200):
      _assert_matches_lax(shifted.astype(dtype), k, select_fn=select_fn)
  local = -jnp.abs(jnp.arange(2048) - jnp.arange(0, 2048, 300)[:, None]).astype(dtype)
  _assert_matches_lax(local, 64, select_fn=select_fn)


@pytest.mark.parametrize('select_fn', SELECTORS)
@pytest.mark.parametrize('n, k', [(5000, 250), (5000, 300), (10000, 2000), (9, 8), (31, 30)])
def test_many_candidates_and_odd_lengths(n, k, select_fn):
  # Around the switch from all-pairs ranking to nth_element + sort, and lengths that leave
  # partial stripes and vectors.
  _assert_matches_lax(jax.random.normal(jax.random.key(n + k), (3, n)), k, select_fn=select_fn)


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
  values, indices = select.top_k(scores, 5, selection='approximate', recall_target=0.9)
  assert values.shape == indices.shape == (3, 5)
  np.testing.assert_array_equal(values, jnp.take_along_axis(scores, indices, axis=-1))


@pytest.mark.parametrize('scores, kwargs', [
    (jnp.zeros((2, 10)), {}),  # the FFI kernel (or lax.top_k without it)
    (jnp.zeros((2, 10), jnp.int32), {}),  # lax.top_k
    (jnp.zeros((2, 10)), {'method': 'lax'}),
    (jnp.zeros((2, 10)), {'method': 'two_stage'}),
    (jnp.zeros((2, 10)), {'selection': 'approximate'}),
])
def test_returns_a_tuple_on_every_path(scores, kwargs):
  result = select.top_k(scores, 3, **kwargs)
  assert type(result) is tuple and len(result) == 2


@pytest.mark.parametrize('k', [-1, 11])
def test_bad_k_raises(k):
  with pytest.raises(ValueError, match='k must be in'):
    select.top_k(jnp.zeros((2, 10)), k)


@pytest.mark.parametrize('k', ['8', 2.0, True, None])
def test_non_int_k_raises(k):
  with pytest.raises(ValueError, match='k must be an int'):
    select.top_k(jnp.zeros((2, 10)), k)


def test_numpy_int_k_is_accepted():
  _assert_matches_lax(jnp.arange(10.0), 3, select.top_k(jnp.arange(10.0), np.int64(3)))


@pytest.mark.parametrize('scores', [
    jnp.zeros((2, 4), jnp.complex64), jnp.zeros((2, 4), bool), np.array(['a', 'b', 'c'])])
def test_non_real_scores_raise(scores):
  with pytest.raises(ValueError, match='real'):
    select.top_k(scores, 1)


@pytest.mark.parametrize('kwargs, match', [
    ({'selection': 'fast'}, 'Unknown selection'),
    ({'method': 'radix'}, 'method must be one of'),
    ({'selection': 'approximate', 'method': 'lax'}, 'exact selection only'),
    ({'selection': 'approximate', 'recall_target': 0.0}, 'recall_target'),
    ({'selection': 'approximate', 'recall_target': 1.5}, 'recall_target'),
])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    select.top_k(jnp.zeros((2, 10)), 3, **kwargs)


def test_ffi_without_the_library_raises(monkeypatch):
  monkeypatch.setattr(select, '_CPU_METHOD', 'lax')
  with pytest.raises(ValueError, match='CPU only'):
    select.top_k(jnp.zeros((2, 10)), 3, method='ffi')


def test_default_methods_are_read_only():
  with pytest.raises(TypeError):
    select.DEFAULT_METHODS['cpu'] = 'lax'


def test_scalar_raises():
  with pytest.raises(ValueError, match='at least one axis'):
    select.top_k(jnp.float32(1.0), 1)
