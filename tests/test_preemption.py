"""Tests of the stop on SIGTERM (lra.preemption), through train.py."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_metrics


def _sigterm_a_long_run(workdir: str, data_dir: str, env: dict[str, str], *flags: str
                       ) -> tuple[subprocess.Popen, str]:
  """Starts train.py on a run of 100000 steps, sends SIGTERM once 3 steps are logged; returns
  the ended process and its stderr."""
  command = [sys.executable, 'train.py', '--config=configs/listops.py:smoke',
             f'--config.data_dir={data_dir}', f'--workdir={workdir}',
             '--config.num_train_steps=100000', '--config.eval_frequency=100000',
             '--config.checkpoint_every=100000', *flags]
  process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env},
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  try:
    deadline = time.monotonic() + 240
    while not (os.path.exists(metrics_path) and len(open(metrics_path).readlines()) >= 3):
      assert process.poll() is None, process.stderr.read()[-3000:]
      assert time.monotonic() < deadline, 'no training progress'
      time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  return process, stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step(listops_data, tmp_path,
                                                        compilation_cache):
  workdir = str(tmp_path / 'run')
  process, stderr = _sigterm_a_long_run(workdir, listops_data, compilation_cache)
  assert process.returncode == -signal.SIGTERM, stderr[-3000:]
  last_logged = max(step for step, split in read_metrics(workdir) if split == 'train')
  # log_every=1 in smoke configs: the step the signal stopped at is the last one logged.
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(last_logged)], stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


@pytest.mark.slow
def test_sigterm_under_jax_distributed_stops_at_the_preemption_sync_point(
    listops_data, tmp_path, compilation_cache):
  # One process with --multiprocess takes the multi-host path: JAX's preemption notifier gets
  # the SIGTERM and every process (here one) stops at the step reached_preemption_sync_point
  # names, later than the step the signal arrived at.
  workdir = str(tmp_path / 'run')
  with socket.socket() as free:
    free.bind(('localhost', 0))
    port = free.getsockname()[1]
  env = {**compilation_cache, 'JAX_COORDINATOR_ADDRESS': f'localhost:{port}'}
  process, stderr = _sigterm_a_long_run(workdir, listops_data, env, '--multiprocess',
                                        '--num_processes=1', '--process_id=0')
  assert process.returncode == -signal.SIGTERM, stderr[-3000:]
  assert 'preemption_notifier' in stderr and 'SIGTERM caught' in stderr, stderr[-3000:]
  synced = [int(step) for step in re.findall(r'Preemption sync point reached at step (\d+)',
                                             stderr)]
  assert len(synced) == 1, stderr[-3000:]
  last_logged = max(step for step, split in read_metrics(workdir) if split == 'train')
  assert last_logged == synced[0]
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(synced[0])]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
