"""Tests of sweeps: sweeps and sweep.py (points, launchers, status, summary).

The local launcher runs end to end on the ListOps smoke config; the SLURM launcher runs against
submitit's own mocked sbatch, so no cluster is needed.
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from submitit.core.test_core import MockedSubprocess
from submitit.core.utils import DelayedSubmission, FailedJobError

import config_cli
import sweeps
from configs import image, listops, pathfinder, pathx, retrieval, text
from lra.data import listops_gen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULES = (listops, text, retrieval, image, pathfinder, pathx)
_SMOKE = 'configs/listops.py:topk,smoke'


def _sweep_py(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'sweep.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------- points


def test_sweep_point_names_are_unique():
  for module in _MODULES:
    points = module.get_sweep('topk')
    assert len({sweeps.point_name(p) for p in points}) == len(points)


def test_sweep_flags():
  points = config_cli.get_sweep(_SMOKE)
  assert points == listops.get_sweep('topk,smoke')
  assert sweeps.point_name(points[1]) == 'topk_k4_c16'
  overrides = sweeps.point_overrides([('data_dir', 'DATA')], points[1])
  assert sweeps.train_flags(_SMOKE, overrides, 'root/topk_k4_c16') == [
      f'--config={_SMOKE}', '--workdir=root/topk_k4_c16',
      '--config.data_dir=DATA', '--config.attention.kind=topk', '--config.attention.k=4',
      '--config.attention.query_chunk_size=16']


def test_shared_override_of_a_swept_field_pins_its_axis():
  points = sweeps.expand(_SMOKE, [('data_dir', 'D'), ('attention.k', '3')])
  assert points == [sweeps.Point('vanilla', {'attention.kind': 'vanilla'}),
                    sweeps.Point('topk_k3_c16', {'attention.kind': 'topk', 'attention.k': 3,
                                                 'attention.query_chunk_size': 16})]


def test_every_point_is_checked_before_anything_runs():
  with pytest.raises(config_cli.ConfigError, match=r'^sweep point vanilla: '
                     r'config\.batch_size=-1; expected an int >= 1\.$'):
    sweeps.expand(_SMOKE, [('batch_size', '-1')])


@pytest.mark.slow
def test_sweep_prints_commands_with_shared_overrides():
  result = _sweep_py('--config=configs/text.py:chunked,smoke', '--config.data_dir=DATA',
                     '--workdir_root=/tmp/root', '--config.num_train_steps', '3')
  assert result.returncode == 0, result.stderr[-2000:]
  shared = '--config.data_dir=DATA --config.num_train_steps=3'
  assert result.stdout.splitlines() == [
      'python train.py --config=configs/text.py:chunked,smoke --workdir=/tmp/root/vanilla '
      f'{shared} --config.attention.kind=vanilla',
      'python train.py --config=configs/text.py:chunked,smoke --workdir=/tmp/root/chunked_c16 '
      f'{shared} --config.attention.kind=chunked --config.attention.query_chunk_size=16']


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--config.dat_dir=DATA'], "sweep.py: --config.dat_dir: no such field; the fields of config "
                                f"are {sorted(text.get_config().keys())}."),
    (['--launcher=local', '--slurm_partition=gpu'],
     'sweep.py: --slurm_partition applies to --launcher=slurm only.'),
])
def test_sweep_py_reports_a_mistake_in_one_line(args, message, tmp_path):
  result = _sweep_py('--config=configs/text.py:chunked,smoke', f'--workdir_root={tmp_path}/r',
                     *args)
  assert result.returncode != 0
  assert result.stderr.strip() == message
  assert not os.path.exists(tmp_path / 'r')  # nothing ran


@pytest.mark.slow
def test_sweep_py_names_a_misspelt_launcher(tmp_path):
  result = _sweep_py(f'--config={_SMOKE}', '--launcher=slrum', f'--workdir_root={tmp_path}/r')
  assert result.returncode != 0
  assert result.stderr.startswith('FATAL Flags parsing error: flag --launcher=slrum: value should '
                                  'be one of <local|slurm>')
  assert not os.path.exists(tmp_path / 'r')


# ----------------------------------------------------------------------------- summary


def test_summary_lists_results_and_states_and_plots(tmp_path):
  root = str(tmp_path)
  points = [sweeps.Point(sweeps.point_name(p), p) for p in listops.get_sweep('topk,smoke')]
  fake = {'validation': {'accuracy': 0.375, 'loss': 1.5}, 'test': {'accuracy': 0.25, 'loss': 2.0}}
  for name, _ in points[:2]:
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, 'results.json'), 'w') as f:
      json.dump(fake, f)
  rows = sweeps.summarize(points, root)
  assert len(rows) == 3
  assert (rows[1]['name'], rows[1]['attention.k'], rows[1]['state'], rows[1]['test_accuracy']) == (
      'topk_k4_c16', 4, 'done', 0.25)
  assert (rows[2]['state'], rows[2]['validation_accuracy']) == ('pending', '')  # not run yet
  with open(os.path.join(root, 'summary.csv')) as f:
    table = list(csv.DictReader(f))
  assert table[0]['validation_accuracy'] == '0.375'
  assert table[0]['attention.kind'] == 'vanilla'
  with open(os.path.join(root, 'summary.md')) as f:
    lines = f.read().splitlines()
  assert len(lines) == 2 + len(points)
  assert '| topk_k4_c16 | topk | 4 | 16 | done | 0.3750 | 1.5000 | 0.2500 | 2.0000 |' in lines
  with open(os.path.join(root, 'accuracy_vs_k.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_point_state_reads_the_workdir(tmp_path):
  workdir = tmp_path / 'point'
  assert sweeps.point_state(str(workdir)) == sweeps.PointState('pending')
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text(
      '{"step": 7, "split": "train", "loss": 1.0}\n{"step": 8, "split": "validation"}\n{"ste')
  # A local job whose controller is gone without a result: the sweep running it was killed.
  (workdir / 'submitit').mkdir()
  (workdir / 'submitit' / '999999999_submitted.pkl').write_bytes(b'')
  (workdir / 'submitit' / '999999999_0_log.err').write_text('I1204 step 7/100\nboom\n\n')
  state = sweeps.point_state(str(workdir))
  assert state == sweeps.PointState('failed', 7, 'ended without a result; last log line: boom')
  assert str(state) == 'failed at step 7: ended without a result; last log line: boom'


# ----------------------------------------------------------------------------- local launcher

# Stands in for train.py: fails with a last error line that shows the GPUs it was given.
_FAKE_TRAIN_PY = """
import os, sys
print('some log line', file=sys.stderr)
print('ValueError: GPUs ' + repr(os.environ.get('CUDA_VISIBLE_DEVICES')), file=sys.stderr)
sys.exit(1)
"""


@pytest.mark.parametrize('gpus, expected', [(['0', '1'], ("'0'", "'1'")), ([], ('None', 'None'))])
def test_local_failures_are_reported_per_point_with_their_gpus(gpus, expected, tmp_path,
                                                              monkeypatch):
  monkeypatch.setattr(sweeps, 'visible_gpus', lambda: gpus)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', 'inherited')
  fake = tmp_path / 'train.py'
  fake.write_text(_FAKE_TRAIN_PY)
  root = str(tmp_path / 'root')
  points = [sweeps.Point(sweeps.point_name(p), p) for p in listops.get_sweep('topk,smoke')][:2]
  failed = sweeps.run_local(str(fake), _SMOKE, [], points, root, parallel=2, poll_s=0.1)
  assert failed == {name: f'train.py exited with status 1: ValueError: GPUs {gpu}'
                    for (name, _), gpu in zip(points, expected, strict=True)}
  rows = sweeps.summarize(points, root)  # all failed: the summary still says which and why
  assert [row['state'] for row in rows] == [f'failed: {failed[name]}' for name, _ in points]
  assert sweeps.read_status(root)[0][1] == sweeps.PointState('failed', None, failed['vanilla'])
  with pytest.raises(sweeps.SweepError, match=f'--workdir_root={root} holds a sweep of other '
                     r"settings \(--config=configs/listops.py:topk,smoke, overrides \[\]\)"):
    sweeps.run_local(str(fake), _SMOKE, [('seed', '1')], points, root)


# Stands in for train.py: ends with an error line when SIGTERM stops it; argv[1] marks it ready.
_STOPPABLE_TRAIN_PY = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit('stopped by SIGTERM'))
pathlib.Path(sys.argv[1]).touch()
time.sleep(60)
"""


def test_preempted_point_stops_train_py_with_sigterm_and_resubmits_itself(tmp_path):
  ready = tmp_path / 'ready'
  job = sweeps.TrainPoint([sys.executable, '-c', _STOPPABLE_TRAIN_PY, str(ready)], {'A': '1'})
  errors = []
  thread = threading.Thread(target=lambda: errors.append(pytest.raises(sweeps.PointFailed, job)))
  thread.start()
  deadline = time.monotonic() + 60
  while not ready.exists():
    assert time.monotonic() < deadline and thread.is_alive()
    time.sleep(0.05)
  os.kill(job._process.pid, signal.SIGUSR2)  # submitit's preemption notice is not for train.py
  time.sleep(0.2)
  assert job._process.poll() is None
  resubmission = job.checkpoint()  # what submitit calls on the notice
  thread.join(timeout=60)
  assert str(errors[0].value) == 'train.py exited with status 1: stopped by SIGTERM'
  assert isinstance(resubmission.function, sweeps.TrainPoint)
  assert (resubmission.function.command, resubmission.function.env) == (job.command, job.env)


def test_slot_gpus_round_robin(monkeypatch):
  assert sweeps.slot_gpus(['0', '1', '2', '3'], 1, 2) == ['2', '3']
  assert sweeps.slot_gpus(['0', '1'], 3, 1) == ['1']  # more slots than GPUs: they share
  assert sweeps.slot_gpus([], 1, 1) == []
  monkeypatch.setattr(sweeps, 'visible_gpus', lambda: ['0'])
  with pytest.raises(sweeps.SweepError, match=r'^--gpus_per_point=2; expected an int >= 1 and '
                     'at most the 1 visible GPUs'):
    sweeps.run_local('train.py', _SMOKE, [], [], 'unused', gpus_per_point=2)
  with pytest.raises(sweeps.SweepError, match=r'^--parallel=0; expected an int >= 1'):
    sweeps.run_local('train.py', _SMOKE, [], [], 'unused', parallel=0)


@pytest.fixture
def listops_data(tmp_path) -> str:
  root = str(tmp_path / 'data')
  listops_gen.write_splits(root, seed=0, num_train=64, num_valid=21, num_test=13, min_length=3,
                           max_length=40)
  return root


@pytest.mark.slow
def test_local_sweep_end_to_end_and_a_killed_point_resumes(listops_data, tmp_path):
  root = str(tmp_path / 'root')
  # Compiling dominates smoke runs: little optimization, and the rerun reuses the first's programs.
  env = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PLATFORMS': 'cpu',
         'JAX_DISABLE_MOST_OPTIMIZATIONS': 'true'}
  args = ['--config=configs/listops.py:chunked,smoke', f'--config.data_dir={listops_data}',
          '--launcher=local', '--parallel=2', f'--workdir_root={root}',
          '--config.num_train_steps=100', '--config.eval_frequency=50',
          '--config.checkpoint_every=50']
  sweep = subprocess.Popen([sys.executable, 'sweep.py', *args], cwd=REPO, text=True,
                           env={**os.environ, **env}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
  metrics = os.path.join(root, 'chunked_c16', 'metrics.jsonl')
  try:
    deadline = time.monotonic() + 200
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
      assert sweep.poll() is None, sweep.communicate()
      assert time.monotonic() < deadline, 'no training progress'
      time.sleep(0.05)
    status = _sweep_py('--status', f'--workdir_root={root}')
    assert re.search(r'chunked_c16 +running at step \d+', status.stdout), status.stdout
    with open(os.path.join(root, 'chunked_c16', 'lock')) as f:
      os.kill(json.load(f)['pid'], signal.SIGTERM)  # the point's train.py
    stdout, stderr = sweep.communicate(timeout=200)
  finally:
    if sweep.poll() is None:
      sweep.kill()
  # Both points started before either ended; the killed one failed, the other finished.
  lines = stdout.splitlines()
  assert [line.split(':')[1].split()[0] for line in lines[:2]] == ['started', 'started'], stdout
  assert sweep.returncode == 1
  assert stderr.strip().endswith('sweep.py: 1 of 2 points failed: chunked_c16 (see summary.md)')
  status = {point.name: state for point, state in sweeps.read_status(root)}
  assert status['vanilla'].state == 'done'
  killed_at = status['chunked_c16'].step
  assert status['chunked_c16'].state == 'failed' and 0 < killed_at < 100
  assert 'train.py was stopped by SIGTERM' in status['chunked_c16'].detail
  # A rerun skips the finished point and resumes the killed one from its checkpoint.
  rerun = _sweep_py(*args, env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'vanilla: done already, skipped' in rerun.stdout
  log = ''.join(open(os.path.join(root, 'chunked_c16', 'submitit', name)).read()
                for name in os.listdir(os.path.join(root, 'chunked_c16', 'submitit'))
                if name.endswith('.err'))
  assert f'Resuming from step {killed_at}' in log
  with open(os.path.join(root, 'summary.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [(row['name'], row['state']) for row in rows] == [('vanilla', 'done'),
                                                            ('chunked_c16', 'done')]
  assert all(0 <= float(row['test_accuracy']) <= 1 for row in rows)
  assert os.path.getsize(os.path.join(root, 'accuracy_vs_k.png')) > 0


# ----------------------------------------------------------------------------- SLURM launcher


def test_slurm_sbatch_script_asks_for_what_the_flags_say(tmp_path):
  root = str(tmp_path / 'root')
  points = sweeps.expand(_SMOKE, [('data_dir', 'D'), ('attention.k', '4')])
  options = sweeps.SlurmOptions('gpu', 90, 2, sweeps.parse_slurm_extra(
      ['account=proj', 'qos=high']))
  mock = MockedSubprocess(known_cmds=['srun', 'sbatch'])  # submitit's stand-in for SLURM
  with mock.context():
    jobs = sweeps.submit_slurm('/repo/train.py', _SMOKE, [('data_dir', 'D')], points, root,
                               options, gpus_per_point=4)
  assert jobs == {'vanilla': '12', 'topk_k4_c16': '13'}
  folder = os.path.join(root, 'topk_k4_c16', 'submitit')
  with open(os.path.join(folder, '13_submission.sh')) as f:
    script = f.read().splitlines()
  for line in ('#SBATCH --partition=gpu', '#SBATCH --time=90', '#SBATCH --nodes=2',
               '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=4',
               '#SBATCH --account=proj', '#SBATCH --qos=high', '#SBATCH --job-name=topk_k4_c16',
               f'export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}'):
    assert line in script
  assert any(line.startswith('#SBATCH --signal=USR2@') for line in script)  # preemption notice
  job = DelayedSubmission.load(os.path.join(folder, '13_submitted.pkl')).function
  assert isinstance(job, sweeps.TrainPoint)
  assert job.command[1:] == ['/repo/train.py', f'--config={_SMOKE}',
                             f'--workdir={root}/topk_k4_c16', '--config.data_dir=D',
                             '--config.attention.kind=topk', '--config.attention.k=4',
                             '--config.attention.query_chunk_size=16', '--multiprocess']
  assert sweeps.read_status(root)[1][1] == sweeps.PointState('pending')  # submitted, not started


class _RefusingSbatch(MockedSubprocess):
  def sbatch(self, args):
    raise FailedJobError('sbatch: error: invalid partition specified: gpu')


def test_sbatch_refusal_names_the_point(tmp_path):
  points = [sweeps.Point('vanilla', {'attention.kind': 'vanilla'})]
  with _RefusingSbatch(known_cmds=['srun', 'sbatch']).context():
    with pytest.raises(sweeps.SweepError, match='^sbatch refused point vanilla: sbatch: error: '
                       'invalid partition specified: gpu$'):
      sweeps.submit_slurm('train.py', _SMOKE, [], points, str(tmp_path),
                          sweeps.SlurmOptions('gpu', 60, 1, {}))


def test_slurm_without_sbatch_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))
  with pytest.raises(sweeps.SweepError, match=r'^--launcher=slurm: `sbatch` is not on PATH'):
    sweeps.submit_slurm('train.py', _SMOKE, [], [], str(tmp_path / 'root'),
                        sweeps.SlurmOptions(None, 60, 1, {}))
  assert not os.path.exists(tmp_path / 'root')


@pytest.mark.parametrize('item, message', [
    ('account', r"--slurm_extra='account': expected key=value"),
    ('partition=gpu', r"--slurm_extra='partition=gpu': use --slurm_partition instead"),
    ('signal=USR1@60', 'submitit sets this sbatch option itself'),
])
def test_bad_slurm_extra_names_the_item(item, message):
  with pytest.raises(sweeps.SweepError, match=message):
    sweeps.parse_slurm_extra([item])
