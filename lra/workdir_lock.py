"""An exclusive lock on a workdir, so that two training processes never write into one.

The lock is `fcntl.flock` on `<workdir>/lock`, which also holds the owner's pid and host for the
error message. The kernel (or the NFS server) drops a flock when its process dies, so a lock left
behind by a killed run never blocks the next one: it finds the dead owner's pid in the file and
logs that it takes over.
"""

import fcntl
import json
import os
import socket
from typing import Any

from absl import logging

LOCK_NAME = 'lock'


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """Holds `<workdir>/lock` from `acquire()` (or `with`) to `release()`.

  The file stays in place (removing it would let a process that opened it before the removal lock
  an orphaned inode); a cleanly released lock is empty, one left by a dead owner still names it.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock.

    Raises:
      WorkdirLockedError: another process holds it (the message names its pid and host).
    """
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read_owner(fd)
      os.close(fd)
      raise WorkdirLockedError(
          f'{self.path} is held by pid {owner.get("pid")} on host {owner.get("host")}: another '
          'process is using this workdir. Wait for it to finish or stop it, or choose another '
          '--workdir.') from None
    previous = _read_owner(fd)
    if previous:
      logging.warning('Taking over %s from pid %s on host %s, which exited without releasing it.',
                      self.path, previous.get('pid'), previous.get('host'))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing drops the flock
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.release()


def _read_owner(fd: int) -> dict[str, Any]:
  text = os.pread(fd, 4096, 0).decode(errors='replace')
  try:
    return json.loads(text) if text else {}
  except json.JSONDecodeError:
    return {'pid': '?', 'host': f'? (unreadable lock file: {text[:80]!r})'}
