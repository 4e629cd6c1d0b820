"""Tests of the command-line layer: lra.config_loader, train.py's flags and sweep.py."""
import csv
import json
import os
import subprocess
import sys

import pytest

import sweep
from configs import image, listops, pathfinder, pathx, retrieval, text
from lra import config_loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULES = (listops, text, retrieval, image, pathfinder, pathx)


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


# ----------------------------------------------------------------------------- config_loader


def test_get_config_applies_typed_overrides():
  config = config_loader.get_config('configs/listops.py:topk', [
      ('attention.k', '32'), ('model.num_layers', '2'), ('learning_rate', '1e-3'),
      ('model.learned_pos', 'true'), ('data_dir', '/data')])
  assert (config.attention.kind, config.attention.k, config.model.num_layers) == ('topk', 32, 2)
  assert (config.learning_rate, config.model.learned_pos, config.data_dir) == (
      1e-3, True, '/data')
  assert config.is_locked


@pytest.mark.parametrize('spec, overrides, message', [
    ('configs/missing.py:topk', [], "config file 'configs/missing.py' does not exist"),
    ('configs/common.py', [], "config file 'configs/common.py' defines no get_config"),
    ('configs/listops.py:flash', [], r"--config=configs/listops.py:flash: config arg 'flash' is "
                                     'unknown'),
    ('configs/listops.py', [('attention.kk', '3')],
     r"--config.attention.kk: no such field; the fields of config.attention are \['fused', 'k', "),
    ('configs/listops.py', [('modle.num_layers', '3')],
     r"--config.modle.num_layers: no such field; the fields of config are \['attention', "),
    ('configs/listops.py', [('attention.k', 'abc')], "--config.attention.k='abc': expected int"),
    ('configs/listops.py', [('model.learned_pos', 'yes')], 'expected bool'),
    ('configs/listops.py', [('model', '3')], 'cannot override a field of type ConfigDict'),
])
def test_get_config_errors_name_the_mistake(spec, overrides, message):
  with pytest.raises(config_loader.ConfigError, match=message):
    config_loader.get_config(spec, overrides)


def test_split_overrides():
  rest, overrides = config_loader.split_overrides(
      ['train.py', '--config=c.py:topk', '--config.attention.k=32', '--workdir', 'w',
       '--config.data_dir', '/d', '--jax_log_compiles'])
  assert rest == ['train.py', '--config=c.py:topk', '--workdir', 'w', '--jax_log_compiles']
  assert overrides == [('attention.k', '32'), ('data_dir', '/d')]
  with pytest.raises(config_loader.ConfigError, match='--config.data_dir has no value'):
    config_loader.split_overrides(['--config.data_dir', '--workdir=w'])


# ----------------------------------------------------------------------------- train.py


@pytest.mark.parametrize('args, message', [
    (['--config=configs/nope.py'], "train.py: config file 'configs/nope.py' does not exist."),
    (['--config=configs/listops.py:smoke', '--config.attention.kk=3'],
     'train.py: --config.attention.kk: no such field'),
])
def test_train_py_reports_a_config_mistake_in_one_line(args, message):
  result = _run('train.py', *args, '--workdir=/tmp/unused')
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
  assert result.stderr.startswith(message)


def test_train_py_accepts_and_applies_jax_flags():
  # JAX's options are absl flags: --jax_platforms=bogus parses, then stops backend start-up.
  result = _run('train.py', '--jax_log_compiles', '--jax_platforms=bogus',
                '--config=configs/listops.py:smoke', '--workdir=/tmp/unused')
  assert 'Unknown command line flag' not in result.stderr
  assert "Unable to initialize backend 'bogus'" in result.stderr, result.stderr[-2000:]


# ----------------------------------------------------------------------------- sweep.py


def test_sweep_point_names_are_unique():
  for module in _MODULES:
    points = module.get_sweep('topk')
    assert len({sweep.point_name(p) for p in points}) == len(points)


def test_sweep_flags():
  points = config_loader.get_sweep('configs/listops.py:topk,smoke')
  assert points == listops.get_sweep('topk,smoke')
  assert sweep.point_name(points[1]) == 'topk_k4_c16'
  overrides = sweep.point_overrides([('data_dir', 'DATA')], points[1])
  assert sweep.train_flags('configs/listops.py:topk,smoke', overrides, 'root/topk_k4_c16') == [
      '--config=configs/listops.py:topk,smoke', '--workdir=root/topk_k4_c16',
      '--config.data_dir=DATA', '--config.attention.kind=topk', '--config.attention.k=4',
      '--config.attention.query_chunk_size=16']
  with pytest.raises(config_loader.ConfigError, match='does not exist'):
    config_loader.get_sweep('configs/missing.py:topk')


def test_sweep_prints_commands_with_shared_overrides():
  result = _run('sweep.py', '--config=configs/text.py:chunked,smoke', '--config.data_dir=DATA',
                '--workdir_root=/tmp/root', '--config.num_train_steps', '3')
  assert result.returncode == 0, result.stderr[-2000:]
  shared = '--config.data_dir=DATA --config.num_train_steps=3'
  assert result.stdout.splitlines() == [
      'python train.py --config=configs/text.py:chunked,smoke --workdir=/tmp/root/vanilla '
      f'{shared} --config.attention.kind=vanilla',
      'python train.py --config=configs/text.py:chunked,smoke --workdir=/tmp/root/chunked_c16 '
      f'{shared} --config.attention.kind=chunked --config.attention.query_chunk_size=16']


def test_sweep_rejects_a_misspelt_shared_override_in_one_line():
  result = _run('sweep.py', '--config=configs/text.py:chunked,smoke', '--config.dat_dir=DATA')
  assert result.returncode != 0
  assert result.stderr.strip() == (
      "sweep.py: --config.dat_dir: no such field; the fields of config are " +
      str(sorted(text.get_config().keys())) + '.')


def test_sweep_summarizes_fake_results(tmp_path):
  root = str(tmp_path)
  points = [(sweep.point_name(p), p) for p in listops.get_sweep('topk,smoke')]
  fake = {'validation': {'accuracy': 0.375, 'loss': 1.5}, 'test': {'accuracy': 0.25, 'loss': 2.0}}
  for name, _ in points[:2]:
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, 'results.json'), 'w') as f:
      json.dump(fake, f)
  rows = sweep.summarize(points, root)
  assert len(rows) == 3
  assert (rows[1]['name'], rows[1]['attention.k'], rows[1]['test_accuracy']) == (
      'topk_k4_c16', 4, 0.25)
  assert rows[2]['validation_accuracy'] == ''  # no results.json yet
  with open(os.path.join(root, 'summary.csv')) as f:
    table = list(csv.DictReader(f))
  assert table[0]['validation_accuracy'] == '0.375'
  assert table[0]['attention.kind'] == 'vanilla'
  with open(os.path.join(root, 'summary.md')) as f:
    lines = f.read().splitlines()
  assert len(lines) == 2 + len(points)
  assert '| topk_k4_c16 | topk | 4 | 16 | 0.3750 | 1.5000 | 0.2500 | 2.0000 |' in lines
