"""Tests of the train-metric windows and the divergence check (lra.progress)."""
import numpy as np
import pytest

from lra.progress import Diverged, TrainMetrics


def _step(loss: float, finite: bool = True, scored: float = 8.0) -> dict[str, np.ndarray]:
  return {'loss': np.float32(loss), 'accuracy': np.float32(0.5), 'scored': np.float32(scored),
          'learning_rate': np.float32(0.1), 'finite': np.bool_(finite)}


def test_summary_weighs_targets_and_a_window_carries_over():
  metrics = TrainMetrics({})
  metrics.add(1, _step(1.0, scored=1.0))
  metrics.add(2, _step(4.0, scored=3.0))
  metrics.fetch(keep_last=True)  # the newest step stays pending
  assert metrics.window() == {'loss': (1.0, 1.0), 'accuracy': (0.5, 1.0),
                              'learning_rate': (pytest.approx(0.1), 1.0)}
  # A resumed run starts from the saved window and averages the same steps.
  resumed = TrainMetrics(metrics.window())
  resumed.add(2, _step(4.0, scored=3.0))
  resumed.fetch(keep_last=False)
  summary = resumed.summary()
  assert summary['loss'] == pytest.approx((1.0 + 3 * 4.0) / 4)
  assert summary['learning_rate'] == pytest.approx(0.1)
  assert resumed.window() == {}


def test_divergence_names_the_first_bad_state():
  metrics = TrainMetrics({})
  metrics.add(3, _step(float('nan')))
  with pytest.raises(Diverged, match='training loss is nan at step 3') as error:
    metrics.fetch(keep_last=False)
  assert error.value.state_step == 2  # step 3 started from a bad state
  metrics = TrainMetrics({})
  metrics.add(3, _step(1.0, finite=False))
  with pytest.raises(Diverged, match='the update of step 3 made the train state NaN') as error:
    metrics.fetch(keep_last=False)
  assert error.value.state_step == 3
