"""Tests of the jitted steps and their padding (lra.steps)."""
import jax
import numpy as np
import pytest

from configs import listops
from lra import build, steps


def test_pad_batch():
  batch = {'inputs': np.ones((3, 4), np.int32), 'targets': np.array([1, 2, 3], np.int32)}
  padded = steps.pad_batch(batch, 8)
  assert padded['inputs'].shape == (8, 4) and padded['inputs'][3:].sum() == 0
  np.testing.assert_array_equal(padded['weights'], [1, 1, 1, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match='more than the padded size 2'):
    steps.pad_batch(batch, 2)


def test_evaluate_ignores_padding_rows_and_weighs_every_example_once():
  # Evaluating 5 examples in one batch, or as batches of 3 and 2 (each padded to the eval size),
  # gives the same means.
  trainer = build.make_trainer(build.build(listops.get_config('smoke')))
  params = trainer.init_state().params
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(1, 10, (5, 64), np.int32),
           'targets': rng.integers(0, 10, (5,), np.int32)}
  whole = trainer.evaluate(params, [batch])
  parts = trainer.evaluate(params, [{k: v[:3] for k, v in batch.items()},
                                    {k: v[3:] for k, v in batch.items()}])
  assert parts == pytest.approx(whole, rel=1e-6)
  assert steps.num_params(params) == sum(x.size for x in jax.tree.leaves(params))
