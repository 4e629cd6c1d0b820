"""Orbax checkpoints of a training run: the last few periodic ones and the best-validation one.

Layout inside a workdir:
  checkpoints/<step>/       periodic, the last `keep` of them (resume starts from the latest)
  best_checkpoint/<step>/   the single step with the highest validation accuracy so far, with that
                            accuracy stored as its orbax metric
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any

_BEST_METRIC = 'accuracy'


class RunCheckpoints:
  """Saves and restores the train state of one workdir.

  Saves are synchronous: the states are small, and a finished save means a signal-triggered exit
  right after it leaves a complete checkpoint.
  """

  def __init__(self, workdir: str, *, keep: int):
    if keep < 1:
      raise ValueError(f'keep_checkpoints must be >= 1, got {keep}')
    self._latest = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False))
    self._best = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'best_checkpoint')),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics[_BEST_METRIC], best_mode='max',
            enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.best_step()

  def best_accuracy(self) -> float:
    """Validation accuracy of the best checkpoint, or -inf when there is none yet."""
    step = self._best.best_step()
    return -float('inf') if step is None else float(self._best.metrics(step)[_BEST_METRIC])

  def save(self, step: int, state: PyTree) -> None:
    """Saves a periodic checkpoint; a step that is already saved is left as it is."""
    if self._latest.latest_step() != step:
      self._latest.save(step, args=ocp.args.StandardSave(state))

  def save_best(self, step: int, state: PyTree, accuracy: float) -> bool:
    """Saves `state` as the best checkpoint if `accuracy` beats the best so far (ties keep the
    earlier step). Returns whether it did."""
    if accuracy <= self.best_accuracy():
      return False
    self._best.save(step, args=ocp.args.StandardSave(state), metrics={_BEST_METRIC: accuracy})
    return True

  def restore(self, which: str, target: PyTree) -> tuple[int, PyTree]:
    """Restores the 'best' or the 'latest' checkpoint, laid out like `target` (shapes, dtypes,
    shardings).

    Returns:
      (step, state).
    Raises:
      FileNotFoundError: the workdir has no such checkpoint.
    """
    managers = {'best': self._best, 'latest': self._latest}
    if which not in managers:
      raise ValueError(f'checkpoint must be one of {sorted(managers)}, got {which!r}')
    manager = managers[which]
    step = manager.best_step() if which == 'best' else manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {manager.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return step, manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._latest.close()
    self._best.close()
