"""Tests of checkpoint saving and restoring (lra.checkpointing); the loop's use of them (resume,
fallback, set-aside checkpoints) is tested in test_train.py."""
import os

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from lra.checkpointing import RunCheckpoints


def test_save_refuses_a_non_finite_state(tmp_path):
  checkpoints = RunCheckpoints(str(tmp_path), keep=1)
  state = {'w': jnp.array([1.0, np.nan]), 'step': jnp.array(3)}
  with pytest.raises(FloatingPointError, match='step 3 holds NaN or infinite'):
    checkpoints.save(3, state, wall_time_s=1.0, train_window={},
                     data_iterator=iter(grain.MapDataset.range(1).to_iter_dataset()))
  with pytest.raises(FloatingPointError, match='step 3 holds NaN or infinite'):
    checkpoints.save_best(3, state, {'accuracy': 0.5, 'loss': 1.0})
  assert not checkpoints.save_best(3, state, {'accuracy': 0.5, 'loss': float('nan')})
  checkpoints.close()
  assert not os.listdir(os.path.join(str(tmp_path), 'checkpoints'))
  assert not os.listdir(os.path.join(str(tmp_path), 'best_checkpoint'))
