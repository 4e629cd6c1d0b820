"""Stopping a run at a step every process agrees on, when SIGTERM or SIGINT arrives.

A stopped run saves a checkpoint of that step and ends as the signal would have ended it, so a
scheduler that preempts the job sees the usual exit and a rerun resumes from the checkpoint.
"""
import signal
import threading
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
  """Turns SIGTERM/SIGINT into a stop after a step that every process agrees on.

  One process: the handlers set a flag that `at(step)` reads.
  Under `jax.distributed` (several processes, or `--multiprocess` with one): a per-process flag
  would let hosts stop, and save, at different steps. `jax.distributed.initialize` installs JAX's
  preemption notifier as the SIGTERM handler; it tells every process of the job, and
  `multihost_utils.reached_preemption_sync_point(step)` turns True on all of them at the same
  step (one past the largest step any of them had reached). A Python SIGTERM handler would
  replace the notifier, so only SIGINT gets one, and it forwards the interrupt as a SIGTERM.

  Used as a context manager; handlers are only installed from the main thread (Python allows no
  other) and the previous handlers come back on exit. `resend()` then delivers the signal again
  (under `jax.distributed` with the default action, since the notifier would swallow it), so the
  process ends the way a signal ends it (after the checkpoint is written).
  """

  def __init__(self):
    self.signum: int | None = None
    self._synced = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
    if jax.process_count() > 1 and not self._synced:
      raise RuntimeError('several processes need JAX\'s preemption service (the default '
                         'jax_enable_preemption_service=True) so that a SIGTERM stops all of them '
                         'at the same step')
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      signums = (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT)
      for signum in signums:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self._synced:
      signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier
    else:
      self.signum = signum

  def at(self, step: int) -> bool:
    """Whether training stops after `step`; every process calls it at every step."""
    if self._synced and multihost_utils.reached_preemption_sync_point(step):
      logging.warning('Preemption sync point reached at step %d on every process.', step)
      self.signum = signal.SIGTERM
    return self.signum is not None

  def __exit__(self, *exc_info: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def resend(self) -> None:
    if self.signum is not None:
      if self._synced:
        signal.signal(self.signum, signal.SIG_DFL)
      signal.raise_signal(self.signum)
