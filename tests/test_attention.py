"""Tests for topk.dot_product_attention, chunked_attention, topk_attention, make_attention_fn."""
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_topk

import topk
from topk import kernels

pytestmark = pytest.mark.usefixtures('fast_compilation')  # compilation dominates (conftest.py)

B, LQ, LK, H, D = 2, 7, 9, 2, 4


def _inputs(seed=0, lq=LQ, lk=LK, dv=D, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(B, lq, H, D)), dtype)
  k = jnp.asarray(r.normal(size=(B, lk, H, D)), dtype)
  v = jnp.asarray(r.normal(size=(B, lk, H, dv)), dtype)
  return q, k, v


def _case(name, seed=1):
  """Returns (our kwargs, the equivalent flax kwargs) for a masking/bias case."""
  r = np.random.default_rng(seed)
  causal = nn.make_causal_mask(jnp.ones((B, LQ))).astype(bool)  # [B, 1, LQ, LQ]; LQ < LK
  causal = jnp.pad(causal, ((0, 0), (0, 0), (0, 0), (0, LK - LQ)))
  kpm = jnp.asarray(r.random((B, LK)) > 0.3).at[:, 0].set(True)
  qpm = jnp.asarray([[1, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], bool)
  full = jnp.asarray(r.random((B, 1, LQ, LK)) > 0.4).at[0, 0, 2].set(False)  # one empty row
  bias = jnp.asarray(r.normal(size=(1, H, LQ, LK)), jnp.float32)
  cases = {
      'plain': ({}, {}),
      'mask': ({'mask': full}, {'mask': full}),
      'float_mask_query_broadcast': ({'mask': full[:, :, :1].astype(jnp.float32)},
                                     {'mask': full[:, :, :1]}),
      'bias_and_mask': ({'bias': bias, 'mask': full}, {'bias': bias, 'mask': full}),
      'causal': ({'is_causal': True}, {'mask': causal}),
      'key_padding': ({'key_padding_mask': kpm}, {'mask': kpm[:, None, None, :]}),
      'query_padding': ({'query_padding_mask': qpm}, {'mask': qpm[:, None, :, None]}),
      'all_forms': ({'is_causal': True, 'key_padding_mask': kpm, 'query_padding_mask': qpm,
                     'mask': full, 'bias': bias},
                    {'mask': causal & kpm[:, None, None, :] & qpm[:, None, :, None] & full,
                     'bias': bias}),
  }
  return cases[name]


def _loss_grads(fn, q, k, v, **kwargs):
  """Value and gradients w.r.t. q, k, v (and bias if given) of a fixed random projection."""
  bias = kwargs.pop('bias', None)
  shape = jax.eval_shape(lambda q, k, v, b: fn(q, k, v, bias=b, **kwargs), q, k, v, bias).shape
  proj = jnp.asarray(np.random.default_rng(9).normal(size=shape), jnp.float32)

  def loss(q, k, v, bias):
    out = fn(q, k, v, bias=bias, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * proj), out

  # One jitted value-and-grad per call: far fewer compilations than eager dispatch.
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)
  return out, grads


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol,
                               rtol=atol)


# ----------------------------------------------------------------------------- equal to flax
# k >= kv_len top-k and chunked attention equal flax's dense attention, gradients included.


@pytest.mark.parametrize('case', [
    'plain', 'float_mask_query_broadcast', 'bias_and_mask', 'causal', 'key_padding',
    'query_padding', 'all_forms',
])
def test_float32(case):
  ours, theirs = _case(case)
  q, k, v = _inputs()
  ref = _loss_grads(nn.dot_product_attention, q, k, v, **theirs)
  # Dense takes the same keyword arguments as the other forms (padding masks, is_causal).
  _assert_trees_close(_loss_grads(topk.dot_product_attention, q, k, v, **ours), ref,
                      1e-6)
  # Chunk 3 does not divide q_len; 16 exceeds it.
  for fn in (functools.partial(topk.chunked_attention, query_chunk_size=3),
             functools.partial(topk.topk_attention, k=LK, query_chunk_size=16),
             functools.partial(topk.topk_attention, k=LK + 5, query_chunk_size=3)):
    _assert_trees_close(_loss_grads(fn, q, k, v, **ours), ref, 1e-5)

@pytest.mark.parametrize('case', ['plain', 'all_forms'])
def test_bfloat16(case):
  ours, theirs = _case(case)
  q, k, v = _inputs(dtype=jnp.bfloat16)
  up = [x.astype(jnp.float32) for x in (q, k, v)]
  ref = _loss_grads(nn.dot_product_attention, *up, **theirs)
  for fn in (topk.dot_product_attention,
             functools.partial(topk.chunked_attention, query_chunk_size=3),
             functools.partial(topk.topk_attention, k=LK, query_chunk_size=3)):
    out, grads = _loss_grads(fn, q, k, v, **ours)
    assert out.dtype == jnp.bfloat16
    assert grads[0].dtype == jnp.bfloat16
    _assert_trees_close((out, grads), ref, 5e-2)

@pytest.mark.parametrize('case', ('causal', 'key_padding', 'query_padding', 'all_forms'))
@pytest.mark.parametrize('dtype', (jnp.float32, jnp.bfloat16))
def test_dense_masks_equal_full_mask(case, dtype):
  # The per-position masks and is_causal mean exactly the full mask they stand for.
  ours, theirs = _case(case)
  q, k, v = _inputs(dtype=dtype)
  with_masks = _loss_grads(topk.dot_product_attention, q, k, v, **ours)
  with_full_mask = _loss_grads(topk.dot_product_attention, q, k, v, **theirs)
  _assert_trees_close(with_masks, with_full_mask, 1e-6)
  assert with_masks[0].dtype == dtype

def test_dense_draws_flax_dropout_mask():
  # The same mask as flax (a different one would change outputs by O(1)); the two programs
  # are fused differently by XLA, which on some CPUs rounds the last bit differently.
  q, k, v = _inputs()
  ours, theirs = _case('mask')
  rng = jax.random.key(3)
  for broadcast in (True, False):
    kw = dict(dropout_rng=rng, dropout_rate=0.3, broadcast_dropout=broadcast)
    ours_fn = jax.jit(functools.partial(topk.dot_product_attention, **ours, **kw))
    flax_fn = jax.jit(functools.partial(nn.dot_product_attention, **theirs, **kw))
    np.testing.assert_allclose(ours_fn(q, k, v), flax_fn(q, k, v), rtol=1e-6, atol=1e-6)
    no_dropout = nn.dot_product_attention(q, k, v, **theirs)
    assert np.abs(ours_fn(q, k, v) - no_dropout).max() > 1e-2

def test_dtype_argument():
  q, k, v = _inputs()
  out = topk.topk_attention(q, k, v, k=3, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  assert out.shape == (B, LQ, H, D)

def test_extra_batch_dims_and_value_depth():
  r = np.random.default_rng(4)
  q = jnp.asarray(r.normal(size=(2, 3, 5, H, D)), jnp.float32)
  k = jnp.asarray(r.normal(size=(2, 3, 6, H, D)), jnp.float32)
  v = jnp.asarray(r.normal(size=(2, 3, 6, H, 3)), jnp.float32)
  mask = jnp.asarray(r.random((3, 1, 5, 6)) > 0.3)
  ref = nn.dot_product_attention(q, k, v, mask=mask)
  out = topk.topk_attention(q, k, v, mask=mask, k=6, query_chunk_size=2)
  np.testing.assert_allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------------------- top-k
# k < kv_len against a plain dense top-k reference.


@pytest.mark.parametrize('k_keep, masked, use_bias', [(1, False, False), (4, True, False),
                                                      (4, True, True)])
def test_matches_reference(k_keep, masked, use_bias):
  q, k, v = _inputs(seed=5)
  ours, theirs = _case('all_forms' if masked else 'plain')
  if not use_bias:
    ours.pop('bias', None)
    theirs.pop('bias', None)
  mask, bias = theirs.get('mask'), theirs.get('bias')

  def ref_fn(q, k, v, bias=None, mask=None):
    return reference_topk(q, k, v, k_keep, mask=mask, bias=bias)[0]

  ref = _loss_grads(ref_fn, q, k, v, bias=bias, mask=mask)
  ours_fn = functools.partial(topk.topk_attention, k=k_keep, query_chunk_size=3)
  _assert_trees_close(_loss_grads(ours_fn, q, k, v, **ours), ref, 1e-5)

def test_masked_keys_never_weighted():
  # Causal rows have fewer than k valid keys: masked keys must get no weight, no NaN.
  q, k, v = _inputs(seed=6)
  v = v.at[:, 1:].set(1e6)  # any weight on a future key would show
  out = topk.topk_attention(q, k, v, k=5, is_causal=True, query_chunk_size=4)
  np.testing.assert_allclose(out[:, 0], v[:, 0], atol=1e-5)
  fully_masked = topk.topk_attention(q, k, v, k=3, mask=jnp.zeros((LQ, LK), bool))
  assert np.all(np.isfinite(fully_masked))
  relu = topk.topk_attention(q, k, v, k=3, mask=jnp.zeros((LQ, LK), bool), kernel='relu')
  np.testing.assert_array_equal(relu, 0.0)

def test_unselected_keys_get_exactly_zero_gradient():
  q, k, v = _inputs(seed=7)
  q = q[:, :1]
  k_keep = 3
  grads = jax.grad(lambda k, v: jnp.sum(topk.topk_attention(q, k, v, k=k_keep) ** 2),
                   argnums=(0, 1))(k, v)
  _, kept = reference_topk(q, k, v, k_keep)  # [B, H, 1, LK]
  kept = jnp.swapaxes(kept[:, :, 0], 1, 2)[..., None]  # [B, LK, H, 1]
  for g in grads:
    np.testing.assert_array_equal(jnp.where(kept, 0.0, g), 0.0)
    assert np.all(np.any(jnp.where(kept, g, 0.0) != 0, axis=(1, 3)))


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize('kind, broadcast', [('chunked', True), ('topk', False)])
def test_deterministic_given_rng_and_gradients_match_reference(kind, broadcast):
  fn = topk.make_attention_fn(kind, query_chunk_size=3, **({'k': LK} if kind == 'topk' else {}))
  q, k, v = _inputs(seed=8)
  mask = _case('mask')[0]['mask']
  kw = dict(mask=mask, dropout_rate=0.4, broadcast_dropout=broadcast)
  run = jax.jit(lambda q, k, v, rng: fn(q, k, v, dropout_rng=rng, **kw))
  out1 = run(q, k, v, jax.random.key(1))
  np.testing.assert_array_equal(out1, run(q, k, v, jax.random.key(1)))
  assert np.abs(out1 - run(q, k, v, jax.random.key(2))).max() > 1e-3
  np.testing.assert_allclose(fn(q, k, v, dropout_rng=jax.random.key(1), deterministic=True, **kw),
                             nn.dot_product_attention(q, k, v, mask=mask), atol=1e-5)

  # Read the effective weights (dropout included) with identity values; the dropout mask does
  # not depend on the values, so the reference is (softmax * that fixed multiplier) @ v.
  eye = jnp.broadcast_to(jnp.eye(LK)[None, :, None, :], (B, LK, H, LK))
  weights = run(q, k, eye, jax.random.key(1))  # [B, LQ, H, LK]
  probs = jnp.swapaxes(nn.dot_product_attention_weights(q, k, mask=mask), 1, 2)
  multiplier = jnp.where(probs > 0, weights / jnp.where(probs > 0, probs, 1.0), 0.0)

  def ref_fn(q, k, v, bias=None):
    p = jnp.swapaxes(nn.dot_product_attention_weights(q, k, bias=bias, mask=mask), 1, 2)
    return jnp.einsum('bqhk,bkhd->bqhd', p * multiplier, v)

  ours = _loss_grads(functools.partial(fn, dropout_rng=jax.random.key(1), **kw), q, k, v)
  _assert_trees_close(ours, _loss_grads(ref_fn, q, k, v), 1e-5)


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize('kernel', ['relu', 'relu2', 'elu1'])
def test_forms_agree(kernel):
  q, k, v = _inputs(seed=10)
  mask = _case('mask')[0]['mask']
  ref = _loss_grads(functools.partial(topk.dot_product_attention, kernel=kernel), q, k, v,
                    mask=mask)
  for fn in (functools.partial(topk.chunked_attention, query_chunk_size=3, kernel=kernel),
             functools.partial(topk.topk_attention, k=LK, query_chunk_size=3, kernel=kernel)):
    _assert_trees_close(_loss_grads(fn, q, k, v, mask=mask), ref, 1e-5)


@pytest.mark.parametrize('kernel, score', [('relu', 1e-21), ('relu2', 1e-12), ('elu1', -30.0),
                                           ('elu1', -80.0)])
def test_kernel_gradients_stay_finite_on_rows_of_tiny_mass(kernel, score):
  # One valid key whose kappa is ~1e-21, 1e-24, 1e-13 or 1e-35 (a causal model's first query)
  # and one masked key: differentiated naively, kappa / sum(kappa) gives NaN there.
  scores = jnp.array([[score, jnp.finfo(jnp.float32).min]])
  weights, grads = jax.vmap(jax.value_and_grad(
      lambda s: jnp.sum(kernels.get_kernel(kernel)(s) * jnp.array([1.0, 2.0]))))(scores)
  assert np.all(np.isfinite(grads))
  assert float(weights[0]) == pytest.approx(1.0)  # the valid key takes all the weight


# ----------------------------------------------------------------------------- flax module


@pytest.mark.parametrize('kind, options', [
    ('vanilla', {}), ('chunked', {'query_chunk_size': 3}),
    ('topk', {'k': LK, 'query_chunk_size': 4}),
])
def test_drop_in_for_flax_module(kind, options):
  x = jnp.asarray(np.random.default_rng(11).normal(size=(B, LK, 8)), jnp.float32)
  mask = nn.make_attention_mask(jnp.arange(LK) < 6 * jnp.ones((B, 1)),
                                jnp.arange(LK) < 6 * jnp.ones((B, 1)))
  default = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=8)
  params = default.init(jax.random.key(0), x, x, mask=mask)
  ours = nn.MultiHeadDotProductAttention(
      num_heads=H, qkv_features=8, attention_fn=topk.make_attention_fn(kind, **options))
  np.testing.assert_allclose(ours.apply(params, x, x, mask=mask),
                             default.apply(params, x, x, mask=mask), atol=1e-5)


FORMS = {
    'vanilla': topk.dot_product_attention,
    'chunked': functools.partial(topk.chunked_attention, query_chunk_size=3),
    'topk': functools.partial(topk.topk_attention, k=4, query_chunk_size=3),
}


# ----------------------------------------------------------------------------- input dtypes
# Integer inputs are promoted to float32 as flax does; complex, non-numeric and integer
# dtypes are refused.


@pytest.mark.parametrize('kind', FORMS)
def test_integer_inputs_promoted_like_flax(kind):
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.integers(-3, 4, (B, LQ, H, D)), jnp.int32) for _ in range(3))
  mask = _case('mask')[0]['mask'][:, :, :, :LQ]
  out = FORMS[kind](q, k, v, mask=mask)
  assert out.dtype == jnp.float32
  as_float = [x.astype(jnp.float32) for x in (q, k, v)]
  np.testing.assert_allclose(out, FORMS[kind](*as_float, mask=mask), rtol=1e-6, atol=1e-6)
  if kind != 'topk':  # k < kv_len: not flax's dense result
    np.testing.assert_allclose(out, nn.dot_product_attention(q, k, v, mask=mask), atol=1e-5)
  assert np.abs(out).max() > 0.5

@pytest.mark.parametrize('kind', tuple(FORMS))
@pytest.mark.parametrize('bad', ('int_dtype', 'complex_dtype', 'complex_query', 'complex_value',
                                 'complex_bias', 'string_dtype'))
def test_refused(kind, bad):
  q, k, v = _inputs()
  kwargs, message = {
      'int_dtype': ({'dtype': jnp.int32}, 'dtype must be a real floating-point dtype'),
      'complex_dtype': ({'dtype': jnp.complex64}, 'dtype must be a real floating-point'),
      'string_dtype': ({'dtype': 'no-such-dtype'}, 'dtype must be a real floating-point'),
      'complex_query': ({'query': q * 1j}, 'query must be a real or integer array'),
      'complex_value': ({'value': v.astype(jnp.complex64)}, 'value must be a real or integer'),
      'complex_bias': ({'bias': jnp.ones((LQ, LK), jnp.complex64)},
                       'bias must be a real or integer array, got dtype complex64'),
  }[bad]
  args = {'query': q, 'key': k, 'value': v, **kwargs}
  with pytest.raises(ValueError, match=message):
    FORMS[kind](**args)

@pytest.mark.parametrize('kind', tuple(FORMS))
@pytest.mark.parametrize('flag', ('False', 1, None))
def test_is_causal_must_be_a_bool(kind, flag):
  # bool('False') is True: a string or a number would silently turn causal masking on or off.
  with pytest.raises(ValueError, match='is_causal must be True or False'):
    FORMS[kind](*_inputs(), is_causal=flag)
  np.testing.assert_array_equal(FORMS[kind](*_inputs(), is_causal=np.bool_(True)),
                                FORMS[kind](*_inputs(), is_causal=True))


@pytest.mark.parametrize('kind', tuple(FORMS))
@pytest.mark.parametrize('name', ('mask', 'bias', 'key_padding_mask', 'query_padding_mask'))
def test_non_numeric_mask_and_bias_refused(kind, name):
  q, k, v = _inputs()
  shape = {'key_padding_mask': (B, LK), 'query_padding_mask': (B, LQ)}.get(name, (LQ, LK))
  bad = np.full(shape, 'x')
  with pytest.raises(ValueError, match=f'{name} must be .* got dtype <U1'):
    FORMS[kind](q, k, v, **{name: bad})
  with pytest.raises(ValueError, match=f'{name} must be .* got dtype object'):
    FORMS[kind](q, k, v, **{name: np.full(shape, None)})


# ----------------------------------------------------------------------------- empty inputs
# Length 0 gives flax's result: no rows for q_len 0, zeros (a sum over no keys) for kv_len 0.


@pytest.mark.parametrize('kind', tuple(FORMS))
@pytest.mark.parametrize('lengths', ((0, LK), (LQ, 0), (0, 0)))
def test_matches_flax(kind, lengths):
  q, k, v = _inputs(lq=lengths[0], lk=lengths[1], dv=3)
  mask = jnp.ones((B, 1, *lengths), bool)
  out, grads = _loss_grads(FORMS[kind], q, k, v, mask=mask, key_padding_mask=jnp.ones(
      (B, lengths[1]), bool), query_padding_mask=jnp.ones((B, lengths[0]), bool))
  assert out.shape == (B, lengths[0], H, 3)
  np.testing.assert_array_equal(out, nn.dot_product_attention(q, k, v, mask=mask))
  np.testing.assert_array_equal(out, 0.0)
  for g, x in zip(grads[:3], (q, k, v), strict=True):
    assert g.shape == x.shape
    np.testing.assert_array_equal(g, 0.0)


class _Sow(nn.Module):
  """Calls an attention function with `module=self`, as flax's sow_weights=True does."""
  fn: Callable[..., jax.Array]

  @nn.compact
  def __call__(self, q, k, v, **kwargs):
    return self.fn(q, k, v, module=self, **kwargs)


def _scatter(weights, indices, kv_len):
  """Kept weights and key indices `[..., k]` -> dense weights `[..., kv_len]`."""
  return jnp.sum(jax.nn.one_hot(indices, kv_len) * weights[..., None], axis=-2)


# ----------------------------------------------------------------------------- sown weights
# flax's sow_weights: top-k sows its kept weights and indices, chunked refuses.


def test_topk_sows_kept_weights_equal_to_reference():
  q, k, v = _inputs(seed=12)
  ours, theirs = _case('all_forms')
  k_keep = 4
  fn = functools.partial(topk.topk_attention, k=k_keep, query_chunk_size=3)
  out, sown = _Sow(fn).apply({}, q, k, v, **ours, mutable=['intermediates'])
  np.testing.assert_array_equal(out, fn(q, k, v, **ours))
  weights, = sown['intermediates']['attention_weights']
  indices, = sown['intermediates']['attention_indices']
  assert weights.shape == (B, H, LQ, k_keep)
  assert indices.dtype == jnp.int32
  # Distinct valid key indices per query; weights equal the dense top-k reference's.
  assert np.all((indices >= 0) & (indices < LK))
  assert np.all(np.sort(indices, -1)[..., 1:] != np.sort(indices, -1)[..., :-1])
  _, kept = reference_topk(q, k, v, k_keep, **theirs)
  s = jnp.einsum('bqhd,bkhd->bhqk', q / np.sqrt(D), k) + theirs['bias']
  ref_weights = jax.nn.softmax(jnp.where(kept & theirs['mask'], s, -jnp.inf), axis=-1)
  rows_valid = np.any(theirs['mask'], axis=-1)  # fully masked rows: uniform over kept keys
  np.testing.assert_allclose(np.where(rows_valid[..., None], _scatter(weights, indices, LK),
                                      0.0),
                             np.where(rows_valid[..., None], ref_weights, 0.0), atol=1e-6)
  np.testing.assert_allclose(np.sum(weights, -1), 1.0, atol=1e-6)

def test_through_flax_module():
  # k >= kv_len: the sown top-k weights, scattered, equal the dense forms' sown weights; the
  # output and the parameter gradients do not change when weights are sown.
  x = jnp.asarray(np.random.default_rng(13).normal(size=(B, LQ, 8)), jnp.float32)
  mem = jnp.asarray(np.random.default_rng(14).normal(size=(B, LK, 8)), jnp.float32)
  mask = _case('mask')[0]['mask']

  def module(kind, **options):
    fn = None if kind is None else topk.make_attention_fn(kind, **options)
    return nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=8,
                                           **({} if fn is None else {'attention_fn': fn}))

  params = module(None).init(jax.random.key(0), x, mem, mask=mask)

  def run(m, sow):
    def loss(params):
      out, state = m.apply(params, x, mem, mask=mask, sow_weights=sow,
                           mutable=['intermediates'])
      return jnp.sum(out ** 2), (out, state.get('intermediates', {}))
    return jax.grad(loss, has_aux=True)(params)

  _, (_, flax_sown) = run(module(None), True)
  flax_weights, = flax_sown['attention_weights']
  _, (_, dense_sown) = run(module('vanilla'), True)
  np.testing.assert_allclose(dense_sown['attention_weights'][0], flax_weights, atol=1e-6)

  topk_module = module('topk', k=LK + 2, query_chunk_size=4)
  grads, (out, sown) = run(topk_module, True)
  plain_grads, (plain_out, plain_sown) = run(topk_module, False)
  assert plain_sown == {}
  np.testing.assert_array_equal(out, plain_out)
  _assert_trees_close(grads, plain_grads, 0.0)
  weights, = sown['attention_weights']
  indices, = sown['attention_indices']
  assert indices.shape == (B, H, LQ, LK)
  np.testing.assert_array_equal(np.sort(indices, -1), np.broadcast_to(np.arange(LK),
                                                                       indices.shape))
  np.testing.assert_allclose(_scatter(weights, indices, LK), flax_weights, atol=1e-6)

def test_chunked_refuses_to_sow():
  x = jnp.ones((B, LQ, 8))
  attn = nn.MultiHeadDotProductAttention(
      num_heads=H, attention_fn=topk.make_attention_fn('chunked', query_chunk_size=3))
  params = attn.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='chunked_attention cannot sow attention weights'):
    attn.apply(params, x, sow_weights=True, mutable=['intermediates'])



@pytest.mark.parametrize('kind, options', [
    ('vanilla', {}), ('chunked', {'query_chunk_size': 3}),
    ('topk', {'k': LK + 2, 'query_chunk_size': 4}),
])
def test_force_fp32_for_softmax_as_flax(kind, options):
  # flax's mixed precision: bfloat16 computation, float32 weights (sown in float32). flax
  # hands the flag to an attention_fn whose signature names it; our forms must take it.
  x = jnp.asarray(np.random.default_rng(15).normal(size=(B, LQ, 8)), jnp.float32)
  mem = jnp.asarray(np.random.default_rng(16).normal(size=(B, LK, 8)), jnp.float32)
  mask = _case('mask')[0]['mask']

  def module(**attention_fn):
    return nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=8, dtype=jnp.bfloat16,
                                           force_fp32_for_softmax=True, **attention_fn)

  params = module().init(jax.random.key(0), x, mem, mask=mask)
  ours = module(attention_fn=topk.make_attention_fn(kind, **options))
  sow = kind != 'chunked'  # chunked refuses to sow (quadratic weights)
  run = lambda m: m.apply(params, x, mem, mask=mask, sow_weights=sow,
                          mutable=['intermediates'])
  flax_out, flax_sown = run(module())
  out, sown = run(ours)
  assert out.dtype == flax_out.dtype == jnp.bfloat16
  _assert_trees_close(out, flax_out, 2e-2)
  if not sow:
    return
  flax_weights, = flax_sown['intermediates']['attention_weights']
  weights, = sown['intermediates']['attention_weights']
  assert flax_weights.dtype == weights.dtype == jnp.float32
  if kind == 'topk':
    weights = _scatter(weights, sown['intermediates']['attention_indices'][0], LK)
  # flax's scores are bfloat16, ours float32: equal to bfloat16's rounding.
  np.testing.assert_allclose(weights, flax_weights, atol=2e-2)
  # The weights are float32's softmax, not bfloat16 values held in float32.
  assert np.any(np.asarray(weights) != np.asarray(weights.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize('kind', tuple(FORMS))
def test_force_fp32_for_softmax_keeps_weights_in_float32(kind):
  # Two keys with weights near 0.51 and 0.49 and values +1 and -1: the output, their
  # difference 0.02, moves by 7% when the weights are rounded to bfloat16 first (as without the
  # flag, and as flax), far more than the output's own bfloat16 rounding (0.4%).
  q = jnp.asarray([[[[1.0, 0, 0, 0]]]], jnp.bfloat16)  # [1, 1, 1, 4]
  k = jnp.asarray([[[[0.08, 0, 0, 0]], [[0.0, 0, 0, 0]]]], jnp.bfloat16)
  v = jnp.asarray([[[[1.0] * 4], [[-1.0] * 4]]], jnp.bfloat16)
  weights = jax.nn.softmax(jnp.asarray([0.04, 0.0]))
  forced = FORMS[kind](q, k, v, force_fp32_for_softmax=True)
  plain = FORMS[kind](q, k, v)
  assert forced.dtype == plain.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(forced, np.float32), weights[0] - weights[1],
                             rtol=1e-2)
  rounded = weights.astype(jnp.bfloat16).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(plain, np.float32), rounded[0] - rounded[1], rtol=1e-2)
  with pytest.raises(ValueError, match='force_fp32_for_softmax must be True or False'):
    FORMS[kind](q, k, v, force_fp32_for_softmax='yes')

def _temp_bytes(fn, length):
  spec = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
  grad = jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
  return jax.jit(grad).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


# ----------------------------------------------------------------------------- memory
# Compiled forward+backward temp memory: quadratic for vanilla, linear for the others.


@pytest.mark.parametrize('kind, options, min_ratio, max_ratio', [
    ('vanilla', {}, 12.0, None), ('chunked', {'query_chunk_size': 64}, None, 6.0),
    ('topk', {'k': 16, 'query_chunk_size': 64}, None, 6.0),
])
def test_growth_from_l_to_4l(kind, options, min_ratio, max_ratio):
  fn = topk.make_attention_fn(kind, **options)
  ratio = _temp_bytes(fn, 1024) / _temp_bytes(fn, 256)
  if min_ratio is not None:
    assert ratio > min_ratio
  if max_ratio is not None:
    assert ratio < max_ratio


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('kwargs, message', [
    (dict(k=0), 'k must be an integer >= 1'), (dict(k=2.5), 'k must be an integer >= 1'),
    (dict(k=True), 'k must be an integer >= 1'),
    (dict(k=2, query_chunk_size=0), 'query_chunk_size must be'),
    (dict(k=2, kernel='nope'), 'Unknown attention kernel'),
    (dict(k=2, mask=jnp.ones((3, LQ, LK), bool)), r'mask of shape \(3, 7, 9\) does not'),
    (dict(k=2, bias=jnp.ones((LQ, 4))), r'bias of shape \(7, 4\) does not'),
    (dict(k=2, mask=jnp.ones((LQ, LK), jnp.complex64)), 'mask must be bool or 0/1'),
    (dict(k=2, key_padding_mask=jnp.ones((B, LQ), bool)), 'key_padding_mask of shape'),
    (dict(k=2, query_padding_mask=jnp.ones((B, LK), bool)), 'query_padding_mask of shape'),
    (dict(k=2, dropout_rate=0.1), 'dropout_rng is required'),
    (dict(k=2, dropout_rate=1.0), 'dropout_rate must be in'),
])
def test_raises(kwargs, message):
  q, k, v = _inputs()
  with pytest.raises(ValueError, match=message):
    topk.topk_attention(q, k, v, **kwargs)

@pytest.mark.parametrize('q_shape, k_shape, message', [
    ((B, LQ, H + 1, D), (B, LK, H, D), 'same number of heads'),
    ((B, LQ, H, D + 1), (B, LK, H, D), 'same head_dim'),
    ((B + 1, LQ, H, D), (B, LK, H, D), 'same batch dims'), ((LQ, H), (LK, H), 'same rank >= 3'),
])
def test_shape_mismatch(q_shape, k_shape, message):
  with pytest.raises(ValueError, match=message):
    topk.chunked_attention(jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(k_shape))
