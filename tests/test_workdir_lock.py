"""Tests of the one-run-per-workdir lock (lra.workdir_lock)."""
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, smoke_config

from lra import train
from lra.workdir_lock import WorkdirLock, WorkdirLockedError

_LOCK_HOLDER = """
import sys, time
from lra.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print('LOCKED', flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_second_process_on_a_workdir_is_refused(listops_data, tmp_path, caplog):
  workdir = str(tmp_path)
  holder = subprocess.Popen([sys.executable, '-c', _LOCK_HOLDER, workdir], cwd=REPO,
                            env={**os.environ, 'PYTHONPATH': REPO}, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline() == 'LOCKED\n'
    with pytest.raises(WorkdirLockedError,
                       match=f'held by pid {holder.pid} on host {socket.gethostname()}'):
      train.train_and_evaluate(smoke_config('listops', listops_data), workdir)
    assert sorted(os.listdir(workdir)) == ['lock']  # nothing else written
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: the lock is taken over, and that is logged.
  with WorkdirLock(workdir):
    assert f'from pid {holder.pid} on host {socket.gethostname()}, which exited' in caplog.text
  assert os.path.getsize(os.path.join(workdir, 'lock')) == 0
