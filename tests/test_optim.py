"""Tests of the learning-rate schedules and the optimizer (lra.optim)."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lra.optim import make_optimizer, make_schedule


def test_schedules():
  rsqrt = make_schedule('rsqrt', 0.05, 100, 1000)
  assert float(rsqrt(0)) == 0.0
  np.testing.assert_allclose(rsqrt(50), 0.05 * 0.5 / 10, rtol=1e-6)
  np.testing.assert_allclose(rsqrt(100), 0.05 / 10, rtol=1e-6)  # LRA's peak: base/sqrt(warmup)
  np.testing.assert_allclose(rsqrt(400), 0.05 / 20, rtol=1e-6)
  cosine = make_schedule('cosine', 1e-3, 10, 110)
  np.testing.assert_allclose([cosine(5), cosine(10), cosine(65)], [5e-4, 1e-3, 5e-4], rtol=1e-5)
  constant = make_schedule('constant', 0.1, 0, 10)
  np.testing.assert_allclose([constant(0), constant(9)], [0.1, 0.1])
  with pytest.raises(ValueError, match="schedule must be one of.*'linear'"):
    make_schedule('linear', 0.1, 0, 10)


def test_adam_and_decoupled_weight_decay():
  params = {'w': jnp.array([2.0, -4.0])}
  tx = make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, grad_clip_norm=0.0)
  # A zero gradient leaves only the decay: p - lr * wd * p.
  updates, _ = tx.update({'w': jnp.zeros(2)}, tx.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, updates)['w'], [1.9, -3.8], rtol=1e-6)
  # First Adam step moves every parameter by lr against the gradient's sign.
  tx = make_optimizer(optax.constant_schedule(0.1), weight_decay=0.0, grad_clip_norm=1.0)
  updates, _ = tx.update({'w': jnp.array([30.0, -0.1])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.1, 0.1], rtol=1e-5)
  with pytest.raises(ValueError, match='grad_clip_norm'):
    make_optimizer(optax.constant_schedule(0.1), weight_decay=0.0, grad_clip_norm=-1.0)
