"""Tests of the training loop (lra.train) and train.py, end to end.

Runs use the real smoke configs on fixture data in the release formats (ListOps from the
generator, retrieval TSVs, Pathfinder PNGs) or TFDS mock data. One 4-step ListOps run
(`listops_run`, conftest.py) is shared by the resume, sharding and fault tests.
"""
import asyncio
import gc
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from conftest import REPO, read_json, read_metrics, read_scalars, smoke_config
from PIL import Image

from lra import build, train
from lra.checkpointing import CheckpointError, RunCheckpoints
from lra.steps import Trainer

pytestmark = pytest.mark.usefixtures('compilation_cache')


@pytest.mark.slow
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
@pytest.mark.slow
def test_every_task_trains(module, arg, make_data, tmp_path):
  data_dir = make_data(str(tmp_path / 'data')) if make_data else str(tmp_path / 'data')
  config = smoke_config(module, data_dir, arg, num_train_steps=2)
  with tfds.testing.mock_data(num_examples=10):
    results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['step'] == 2 and results['best_step'] == 2
  assert 0.0 <= results['test']['accuracy'] <= 1.0 and np.isfinite(results['test']['loss'])


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_between_train_records_logs_the_uninterrupted_means(listops_run, listops_data,
                                                                     tmp_path, monkeypatch):
  # log_every=2 and a SIGTERM during step 3: the checkpoint of step 3 is saved between two train
  # records, and the resumed run's record of step 4 still averages steps 3 and 4.
  _, full_workdir, _ = listops_run
  workdir = str(tmp_path)
  config = smoke_config('listops', listops_data, num_eval_steps=-1, log_every=2)
  step = Trainer.step

  def step_and_signal(self, state, batch):
    if int(state.step) == 2:
      signal.raise_signal(signal.SIGTERM)
    return step(self, state, batch)

  monkeypatch.setattr(Trainer, 'step', step_and_signal)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- divergence


@pytest.mark.filterwarnings('ignore:overflow encountered in cast')
@pytest.mark.slow
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


@pytest.mark.slow
def test_profile_steps_writes_a_trace(profiled_run):
  _, workdir, results = profiled_run
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert results['step'] == 4


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- faults


def _corrupt(checkpoint: str, how: str) -> None:
  if how == 'empty _METADATA':
    open(os.path.join(checkpoint, 'state', '_METADATA'), 'w').close()
  else:
    array_file = max(glob.glob(os.path.join(checkpoint, 'state', 'ocdbt.process_0', 'd', '*')),
                     key=os.path.getsize)
    os.truncate(array_file, os.path.getsize(array_file) // 2)


@pytest.mark.parametrize('how', ['truncated array file', 'empty _METADATA'])
@pytest.mark.slow
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


@pytest.mark.slow
def test_fallback_logs_no_tracebacks_of_abandoned_reads(profiled_run, monkeypatch, caplog):
  # The first array read fails while the others are still pending, as when a truncated file is
  # read first: orbax closes its event loop on them, and without the hook each prints a
  # traceback when garbage-collected.
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
    step, _ = checkpoints.restore('latest', build.make_trainer(build.build(config)).init_state())
  finally:
    checkpoints.close()
  gc.collect()
  assert step == 3 and len(reads) > 2
  assert f'Checkpoint {workdir}/checkpoints/4 is unusable (Exception: ' in caplog.text
  assert unraisable == [] and 'Event loop is closed' not in caplog.text


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
