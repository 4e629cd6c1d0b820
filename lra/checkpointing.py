"""Orbax checkpoints of a training run: the last few periodic ones and the best-validation one.

Layout inside a workdir:
  checkpoints/<step>/       periodic, the last `keep` of them (resume starts from the latest):
                            `state/` (the train state) and `data/` (the train stream's grain
                            iterator state, `process_<i>-of-<n>.json` per process)
  best_checkpoint/<step>/   the single step with the highest validation accuracy so far, with that
                            accuracy stored as its orbax metric (`state/` only)
  unusable_checkpoints/<step>/  periodic checkpoints set aside: ones a resume could not restore
                            (it fell back past them), or states whose training loss diverged
  unusable_checkpoints/best-<step>/  best checkpoints set aside: of a step past the one a run
                            resumed from (that run evaluates those steps again), or unrestorable

Every checkpoint is finite: `save` and `save_best` refuse a state with a NaN or infinity, so a
diverged run never leaves a checkpoint that its rerun would resume into.
"""

import contextlib
import errno
import gc
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

PyTree = Any

_BEST_METRIC = 'accuracy'
_WALL_TIME = 'wall_time_s'
_TRAIN_WINDOW = 'train_window'
UNUSABLE_DIR = 'unusable_checkpoints'


class CheckpointError(RuntimeError):
  """No usable checkpoint where one is needed; the message names each one tried."""


def is_finite(tree: PyTree) -> jax.Array:
  """Scalar bool: every floating-point value in `tree` is finite (integer leaves are ignored)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in leaves]))


_is_finite = jax.jit(is_finite)


def _is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` or an error it was raised from is ENOSPC: an `OSError`, or TensorStore's
  RESOURCE_EXHAUSTED that quotes the OS error."""
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if 'no space left on device' in str(error).lower():
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def _saving(path: str) -> Iterator[None]:
  """Turns a full disk during a save into one `CheckpointError` naming `path`: orbax raises it
  from deep in TensorStore, under tracebacks that hide the cause."""
  try:
    yield
  except Exception as error:
    if not _is_disk_full(error):
      raise
    raise CheckpointError(f'cannot save checkpoint {path}: no space left on device; free space '
                          'and rerun, which resumes from the last checkpoint') from None


class _QuietAbandonedReads:
  """A `sys.unraisablehook` that counts and drops the errors of orbax's abandoned array reads,
  and passes every other error on to the hook it replaced."""

  def __init__(self, previous: Callable[[Any], None]):
    self.previous = previous
    self.count = 0

  def __call__(self, args: Any) -> None:
    if _of_an_abandoned_read(args):
      self.count += 1
    else:
      self.previous(args)


def _of_an_abandoned_read(args: Any) -> bool:
  """Whether an unraisable error comes from a read whose event loop is gone: its completion
  callback finding the loop closed, or its coroutine raising in orbax's code when finalized."""
  if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == 'Event loop is closed':
    return True
  traceback = args.exc_traceback
  while traceback is not None:
    if f'{os.sep}orbax{os.sep}' in traceback.tb_frame.f_code.co_filename:
      return True
    traceback = traceback.tb_next
  return False


def _quiet_abandoned_reads() -> _QuietAbandonedReads:
  """Installs, once per process, the hook that keeps abandoned reads' errors out of the log.

  Orbax reads a checkpoint's arrays as tasks of an event loop that it closes as soon as one read
  fails. The reads still running finish later and find their loop closed, and the tasks still
  pending raise when they are finalized; Python prints each as an 'Exception ignored' traceback,
  one per array, burying the one warning that says which checkpoint failed. The first of them
  can come before the failed restore returns, so the hook goes in before any restore.
  """
  if not isinstance(sys.unraisablehook, _QuietAbandonedReads):
    sys.unraisablehook = _QuietAbandonedReads(sys.unraisablehook)
  return sys.unraisablehook


def _finalize_abandoned_reads(hook: _QuietAbandonedReads, before: int) -> None:
  """Collects the reads a failed restore left pending, and logs how many errors `hook` dropped
  since it counted `before`."""
  gc.collect()
  if hook.count > before:
    logging.info('Discarded %d errors of reads that the failed restore left pending.',
                 hook.count - before)


class RunCheckpoints:
  """Saves and restores the train state of one workdir.

  Saves are synchronous: the states are small, and a finished save means a signal-triggered exit
  right after it leaves a complete checkpoint. Opened with `read_only=True` (evaluation), nothing
  is created, written or moved.
  """

  def __init__(self, workdir: str, *, keep: int, read_only: bool = False):
    if keep < 1:
      raise ValueError(f'keep_checkpoints must be >= 1, got {keep}')
    self._workdir = os.path.abspath(workdir)
    self._read_only = read_only
    self._latest = ocp.CheckpointManager(
        os.path.join(self._workdir, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                             read_only=read_only,
                                             enable_async_checkpointing=False))
    self._best = ocp.CheckpointManager(
        os.path.join(self._workdir, 'best_checkpoint'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else 1, best_fn=lambda metrics: metrics[_BEST_METRIC],
            best_mode='max', read_only=read_only, enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def steps(self) -> list[int]:
    """Steps of the periodic checkpoints, oldest first."""
    return sorted(self._latest.all_steps())

  def best_step(self) -> int | None:
    return self._best.best_step()

  def set_aside_best_steps(self) -> list[int]:
    """Steps of the best checkpoints moved to `unusable_checkpoints/` (`best-<step>`, or
    `best-<step>-<n>` when that step was set aside before), oldest first."""
    aside = os.path.join(self._workdir, UNUSABLE_DIR)
    names = os.listdir(aside) if os.path.isdir(aside) else []
    return sorted({int(name.split('-')[1]) for name in names if name.startswith('best-')})

  def best_accuracy(self) -> float:
    """Validation accuracy of the best checkpoint, or -inf when there is none yet."""
    step = self._best.best_step()
    return -float('inf') if step is None else float(self._best.metrics(step)[_BEST_METRIC])

  def path(self, which: str, step: int) -> str:
    """The folder of checkpoint `step` of 'latest' (periodic) or 'best'."""
    return str(self._manager(which).directory / str(step))

  def save(self, step: int, state: PyTree, *, wall_time_s: float,
           train_window: Mapping[str, tuple[float, float]],
           data_iterator: grain.DatasetIterator) -> None:
    """Saves a periodic checkpoint of `state` and the position of `data_iterator` (the train
    stream), with the run's elapsed `wall_time_s` and `train_window` (metric name -> (weighted
    sum, weight) of the train steps since the last logged record, so that a run resumed between
    two records logs the same means as an uninterrupted one); a step that is already saved is left
    as it is.

    Raises:
      FloatingPointError: `state` holds a NaN or infinity (nothing is written).
      CheckpointError: the disk is full.
    """
    if self._latest.latest_step() != step:
      self._check_finite(step, state)
      items = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                 data=grain.checkpoint.CheckpointSave(data_iterator))
      window = {name: list(sums) for name, sums in train_window.items()}
      with _saving(self.path('latest', step)):
        self._latest.save(step, args=items,
                          custom_metadata={_WALL_TIME: wall_time_s, _TRAIN_WINDOW: window})

  def save_best(self, step: int, state: PyTree, validation: dict[str, float]) -> bool:
    """Saves `state` as the best checkpoint if its validation accuracy beats the best so far (ties
    keep the earlier step) and its validation loss is finite. Returns whether it did.

    Raises:
      FloatingPointError: `state` holds a NaN or infinity (nothing is written).
      CheckpointError: the disk is full.
    """
    accuracy, loss = validation['accuracy'], validation['loss']
    if not (math.isfinite(loss) and math.isfinite(accuracy)) or accuracy <= self.best_accuracy():
      return False
    self._check_finite(step, state)
    with _saving(self.path('best', step)):
      self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      metrics={_BEST_METRIC: accuracy})
    return True

  def wall_time_s(self, step: int) -> float:
    """Elapsed wall time of the run when periodic checkpoint `step` was saved (0 if unknown)."""
    return float(self._custom_metadata(step).get(_WALL_TIME, 0.0))

  def train_window(self, step: int) -> dict[str, tuple[float, float]]:
    """The `train_window` saved with periodic checkpoint `step` (empty if it has none)."""
    window = self._custom_metadata(step).get(_TRAIN_WINDOW, {})
    return {name: (float(total), float(weight)) for name, (total, weight) in window.items()}

  def _custom_metadata(self, step: int) -> dict[str, Any]:
    return self._latest.metadata(step).custom_metadata or {}

  def restore(self, which: str, target: PyTree, *,
              data_iterator: grain.DatasetIterator | None = None) -> tuple[int, PyTree]:
    """Restores the 'best' or the 'latest' usable checkpoint, laid out like `target` (shapes,
    dtypes, shardings), and sets `data_iterator` (if given; 'latest' only) to the train stream's
    position saved with it.

    A checkpoint is usable when it restores and holds only finite values. For 'latest' an
    unusable checkpoint is logged and the next older kept one is tried; once one restores, the
    newer unusable ones are moved to `unusable_checkpoints/` (unless read-only), so the run can
    save those steps again. Nothing is moved when none restores (e.g. the config's model differs
    from the checkpoints').

    Returns:
      (step, state).
    Raises:
      FileNotFoundError: the workdir has no such checkpoint.
      CheckpointError: none of them is usable; names each and why.
    """
    manager = self._manager(which)
    if which == 'best':
      steps = [] if manager.best_step() is None else [manager.best_step()]
    else:
      steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint under {manager.directory}')
    items = {'state': ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, target))}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    failures = []
    hook = _quiet_abandoned_reads()
    for step in steps:
      path = self.path(which, step)
      dropped = hook.count
      try:
        state = manager.restore(step, args=ocp.args.Composite(**items)).state
        self._check_finite(step, state)
      except Exception as error:  # orbax, TensorStore and JSON each raise their own types
        first_line = str(error).split('\n', 1)[0][:300]  # TensorStore appends its spec
        cause = f'{type(error).__name__}: {first_line}'
      else:
        cause = None
      if cause is not None:
        # Outside the `except`: the error's traceback, which holds orbax's event loop, is gone.
        _finalize_abandoned_reads(hook, dropped)
        failures.append(f'{path}: {cause}')
        logging.warning('Checkpoint %s is unusable (%s).', path, cause)
        continue
      if failures:
        logging.warning('Falling back to the older checkpoint %s past %d unusable newer '
                        'one(s).', path, len(failures))
        self.set_aside([s for s in steps if s > step])
      return step, state
    raise CheckpointError(
        'no usable checkpoint; each failed to restore:\n  ' + '\n  '.join(failures) +
        '\nIf the config matches the run, move these folders away (or use a new --workdir) to '
        'start again.')

  def close(self) -> None:
    self._latest.close()
    self._best.close()

  def _manager(self, which: str) -> ocp.CheckpointManager:
    managers = {'best': self._best, 'latest': self._latest}
    if which not in managers:
      raise ValueError(f'checkpoint must be one of {sorted(managers)}, got {which!r}')
    return managers[which]

  def _check_finite(self, step: int, state: PyTree) -> None:
    if not bool(_is_finite(state)):
      raise FloatingPointError(f'the train state of step {step} holds NaN or infinite values')

  def set_aside(self, steps: list[int], which: str = 'latest') -> None:
    """Moves checkpoints `steps` of 'latest' (periodic, to `<step>`) or 'best' (to
    `best-<step>`) into `unusable_checkpoints/` (kept for inspection, out of the run's way);
    read-only checkpoints move nothing."""
    manager = self._manager(which)
    if self._read_only or not steps:
      return
    aside = os.path.join(self._workdir, UNUSABLE_DIR)
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        name = str(step) if which == 'latest' else f'best-{step}'
        target = os.path.join(aside, name)
        suffix = 0
        while os.path.exists(target):
          suffix += 1
          target = os.path.join(aside, f'{name}-{suffix}')
        os.rename(self.path(which, step), target)
        logging.warning('Moved unusable checkpoint %s to %s.', self.path(which, step), target)
    multihost_utils.sync_global_devices('RunCheckpoints:set_aside')
    manager.reload()
