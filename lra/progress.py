"""What the loop keeps track of between steps: the train metrics since the last record, the
divergence check on them, and the profiler's window of steps.
"""
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from lra.steps import Metrics


class Profiler:
  """Traces `num_steps` train steps with `jax.profiler` into `log_dir` (TensorBoard's profile
  plugin reads it), from the second step this process runs, so that compilation stays out."""

  def __init__(self, log_dir: str, first_step: int, num_steps: int):
    self._log_dir = log_dir
    self._start, self._stop = first_step + 2, first_step + 1 + num_steps
    self._enabled = num_steps > 0
    self._started = self._active = False

  def before(self, step: int) -> None:
    if self._enabled and step == self._start:
      jax.profiler.start_trace(self._log_dir)
      self._started = self._active = True

  def after(self, step: int, state: Any) -> None:
    if self._active and step == self._stop:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
      logging.info('Wrote a profile of steps %d-%d to %s.', self._start, self._stop,
                   self._log_dir)
    elif self._enabled and not self._started:
      logging.warning('No profile written: this process ran fewer than 2 steps.')


class Diverged(FloatingPointError):
  """Training produced NaN or infinity; `state_step` is the first step whose state is bad."""

  def __init__(self, message: str, state_step: int):
    super().__init__(message)
    self.state_step = state_step


# Train metrics that are means over a batch's scored targets (`lra.steps.target_terms`).
_PER_TARGET = ('loss', 'accuracy')


class TrainMetrics:
  """Host-side accumulator of per-step train metrics, fetched one step behind dispatch so the
  host never waits for the step it has just launched."""

  def __init__(self, window: Mapping[str, tuple[float, float]]):
    """`window`: the (weighted sum, weight) of each metric over the steps since the last summary
    (a resumed run's, from its checkpoint; empty for a fresh start)."""
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._sums = {name: total for name, (total, _) in window.items()}
    self._weights = {name: weight for name, (_, weight) in window.items()}

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def fetch(self, keep_last: bool) -> None:
    """Fetches pending metrics (all but the newest if `keep_last`).

    Raises:
      Diverged: a step's loss is NaN or infinite (the state it started from is bad), or its
        update made the state so.
    """
    ready = self._pending[:-1] if keep_last else self._pending
    self._pending = self._pending[len(ready):]
    for step, metrics in ready:
      values = jax.device_get(metrics)
      finite = values.pop('finite')
      if not np.isfinite(values['loss']):
        raise Diverged(f'training loss is {values["loss"]} at step {step}', step - 1)
      if not finite:
        raise Diverged(f'the update of step {step} made the train state NaN or infinite (the '
                        f'loss of its batch was {values["loss"]:.4g})', step)
      scored = float(values.pop('scored'))
      for name, value in values.items():
        weight = scored if name in _PER_TARGET else 1.0
        self._sums[name] = self._sums.get(name, 0.0) + weight * float(value)
        self._weights[name] = self._weights.get(name, 0.0) + weight

  def window(self) -> dict[str, tuple[float, float]]:
    """(weighted sum, weight) of each metric over the fetched steps since the last summary."""
    return {name: (total, self._weights[name]) for name, total in self._sums.items()}

  def summary(self) -> Metrics:
    """Means since the last summary (of loss and accuracy: over the scored targets; other
    metrics: over steps), then resets."""
    means = {name: total / max(self._weights[name], 1.0) for name, total in self._sums.items()}
    self._sums, self._weights = {}, {}
    return means
