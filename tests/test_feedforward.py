"""Tests for topk.TopKFeedForward and topk.DenseFeedForward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import topk

pytestmark = pytest.mark.usefixtures('fast_compilation')  # compilation dominates (conftest.py)

D_MODEL, MLP_DIM = 6, 10


class DenseMlp(nn.Module):
  """The dense block the layer must reproduce (LRA MlpBlock without dropout)."""
  mlp_dim: int
  activation: object

  @nn.compact
  def __call__(self, x):
    hidden = self.activation(nn.Dense(self.mlp_dim)(x))
    return nn.Dense(x.shape[-1])(hidden)


def _x(shape=(2, 5, D_MODEL)):
  return jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)


def _reference(params, x, k, activation):
  """Dense pre-activations; all but the top k per token zeroed after the activation."""
  d0, d1 = params['params']['Dense_0'], params['params']['Dense_1']
  pre = x @ d0['kernel'] + d0['bias']
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(pre), k)
  kept = jnp.any(jax.nn.one_hot(idx, pre.shape[-1], dtype=bool), axis=-2)
  return jnp.where(kept, activation(pre), 0.0) @ d1['kernel'] + d1['bias']


def test_param_tree_matches_dense_mlp():
  x = _x()
  ours = topk.TopKFeedForward(mlp_dim=MLP_DIM, k=3).init(jax.random.key(0), x)
  dense = DenseMlp(MLP_DIM, nn.relu).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, dense)


@pytest.mark.parametrize('activation, k, chunk', [(nn.relu, MLP_DIM, 4), (nn.gelu, MLP_DIM + 3, 3),
                                                  (nn.relu, 3, 4), (nn.gelu, 1, 16)])
def test_matches_reference(activation, k, chunk):
  x = _x()
  dense = DenseMlp(MLP_DIM, activation)
  params = dense.init(jax.random.key(1), x)
  layer = topk.TopKFeedForward(mlp_dim=MLP_DIM, k=k, query_chunk_size=chunk,
                               activation=activation)

  def ours(p):
    return layer.apply(p, x)

  def ref(p):
    return dense.apply(p, x) if k >= MLP_DIM else _reference(p, x, k, activation)

  np.testing.assert_allclose(ours(params), ref(params), atol=1e-5)
  g_ours = jax.grad(lambda p: jnp.sum(ours(p) ** 2))(params)
  g_ref = jax.grad(lambda p: jnp.sum(ref(p) ** 2))(params)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('activation', [nn.relu, nn.gelu])
def test_dense_layer_is_the_reference_and_top_k_with_every_unit(activation):
  x = _x()
  params = DenseMlp(MLP_DIM, activation).init(jax.random.key(1), x)
  dense = topk.DenseFeedForward(mlp_dim=MLP_DIM, activation=activation)
  full = topk.TopKFeedForward(mlp_dim=MLP_DIM, k=MLP_DIM, activation=activation)
  np.testing.assert_allclose(dense.apply(params, x), DenseMlp(MLP_DIM, activation).apply(params, x),
                             atol=1e-6)
  np.testing.assert_allclose(full.apply(params, x), dense.apply(params, x), atol=1e-5)


def test_out_dim_dropout_and_dtype():
  x = _x().astype(jnp.bfloat16)
  layer = topk.TopKFeedForward(mlp_dim=MLP_DIM, k=4, out_dim=3, dropout_rate=0.5,
                               query_chunk_size=4)
  params = layer.init(jax.random.key(0), x)
  run = jax.jit(lambda rng: layer.apply(params, x, deterministic=False, rngs={'dropout': rng}))
  out = run(jax.random.key(1))
  assert out.shape == (2, 5, 3)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, run(jax.random.key(1)))
  assert not np.array_equal(out, run(jax.random.key(2)))


@pytest.mark.parametrize('module, fields, message', [
    (topk.TopKFeedForward, dict(k=0), 'k must'),
    (topk.TopKFeedForward, dict(k=2, query_chunk_size=0), 'query_chunk_size must'),
    (topk.TopKFeedForward, dict(k=2, dropout_rate=1.0), 'dropout_rate must'),
    (topk.TopKFeedForward, dict(k=2, mlp_dim=0), 'mlp_dim must'),
    (topk.DenseFeedForward, dict(mlp_dim=0), 'mlp_dim must'),
    (topk.DenseFeedForward, dict(mlp_dim=2.5), 'mlp_dim must'),
    (topk.DenseFeedForward, dict(dropout_rate=-0.1), 'dropout_rate must'),
    (topk.DenseFeedForward, dict(dropout_rate=1.0), 'dropout_rate must'),
])
def test_bad_input(module, fields, message):
  with pytest.raises(ValueError, match=message):
    module(**{'mlp_dim': MLP_DIM, **fields}).init(jax.random.key(0), _x())


@pytest.mark.parametrize('module, options', [
    (topk.TopKFeedForward, {'k': 4, 'query_chunk_size': 4}), (topk.DenseFeedForward, {})])
def test_integer_input_promoted_and_complex_refused(module, options):
  layer = module(mlp_dim=MLP_DIM, **options)
  x = jnp.asarray(np.random.default_rng(2).integers(-3, 4, (2, 5, D_MODEL)), jnp.int32)
  params = layer.init(jax.random.key(0), x)
  out = layer.apply(params, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, layer.apply(params, x.astype(jnp.float32)), atol=1e-6)
  assert np.abs(out).max() > 0.1
  with pytest.raises(ValueError, match='x must be a real or integer array'):
    layer.apply(params, x.astype(jnp.complex64))
  with pytest.raises(ValueError, match='dtype must be a real floating-point dtype'):
    module(mlp_dim=MLP_DIM, dtype=jnp.int32, **options).apply(params, x)
