"""Tests of the training loop (lra.train), its optimizer (lra.optim) and train.py.

End-to-end runs use the real smoke configs on fixture data in the release formats (ListOps from
the generator, retrieval TSVs, Pathfinder PNGs) or TFDS mock data. One 4-step ListOps run is shared
by the resume, sharding and evaluation tests.
"""
import asyncio
import gc
import glob
import importlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from conftest import read_json, read_metrics
from PIL import Image
from tensorboardX.proto import event_pb2

from lra import train
from lra.checkpointing import CheckpointError, RunCheckpoints
from lra.metric_writer import MetricWriter
from lra.optim import make_optimizer, make_schedule
from lra.workdir_lock import WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory) -> dict[str, str]:
  """Shares compiled steps between the runs of this module and its subprocesses (returns their
  environment variables): most runs compile the same smoke model, and compiling dominates."""
  options = {'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('jax_cache')),
             'jax_persistent_cache_min_compile_time_secs': 0.0}
  previous = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  yield {name.upper(): str(value) for name, value in options.items()}
  for name, value in previous.items():
    jax.config.update(name, value)


def smoke_config(module: str, data_dir: str, arg: str = 'smoke', **overrides
                 ) -> ml_collections.ConfigDict:
  config = importlib.import_module(f'configs.{module}').get_config(arg)
  config.data_dir = data_dir
  for name, value in overrides.items():
    parent = config
    *path, leaf = name.split('.')
    for part in path:
      parent = parent[part]
    parent[leaf] = value
  return config


@pytest.fixture(scope='module')
def listops_run(listops_data, tmp_path_factory):
  """4 uninterrupted steps; validation after steps 2 and 4 on the whole split."""
  config = smoke_config('listops', listops_data, num_eval_steps=-1)
  workdir = str(tmp_path_factory.mktemp('listops_run'))
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope='module')
def profiled_run(listops_data, tmp_path_factory):
  """The listops_run config checkpointed every step (checkpoints 3 and 4 kept), steps 2-3
  profiled."""
  config = smoke_config('listops', listops_data, num_eval_steps=-1, checkpoint_every=1,
                        profile_steps=2)
  workdir = str(tmp_path_factory.mktemp('profiled_run'))
  return config, workdir, train.train_and_evaluate(config, workdir)


# ----------------------------------------------------------------------------- optimizer


def test_schedules():
  rsqrt = make_schedule('rsqrt', 0.05, 100, 1000)
  assert float(rsqrt(0)) == 0.0
  np.testing.assert_allclose(rsqrt(50), 0.05 * 0.5 / 10, rtol=1e-6)
  np.testing.assert_allclose(rsqrt(100), 0.05 / 10, rtol=1e-6)  # LRA's peak: base/sqrt(warmup)
  np.testing.assert_allclose(rsqrt(400), 0.05 / 20, rtol=1e-6)
  cosine = make_schedule('cosine', 1e-3, 10, 110)
  np.testing.assert_allclose([cosine(5), cosine(10), cosine(65)], [5e-4, 1e-3, 5e-4], rtol=1e-5)
  constant = make_schedule('constant', 0.1, 0, 10)
  np.testing.assert_allclose([constant(0), constant(9)], [0.1, 0.1])
  with pytest.raises(ValueError, match="schedule must be one of.*'linear'"):
    make_schedule('linear', 0.1, 0, 10)


def test_adam_and_decoupled_weight_decay():
  params = {'w': jnp.array([2.0, -4.0])}
  tx = make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, grad_clip_norm=0.0)
  # A zero gradient leaves only the decay: p - lr * wd * p.
  updates, _ = tx.update({'w': jnp.zeros(2)}, tx.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, updates)['w'], [1.9, -3.8], rtol=1e-6)
  # First Adam step moves every parameter by lr against the gradient's sign.
  tx = make_optimizer(optax.constant_schedule(0.1), weight_decay=0.0, grad_clip_norm=1.0)
  updates, _ = tx.update({'w': jnp.array([30.0, -0.1])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.1, 0.1], rtol=1e-5)
  with pytest.raises(ValueError, match='grad_clip_norm'):
    make_optimizer(optax.constant_schedule(0.1), weight_decay=0.0, grad_clip_norm=-1.0)


def test_pad_batch():
  batch = {'inputs': np.ones((3, 4), np.int32), 'targets': np.array([1, 2, 3], np.int32)}
  padded = train.pad_batch(batch, 8)
  assert padded['inputs'].shape == (8, 4) and padded['inputs'][3:].sum() == 0
  np.testing.assert_array_equal(padded['weights'], [1, 1, 1, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match='more than the padded size 2'):
    train.pad_batch(batch, 2)


# ----------------------------------------------------------------------------- every task


def test_listops_run_writes_workdir(listops_run):
  config, workdir, results = listops_run
  assert sorted(os.listdir(workdir)) == ['best_checkpoint', 'checkpoints', 'config.json',
                                         'configs', 'lock', 'metrics.jsonl', 'results.json',
                                         'tensorboard']
  assert os.listdir(os.path.join(workdir, 'configs')) == ['0.json']
  assert os.path.getsize(os.path.join(workdir, 'lock')) == 0  # released
  assert read_json(os.path.join(workdir, 'results.json')) == json.loads(json.dumps(results))
  assert read_json(os.path.join(workdir, 'config.json'))['task'] == 'listops'
  assert results['step'] == 4 and results['num_params'] > 0
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert os.listdir(os.path.join(workdir, 'best_checkpoint')) == [str(results['best_step'])]
  metrics = read_metrics(workdir)
  assert {(step, 'train') for step in range(1, 5)} <= set(metrics)
  assert metrics[(1, 'train')]['learning_rate'] == 0.0  # warmup starts at 0, as LRA
  # Whole-split validation at the last step is what results.json reports for the final state.
  assert metrics[(4, 'validation')] == pytest.approx(results['validation'], rel=1e-6)
  best_val = metrics[(results['best_step'], 'validation')]['accuracy']
  assert best_val == max(metrics[(s, 'validation')]['accuracy'] for s in (2, 4))
  assert results['best']['validation'] == pytest.approx(metrics[(results['best_step'],
                                                                 'validation')], rel=1e-6)
  for split in ('validation', 'test'):
    assert 0.0 <= results[split]['accuracy'] <= 1.0 and np.isfinite(results[split]['loss'])
  scalars = read_scalars(os.path.join(workdir, 'tensorboard'))
  assert scalars[(4, 'validation/accuracy')] == pytest.approx(results['validation']['accuracy'])
  assert scalars[(1, 'train/learning_rate')] == 0.0


def retrieval_data(root: str) -> str:
  rows = [f'{i % 2}\ta{i}\tb{i}\t{"xy" * i}\t{"yz" * (i + 1)}' for i in range(12)]
  for split, n in (('train', 12), ('eval', 5), ('test', 3)):
    path = os.path.join(root, 'tsv_data', f'new_aan_pairs.{split}.tsv')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write('\n'.join(rows[:n]) + '\n')
  return root


def pathfinder_data(root: str) -> str:
  base = os.path.join(root, 'pathfinder32', 'curv_contour_length_14')
  os.makedirs(os.path.join(base, 'imgs', '0'))
  os.makedirs(os.path.join(base, 'metadata'))
  lines = []
  for i in range(20):
    Image.fromarray(np.full((32, 32), 10 * i, np.uint8)).save(
        os.path.join(base, 'imgs', '0', f'sample_{i}.png'))
    lines.append(f'imgs/0 sample_{i}.png {i} {i % 2} 1 14\n')
  with open(os.path.join(base, 'metadata', '0.npy'), 'w') as f:
    f.writelines(lines)
  return root


@pytest.mark.parametrize('module, arg, make_data', [
    ('retrieval', 'topk,smoke', retrieval_data),
    ('pathfinder', 'size=32,smoke', pathfinder_data),
    ('text', 'chunked,smoke', None),
])
def test_every_task_trains(module, arg, make_data, tmp_path):
  data_dir = make_data(str(tmp_path / 'data')) if make_data else str(tmp_path / 'data')
  config = smoke_config(module, data_dir, arg, num_train_steps=2)
  with tfds.testing.mock_data(num_examples=10):
    results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['step'] == 2 and results['best_step'] == 2
  assert 0.0 <= results['test']['accuracy'] <= 1.0 and np.isfinite(results['test']['loss'])


# ----------------------------------------------------------------------------- resume


def test_resume_reproduces_uninterrupted_run(listops_run, listops_data, tmp_path, caplog):
  _, full_workdir, full = listops_run
  workdir = str(tmp_path)
  config = smoke_config('listops', listops_data, num_eval_steps=-1, num_train_steps=2)
  first = train.train_and_evaluate(config, workdir)
  assert first['step'] == 2
  # The elapsed time at the checkpoint is carried into the resumed run's wall_time_s.
  metadata_path = os.path.join(workdir, 'checkpoints', '2', '_CHECKPOINT_METADATA')
  metadata = read_json(metadata_path)
  assert 0 < metadata['custom_metadata']['wall_time_s'] < first['wall_time_s']
  metadata['custom_metadata']['wall_time_s'] = 1e6
  with open(metadata_path, 'w') as f:
    json.dump(metadata, f)
  # The train stream's position is saved with the model: 2 batches read.
  data_state = os.path.join(workdir, 'checkpoints', '2', 'data', 'process_0-of-1.json')
  assert read_json(data_state) == {'next_index': 2}
  config.num_train_steps = 4
  resumed = train.train_and_evaluate(config, workdir)
  assert resumed['wall_time_s'] > 1e6
  # Each start's config is kept, and what changed is logged.
  assert [(start['step'], start['config']['num_train_steps'])
          for start in resumed['config_history']] == [(0, 2), (2, 4)]
  assert read_json(os.path.join(workdir, 'configs', '0.json'))['num_train_steps'] == 2
  assert ('Starting at step 2 with a config that differs from the start at step 0 '
          '(configs/0.json) in: num_train_steps: 2 -> 4\n') in caplog.text
  expected, actual = read_metrics(full_workdir), read_metrics(workdir)
  for key in [(s, 'train') for s in range(1, 5)] + [(2, 'validation'), (4, 'validation')]:
    expected[key].pop('steps_per_second', None)
    actual[key].pop('steps_per_second', None)
    assert actual[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
  for split in ('validation', 'test'):
    assert resumed[split] == pytest.approx(full[split], rel=1e-6), split
    assert resumed['best'][split] == pytest.approx(full['best'][split], rel=1e-6), split
  assert resumed['best_step'] == full['best_step']


def test_resume_between_train_records_logs_the_uninterrupted_means(listops_run, listops_data,
                                                                     tmp_path, monkeypatch):
  # log_every=2 and a SIGTERM during step 3: the checkpoint of step 3 is saved between two train
  # records, and the resumed run's record of step 4 still averages steps 3 and 4.
  _, full_workdir, _ = listops_run
  workdir = str(tmp_path)
  config = smoke_config('listops', listops_data, num_eval_steps=-1, log_every=2)
  step = train.Trainer.step

  def step_and_signal(self, state, batch):
    if int(state.step) == 2:
      signal.raise_signal(signal.SIGTERM)
    return step(self, state, batch)

  monkeypatch.setattr(train.Trainer, 'step', step_and_signal)
  previous = signal.signal(signal.SIGTERM, lambda *_: None)  # receives the re-delivered signal
  try:
    assert train.train_and_evaluate(config, workdir) == {'step': 3,
                                                         'stopped_by_signal': signal.SIGTERM}
  finally:
    signal.signal(signal.SIGTERM, previous)
  monkeypatch.undo()
  assert train.train_and_evaluate(config, workdir)['step'] == 4
  # Every ListOps batch scores its 8 examples, so a record's means are means over its steps.
  full, resumed = read_metrics(full_workdir), read_metrics(workdir)
  assert {s for s, split in resumed if split == 'train'} == {2, 4}
  for name in ('loss', 'accuracy', 'learning_rate'):
    for record, steps in ((2, (1, 2)), (4, (3, 4))):
      expected = np.mean([full[(s, 'train')][name] for s in steps])
      assert resumed[(record, 'train')][name] == pytest.approx(expected, rel=1e-6), (record, name)


_TRAIN_PY = """
import runpy, sys
sys.argv = ['train.py', *sys.argv[1:]]
try:
  runpy.run_path('train.py', run_name='__main__')
except SystemExit as exit:
  assert not exit.code, exit.code
print('TENSORFLOW', 'tensorflow' in sys.modules)
"""


def test_train_py_runs_without_tensorflow(listops_data, tmp_path, compilation_cache):
  command = [sys.executable, '-c', _TRAIN_PY, '--config=configs/listops.py:smoke',
             f'--config.data_dir={listops_data}', f'--workdir={tmp_path}',
             '--config.num_train_steps=2']
  process = subprocess.run(command, cwd=REPO, env={**os.environ, **compilation_cache},
                           capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  assert process.stdout.split()[-2:] == ['TENSORFLOW', 'False']
  assert read_json(os.path.join(tmp_path, 'results.json'))['step'] == 2


# ----------------------------------------------------------------------------- sharding

_SHARDED_SCRIPT = """
import json, sys
import jax
from configs import listops
from lra import train
assert jax.device_count() == 8, jax.devices()
config = listops.get_config('smoke')
config.data_dir, config.num_eval_steps = sys.argv[1], -1
config.batch_size = 12
try:
  train.train_and_evaluate(config, sys.argv[2] + '_bad')
except ValueError as error:
  print('VALUE_ERROR', error)
config.batch_size = 8
results = train.train_and_evaluate(config, sys.argv[2])
print('RESULTS', json.dumps({k: results[k] for k in ('validation', 'test', 'best')}))
"""


def test_eight_device_run_equals_one_device_run(listops_run, listops_data, tmp_path,
                                                compilation_cache):
  _, one_device_workdir, one_device = listops_run
  workdir = str(tmp_path / 'run')
  env = {**os.environ, **compilation_cache, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  process = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT, listops_data, workdir],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  assert 'VALUE_ERROR config.batch_size=12 does not divide among 8 devices' in process.stdout
  line = next(line for line in process.stdout.splitlines() if line.startswith('RESULTS '))
  eight_device = json.loads(line[len('RESULTS '):])
  for split in ('validation', 'test'):
    for results in ('final', 'best'):
      expected = one_device if results == 'final' else one_device['best']
      actual = eight_device if results == 'final' else eight_device['best']
      assert actual[split] == pytest.approx(expected[split], rel=1e-5, abs=1e-6), (results, split)
  expected, actual = read_metrics(one_device_workdir), read_metrics(workdir)
  for step in range(1, 5):
    for name in ('loss', 'accuracy'):
      assert actual[(step, 'train')][name] == pytest.approx(expected[(step, 'train')][name],
                                                            rel=1e-5, abs=1e-6), (step, name)


# ----------------------------------------------------------------------------- evaluation mode


def test_eval_tags_differ_where_results_differ():
  # Each evaluation writes eval_results_<tag>.json: a shared tag would overwrite another's results.
  configs = {
      'topk_k32': {'attention.kind': 'topk', 'attention.k': 32},
      'topk_k32_approx0.9': {'attention.kind': 'topk', 'attention.k': 32,
                             'attention.selection': 'approximate', 'attention.recall_target': 0.9},
      'vanilla': {}, 'vanilla_relu': {'attention.kernel': 'relu'},
      'vanilla_ffntopk_k16': {'ffn.kind': 'topk', 'ffn.k': 16}}
  for tag, overrides in configs.items():
    assert re.fullmatch(rf'{re.escape(tag)}_[0-9a-f]{{8}}',
                        train.eval_tag(smoke_config('listops', '', 'vanilla', **overrides)))
  config = smoke_config('listops', '', 'topk,k=32')
  assert train.eval_tag(config, 'latest').startswith('topk_k32_latest_')
  # Any other field (here max_length) gives another tag; the same config, the same tag.
  tags = {train.eval_tag(smoke_config('listops', '', 'topk,k=32', **overrides))
          for overrides in ({}, {}, {'max_length': 24})}
  assert len(tags) == 2


def test_evaluate_vanilla_checkpoint_with_exact_topk(listops_run):
  config, workdir, results = listops_run
  # k covers all 65 keys (64 tokens + CLS), so top-k must reproduce dense attention.
  topk_config = smoke_config('listops', config.data_dir, 'topk,k=128,smoke')
  evaluated = train.evaluate(topk_config, workdir)
  assert evaluated['tag'].startswith('topk_k128_') and evaluated['step'] == results['best_step']
  assert read_json(os.path.join(workdir, f'eval_results_{evaluated["tag"]}.json')) == (
      json.loads(json.dumps(evaluated)))
  assert evaluated['config'] == topk_config.to_dict()
  for split in ('validation', 'test'):
    assert evaluated[split]['accuracy'] == results['best'][split]['accuracy']
    assert evaluated[split]['loss'] == pytest.approx(results['best'][split]['loss'], rel=1e-5)


def test_evaluations_of_other_configs_keep_their_own_files(listops_run, tmp_path):
  config, source, _ = listops_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  short = smoke_config('listops', config.data_dir, max_length=24)
  evaluated = [train.evaluate(c, workdir) for c in (config, short)]
  assert evaluated[0]['tag'] != evaluated[1]['tag']
  for results, max_length in zip(evaluated, (64, 24), strict=True):
    written = read_json(os.path.join(workdir, f'eval_results_{results["tag"]}.json'))
    assert written['config']['max_length'] == max_length
  assert evaluated[0]['test'] != evaluated[1]['test']  # expressions of up to 40 tokens, cut at 24


def test_evaluate_says_why_it_falls_back_to_the_latest(listops_run, tmp_path, caplog):
  config, source, results = listops_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  checkpoints = RunCheckpoints(workdir, keep=2)
  checkpoints.set_aside([results['best_step']], 'best')
  checkpoints.close()
  evaluated = train.evaluate(config, workdir)
  assert evaluated['checkpoint'] == 'latest' and evaluated['step'] == 4
  assert (f'No best checkpoint in {workdir} (the best checkpoint of step(s) '
          f'[{results["best_step"]}] was set aside in unusable_checkpoints/') in caplog.text
  assert 'no validation ran' not in caplog.text


def test_evaluate_without_checkpoint_is_an_error(listops_data, tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    train.evaluate(smoke_config('listops', listops_data), str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing created
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    train.evaluate(smoke_config('listops', listops_data), str(tmp_path / 'missing'))
  assert not os.path.exists(tmp_path / 'missing')


# ----------------------------------------------------------------------------- failures, signals


@pytest.mark.filterwarnings('ignore:overflow encountered in cast')
def test_non_finite_update_names_the_step(listops_data, tmp_path):
  # A rate beyond float32 makes the first update infinite: caught at that step, before any save.
  # (A finite state whose next loss is NaN is test_diverged_run_saves_nothing_diverged_...)
  config = smoke_config('listops', listops_data, learning_rate=1e39, warmup_steps=0,
                        schedule='constant')
  with pytest.raises(FloatingPointError, match=(
      r'^the update of step 1 made the train state NaN or infinite \(the loss of its batch was '
      r'[0-9.]+\); no checkpoint is left, so a rerun .* starts from scratch$')):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path / 'checkpoints')


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


def test_sigterm_saves_a_checkpoint_at_the_current_step(listops_data, tmp_path,
                                                        compilation_cache):
  workdir = str(tmp_path / 'run')
  process, stderr = _sigterm_a_long_run(workdir, listops_data, compilation_cache)
  assert process.returncode == -signal.SIGTERM, stderr[-3000:]
  last_logged = max(step for step, split in read_metrics(workdir) if split == 'train')
  # log_every=1 in smoke configs: the step the signal stopped at is the last one logged.
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(last_logged)], stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


def test_profile_steps_writes_a_trace(profiled_run):
  _, workdir, results = profiled_run
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert results['step'] == 4


# ----------------------------------------------------------------------------- faults


def test_diverged_run_saves_nothing_diverged_and_a_rerun_recovers(listops_run, listops_data,
                                                                  tmp_path):
  _, full_workdir, full = listops_run
  workdir = str(tmp_path)
  # rsqrt warmup: step 1 runs at learning rate 0 (its state is sound); step 2's huge rate makes
  # a finite state whose validation loss and next training loss are NaN.
  config = smoke_config('listops', listops_data, num_eval_steps=-1, checkpoint_every=1,
                        learning_rate=1e9)
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert message.startswith('training loss is nan at step 3; moved the diverged checkpoint(s) '
                            'of step(s) [2] to unusable_checkpoints/'), message
  assert f'the last checkpoint, {workdir}/checkpoints/1 (step 1), is sound' in message
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']
  assert os.listdir(os.path.join(workdir, 'unusable_checkpoints')) == ['2']
  assert not os.listdir(os.path.join(workdir, 'best_checkpoint'))  # NaN loss is never best
  assert read_metrics(workdir)[(2, 'validation')]['loss'] is None  # NaN written as null
  # The rerun with the listops_run's learning rate resumes from step 1 (whose state is the same
  # at any rate, since step 1's rate is 0) and reproduces listops_run.
  config.learning_rate = listops_run[0].learning_rate
  resumed = train.train_and_evaluate(config, workdir)
  for split in ('validation', 'test'):
    assert resumed[split] == pytest.approx(full[split], rel=1e-6), split
  expected, actual = read_metrics(full_workdir), read_metrics(workdir)
  assert set(actual) == set(expected)  # records past step 1 of the failed run are gone
  for step in range(1, 5):
    assert actual[(step, 'train')]['loss'] == pytest.approx(expected[(step, 'train')]['loss'],
                                                            rel=1e-6)


def _corrupt(checkpoint: str, how: str) -> None:
  if how == 'empty _METADATA':
    open(os.path.join(checkpoint, 'state', '_METADATA'), 'w').close()
  else:
    array_file = max(glob.glob(os.path.join(checkpoint, 'state', 'ocdbt.process_0', 'd', '*')),
                     key=os.path.getsize)
    os.truncate(array_file, os.path.getsize(array_file) // 2)


@pytest.mark.parametrize('how', ['truncated array file', 'empty _METADATA'])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(profiled_run, listops_data, how,
                                                              tmp_path, caplog):
  config, source, full = profiled_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  _corrupt(os.path.join(workdir, 'checkpoints', '4'), how)
  resumed = train.train_and_evaluate(config, workdir)
  assert f'Checkpoint {workdir}/checkpoints/4 is unusable' in caplog.text
  assert f'Falling back to the older checkpoint {workdir}/checkpoints/3' in caplog.text
  assert os.listdir(os.path.join(workdir, 'unusable_checkpoints')) == ['4']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '4']  # 4 saved anew
  for split in ('validation', 'test'):
    assert resumed[split] == pytest.approx(full[split], rel=1e-6), split
  # Step 4 is logged again, and shown once: TensorBoard hides the first run's events past step 3.
  assert read_metrics(workdir).keys() == read_metrics(source).keys()
  scalars = read_scalars(os.path.join(workdir, 'tensorboard'))
  assert scalars.keys() == read_scalars(os.path.join(source, 'tensorboard')).keys()


def test_fallback_logs_no_tracebacks_of_abandoned_reads(profiled_run, monkeypatch, caplog):
  # The first array read fails while the others are still pending, as when a truncated file is
  # read first: orbax closes its event loop on them, and each used to print a traceback when
  # garbage-collected.
  from orbax.checkpoint._src.serialization import serialization
  read_shard, reads = serialization._read_shard, []

  async def failing_first(**kwargs):
    reads.append(kwargs)
    if len(reads) == 1:
      raise OSError('truncated file')
    await asyncio.sleep(0.2)
    return await read_shard(**kwargs)

  monkeypatch.setattr(serialization, '_read_shard', failing_first)
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  config, workdir, _ = profiled_run
  checkpoints = RunCheckpoints(workdir, keep=2, read_only=True)
  try:
    step, _ = checkpoints.restore('latest', train.make_trainer(config).init_state())
  finally:
    checkpoints.close()
  gc.collect()
  assert step == 3 and len(reads) > 2
  assert f'Checkpoint {workdir}/checkpoints/4 is unusable (Exception: ' in caplog.text
  assert unraisable == [] and 'Event loop is closed' not in caplog.text


def test_full_disk_during_a_save_is_one_error_naming_the_checkpoint(listops_run, listops_data,
                                                                     tmp_path, monkeypatch):
  _, _, full = listops_run
  save = ocp.CheckpointManager.save

  def save_on_a_full_disk(self, step, *args, **kwargs):
    if step == 4:  # as TensorStore reports it, wrapped by orbax
      try:
        raise ValueError('RESOURCE_EXHAUSTED: Error writing file: [OS error 28: No space left on '
                         'device]')
      except ValueError as error:
        raise RuntimeError('Failed to save checkpoint') from error
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save_on_a_full_disk)
  workdir = str(tmp_path)
  config = smoke_config('listops', listops_data, num_eval_steps=-1)
  with pytest.raises(CheckpointError) as error:
    train.train_and_evaluate(config, workdir)
  assert str(error.value) == (f'cannot save checkpoint {workdir}/checkpoints/4: no space left on '
                              'device; free space and rerun, which resumes from the last '
                              'checkpoint')
  assert error.value.__cause__ is None and error.value.__suppress_context__
  monkeypatch.undo()  # space freed: the rerun resumes from step 2 and finishes the run
  resumed = train.train_and_evaluate(config, workdir)
  for split in ('validation', 'test'):
    assert resumed[split] == pytest.approx(full[split], rel=1e-6), split


def test_all_checkpoints_corrupt_is_an_error_naming_them(profiled_run, tmp_path):
  config, source, _ = profiled_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  for step, how in ((3, 'empty _METADATA'), (4, 'truncated array file')):
    _corrupt(os.path.join(workdir, 'checkpoints', str(step)), how)
  with pytest.raises(CheckpointError, match=(
      rf'no usable checkpoint.*\n  {workdir}/checkpoints/4: .*\n  {workdir}/checkpoints/3: '
      r'JSONDecodeError')):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '4']  # nothing moved
  assert not os.path.exists(os.path.join(workdir, 'unusable_checkpoints'))


def test_corrupt_best_checkpoint_is_set_aside_not_failed_on_every_rerun(listops_run, tmp_path,
                                                                       caplog):
  config, source, full = listops_run
  assert full['best_step'] == 2  # not the final step, so the results restore the best checkpoint
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  _corrupt(os.path.join(workdir, 'best_checkpoint', '2'), 'truncated array file')
  for _ in range(2):  # a finished run: each rerun only computes the results again
    results = train.train_and_evaluate(config, workdir)
    assert results['best_step'] is None
    assert results['best'] == {split: results[split] for split in ('validation', 'test')}
  assert f'Best checkpoint {workdir}/best_checkpoint/2 is unusable' in caplog.text
  assert os.listdir(os.path.join(workdir, 'unusable_checkpoints')) == ['best-2']
  for split in ('validation', 'test'):
    assert results[split] == pytest.approx(full[split], rel=1e-6), split


def test_best_checkpoint_past_the_resumed_step_is_set_aside(listops_data, tmp_path):
  # At learning rate 1000 the loss is NaN at step 5: checkpoint 4 is set aside, a rerun resumes
  # from 2, and the best checkpoint (step 3) holds a state of the failed run that the rerun
  # replaces.
  workdir = str(tmp_path)
  config = smoke_config('listops', listops_data, num_eval_steps=-1, num_train_steps=6,
                        eval_frequency=1, learning_rate=1000.0)
  with pytest.raises(FloatingPointError, match='resumes from it'):
    train.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, 'best_checkpoint')) == ['3']
  config.learning_rate = 0.05
  resumed = train.train_and_evaluate(config, workdir)
  # The best is chosen, and evaluated, among the states of the rerun.
  metrics = read_metrics(workdir)
  assert resumed['best']['validation'] == pytest.approx(
      metrics[(resumed['best_step'], 'validation')], rel=1e-6)
  assert sorted(os.listdir(os.path.join(workdir, 'unusable_checkpoints'))) == ['4', 'best-3']


def read_scalars(log_dir: str) -> dict[tuple[int, str], float]:
  """The scalars of the TensorBoard event files in `log_dir` (TFRecord framing: length, its CRC,
  the Event proto, its CRC), by (step, tag), as TensorBoard shows them: files are read oldest
  first and a `SessionLog.START` event of step s hides the earlier events of steps >= s. Asserts
  that no (step, tag) is shown twice."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(log_dir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars = {key: value for key, value in scalars.items() if key[0] < event.step}
      for value in event.summary.value:
        assert (event.step, value.tag) not in scalars, f'{value.tag} shown twice at {event.step}'
        scalars[(event.step, value.tag)] = value.simple_value
  return scalars


def test_metric_writer_writes_strict_json_and_tensorboard_scalars(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(1, 'train', {'loss': float('nan'), 'accuracy': 0.5})
  writer.write(2, 'train', {'loss': float('inf'), 'accuracy': 0.25})
  writer.close()
  assert read_metrics(str(tmp_path)) == {(1, 'train'): {'loss': None, 'accuracy': 0.5},
                                         (2, 'train'): {'loss': None, 'accuracy': 0.25}}
  scalars = read_scalars(str(tmp_path / 'tensorboard'))
  assert scalars.keys() == {(1, 'train/loss'), (1, 'train/accuracy'), (2, 'train/loss'),
                            (2, 'train/accuracy')}
  assert np.isnan(scalars[(1, 'train/loss')]) and scalars[(2, 'train/loss')] == float('inf')
  assert scalars[(1, 'train/accuracy')] == 0.5 and scalars[(2, 'train/accuracy')] == 0.25
  # A resumed writer keeps only what `keep` selects.
  MetricWriter(str(tmp_path), keep=lambda record: record['step'] < 2).close()
  assert list(read_metrics(str(tmp_path))) == [(1, 'train')]


def test_save_refuses_a_non_finite_state(tmp_path):
  checkpoints = RunCheckpoints(str(tmp_path), keep=1)
  state = {'w': jnp.array([1.0, np.nan]), 'step': jnp.array(3)}
  with pytest.raises(FloatingPointError, match='step 3 holds NaN or infinite'):
    checkpoints.save(3, state, wall_time_s=1.0, train_window={},
                     data_iterator=iter(grain.MapDataset.range(1).to_iter_dataset()))
  with pytest.raises(FloatingPointError, match='step 3 holds NaN or infinite'):
    checkpoints.save_best(3, state, {'accuracy': 0.5, 'loss': 1.0})
  assert not checkpoints.save_best(3, state, {'accuracy': 0.5, 'loss': float('nan')})
  checkpoints.close()
  assert not os.listdir(os.path.join(str(tmp_path), 'checkpoints'))
  assert not os.listdir(os.path.join(str(tmp_path), 'best_checkpoint'))


_LOCK_HOLDER = """
import sys, time
from lra.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print('LOCKED', flush=True)
time.sleep(120)
"""


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
