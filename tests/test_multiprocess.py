"""Tests of training with several JAX processes (`train.py --multiprocess`) on one machine.

JAX's multi-process runtime runs on CPU: each process owns one CPU device, the processes meet at a
coordinator on localhost and all-reduce through gloo. That is the protocol of several hosts (the
coordination service, its preemption sync and heartbeats, gloo over TCP) with the network left
out. A baseline of one process with two devices runs the same global batches, so its metrics,
results and checkpoints are what two processes must reproduce (within a tolerance: gloo and XLA
sum the two devices' gradients in different orders).

Every process runs train.py under `_TRAIN_PY`, which decodes synchronously (no read-ahead, so a
process decodes exactly the records its steps consume) and appends the record indices of every
batch it decodes to a file, one JSON line per batch.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import read_json, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 6
BATCH_SIZE = 8  # the smoke configs' batch_size and eval_batch_size
pytestmark = pytest.mark.slow  # every test runs train.py in subprocesses

_TRAIN_PY = """
import dataclasses, json, os, runpy, sys, time
import grain
from lra.data import pipeline

pipeline._READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
log = open(os.environ['DECODED_LOG'], 'a', buffering=1)
train_delay = float(os.environ.get('TRAIN_DECODE_DELAY_S', '0'))
batch = []


class Records:
  def __init__(self, split, records):
    self.split, self.records = split, records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    if self.split == 'train':
      time.sleep(train_delay)
    batch.append((self.split, index))
    return self.records[index]


init, stack = pipeline.Task.__init__, pipeline.Task._stack


def recording_init(self, info, splits, **kwargs):
  splits = {name: dataclasses.replace(split, records=Records(name, split.records))
            for name, split in splits.items()}
  init(self, info, splits, **kwargs)


def recording_stack(self, examples):
  splits = {split for split, _ in batch}
  log.write(json.dumps({'split': splits.pop() if len(splits) == 1 else sorted(splits),
                        'records': [index for _, index in batch]}) + '\\n')
  batch.clear()
  return stack(self, examples)


pipeline.Task.__init__, pipeline.Task._stack = recording_init, recording_stack
sys.argv = ['train.py', *sys.argv[1:]]
runpy.run_path('train.py', run_name='__main__')
"""


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory) -> dict[str, str]:
  """Environment variables that share compiled programs between this module's processes."""
  return {'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


class _Run:
  """The processes of one training run in `workdir` (one process, or one per `--process_id`);
  their output and decoded batches go to the folder `logs`."""

  def __init__(self, workdir: str, logs: str, data_dir: str, cache: dict[str, str],
               num_processes: int, *flags: str, env: dict[str, str] | None = None):
    self.workdir, self._logs = workdir, logs
    os.makedirs(logs)
    common = [sys.executable, '-c', _TRAIN_PY, '--config=configs/listops.py:smoke',
              f'--config.data_dir={data_dir}', f'--workdir={workdir}',
              '--config.num_eval_steps=-1', f'--config.num_train_steps={NUM_STEPS}',
              '--jax_disable_most_optimizations', *flags]
    base_env = {**os.environ, **cache, **(env or {}), 'JAX_PLATFORMS': 'cpu'}
    if num_processes == 1:
      base_env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
      commands = [common]
    else:
      with socket.socket() as free:
        free.bind(('127.0.0.1', 0))
        base_env['JAX_COORDINATOR_ADDRESS'] = f'127.0.0.1:{free.getsockname()[1]}'
      commands = [[*common, '--multiprocess', f'--num_processes={num_processes}',
                   f'--process_id={i}', '--jax_cpu_collectives_implementation=gloo']
                  for i in range(num_processes)]
    self.processes = []
    for i, command in enumerate(commands):
      with open(self._output_path(i), 'w') as log:
        self.processes.append(subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**base_env, 'DECODED_LOG': self.decoded_log(i)}))

  def _output_path(self, process: int) -> str:
    return os.path.join(self._logs, f'process_{process}.log')

  def decoded_log(self, process: int) -> str:
    return os.path.join(self._logs, f'decoded_{process}.jsonl')

  def output(self, process: int) -> str:
    with open(self._output_path(process)) as f:
      return f.read()

  def wait(self, timeout: float) -> list[int]:
    """Return codes of all processes; kills them all and fails if any runs past `timeout`."""
    deadline = time.monotonic() + timeout
    try:
      for process in self.processes:
        process.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'still running after {timeout} s:\n' + self.output(0)[-3000:])
    return [process.returncode for process in self.processes]

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()

  def _train_records(self) -> int:
    path = os.path.join(self.workdir, 'metrics.jsonl')
    if not os.path.exists(path):
      return 0
    with open(path) as f:  # a line still being written has no newline yet
      return sum(json.loads(line)['split'] == 'train' for line in f if line.endswith('\n'))

  def wait_for_train_records(self, count: int, timeout: float = 240) -> None:
    """Waits until process 0 has written `count` train records to metrics.jsonl."""
    deadline = time.monotonic() + timeout
    while self._train_records() < count:
      ended = [i for i, process in enumerate(self.processes) if process.poll() is not None]
      assert not ended, f'process {ended[0]} ended early:\n' + self.output(ended[0])[-3000:]
      assert time.monotonic() < deadline, 'no training progress:\n' + self.output(0)[-3000:]
      time.sleep(0.2)


def _read_decoded(path: str) -> dict[str, list[list[int]]]:
  """The record indices of each decoded batch, by split, in decode order."""
  batches = {}
  with open(path) as f:
    for line in f:
      batch = json.loads(line)
      assert isinstance(batch['split'], str), batch  # one split per batch
      batches.setdefault(batch['split'], []).append(batch['records'])
  return batches


def _params(workdir: str, step: int) -> dict:
  """The params of the periodic checkpoint of `step`, as numpy arrays."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return checkpointer.restore(path, restore_args=restore_args)['params']


@pytest.fixture(scope='module')
def one_process_run(listops_data, compilation_cache, tmp_path_factory) -> _Run:
  """One process with two devices, uninterrupted, checkpointing every step."""
  root = tmp_path_factory.mktemp('one_process')
  run = _Run(str(root / 'run'), str(root / 'logs'), listops_data, compilation_cache, 1,
             '--config.checkpoint_every=1')
  assert run.wait(timeout=300) == [0], run.output(0)[-3000:]
  return run


@pytest.fixture(scope='module')
def two_process_run(listops_data, compilation_cache, tmp_path_factory) -> dict:
  """Two processes, SIGTERM to process 1 after step 1, then both rerun to the end.

  The first part decodes train records slowly (so that the preemption sync point falls before the
  last step) and saves no periodic checkpoint: the only one is the stop's. The rerun has the
  baseline's settings. Returns the run of each part and, of the first part: the return codes,
  the sync steps each process logged, the checkpoints, the train stream positions in the latest
  one, the last train step in metrics.jsonl and whether results.json was written.
  """
  root = tmp_path_factory.mktemp('two_processes')
  workdir = str(root / 'run')
  first = _Run(workdir, str(root / 'first_logs'), listops_data, compilation_cache, 2,
               '--config.checkpoint_every=100', env={'TRAIN_DECODE_DELAY_S': '0.25'})
  try:
    first.wait_for_train_records(1)
    first.processes[1].send_signal(signal.SIGTERM)
    returncodes = first.wait(timeout=120)
  finally:
    first.kill()
  synced = [re.findall(r'Preemption sync point reached at step (\d+)', first.output(i))
            for i in range(2)]
  checkpoints = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  data = os.path.join(workdir, 'checkpoints', checkpoints[-1], 'data')
  positions = {name: read_json(os.path.join(data, name))
               for name in os.listdir(data) if name.endswith('.json')}
  last_logged = max(step for step, split in read_metrics(workdir) if split == 'train')
  first_results = os.path.exists(os.path.join(workdir, 'results.json'))
  rerun = _Run(workdir, str(root / 'rerun_logs'), listops_data, compilation_cache, 2,
               '--config.checkpoint_every=1')
  assert rerun.wait(timeout=300) == [0, 0], rerun.output(0)[-3000:] + rerun.output(1)[-3000:]
  return {'first': first, 'returncodes': returncodes, 'synced': synced,
          'checkpoints': checkpoints, 'positions': positions, 'last_logged': last_logged,
          'first_results': first_results, 'rerun': rerun}


def test_sigterm_to_one_process_stops_both_at_one_step_and_saves_it(two_process_run):
  first = two_process_run['first']
  logs = first.output(0)[-3000:] + first.output(1)[-3000:]
  assert two_process_run['returncodes'] == [-signal.SIGTERM] * 2, logs
  # Only process 1 got the signal; JAX's coordination service told process 0.
  assert 'SIGTERM caught' in first.output(1) and 'SIGTERM caught' not in first.output(0), logs
  synced = two_process_run['synced']
  assert len(synced[0]) == 1 and synced[0] == synced[1], logs
  step = int(synced[0][0])
  assert 1 <= step < NUM_STEPS
  # log_every=1 in smoke configs: the last train record is of the step both stopped at.
  assert two_process_run['last_logged'] == step
  assert two_process_run['checkpoints'] == [str(step)]
  assert two_process_run['positions'] == {f'process_{i}-of-2.json': {'next_index': step}
                                          for i in range(2)}
  assert not two_process_run['first_results']
  # The resumed run continued both processes' train streams from that step.
  rerun = two_process_run['rerun']
  for i in range(2):
    assert f'Resuming from step {step} ' in rerun.output(i)
    assert len(_read_decoded(rerun.decoded_log(i))['train']) == NUM_STEPS - step


def test_two_processes_equal_one_process_with_two_devices(one_process_run, two_process_run):
  # The two-process run was interrupted and resumed, and still reproduces the uninterrupted one.
  expected_dir, actual_dir = one_process_run.workdir, two_process_run['rerun'].workdir
  expected, actual = read_metrics(expected_dir), read_metrics(actual_dir)
  assert sorted(actual) == sorted(expected)
  for key, values in expected.items():
    values.pop('steps_per_second', None)
    actual[key].pop('steps_per_second', None)
    assert actual[key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
  expected = read_json(os.path.join(expected_dir, 'results.json'))
  actual = read_json(os.path.join(actual_dir, 'results.json'))
  assert (actual['step'], actual['best_step']) == (expected['step'], expected['best_step'])
  for split in ('validation', 'test'):
    for of in (expected, actual):
      of[f'best_{split}'] = of['best'][split]
    for name in (split, f'best_{split}'):
      assert actual[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
  for directory in ('checkpoints', 'best_checkpoint'):
    steps = sorted(os.listdir(os.path.join(expected_dir, directory)))
    assert sorted(os.listdir(os.path.join(actual_dir, directory))) == steps, directory
  steps = sorted(int(step) for step in os.listdir(os.path.join(expected_dir, 'checkpoints')))
  assert steps == [NUM_STEPS - 1, NUM_STEPS]
  for step in steps:
    # Each process's train stream position is saved: `step` batches read.
    for i in range(2):
      data = os.path.join(actual_dir, 'checkpoints', str(step), 'data', f'process_{i}-of-2.json')
      assert read_json(data) == {'next_index': step}
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
                 _params(actual_dir, step), _params(expected_dir, step))


def test_each_process_decodes_only_its_share(one_process_run, two_process_run):
  # Process i decodes rows [4i, 4i + 4) of every global batch of 8, train and evaluation alike,
  # and nothing else; the interrupted part and the rerun together decode every step once.
  whole = _read_decoded(one_process_run.decoded_log(0))
  assert len(whole['train']) == NUM_STEPS
  assert [len(b) for b in whole['validation'][:3]] == [8, 8, 5]  # a partial last batch
  share = BATCH_SIZE // 2
  for i in range(2):
    decoded = _read_decoded(two_process_run['first'].decoded_log(i))
    for split, batches in _read_decoded(two_process_run['rerun'].decoded_log(i)).items():
      decoded.setdefault(split, []).extend(batches)
    assert sorted(decoded) == sorted(whole)
    for split, batches in whole.items():
      assert decoded[split] == [b[i * share:(i + 1) * share] for b in batches], (i, split)


def test_killed_process_ends_the_other_with_an_error_within_the_heartbeat_timeout(
    listops_data, compilation_cache, tmp_path):
  # Process 1 dies without a word (SIGKILL). Process 0 hosts the coordination service: a
  # collective with the dead process fails at once, and whatever it waits on afterwards (here
  # the shutdown barrier) fails once the dead process has missed heartbeats for the timeout.
  # JAX's default timeout is 100 s; the flag's 5 s must bound the wait.
  run = _Run(str(tmp_path / 'run'), str(tmp_path / 'logs'), listops_data, compilation_cache, 2,
             '--config.num_train_steps=100000', '--heartbeat_timeout_seconds=5',
             env={'TRAIN_DECODE_DELAY_S': '0.05'})
  try:
    run.wait_for_train_records(2)
    run.processes[1].kill()
    returncode = run.wait(timeout=50)[0]
  finally:
    run.kill()
  output = run.output(0)
  assert returncode != 0, output[-3000:]
  assert 'Task 1 heartbeat timeout' in output, output[-3000:]
  assert 'another task died' in output, output[-3000:]
