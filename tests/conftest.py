"""Fixtures shared by several test modules."""
import jax
import pytest


@pytest.fixture(scope='module')
def fast_compilation():
  """XLA without most optimizations for one module (compilation dominates tiny models); the
  setting is restored afterwards for the other modules."""
  saved = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', saved)
