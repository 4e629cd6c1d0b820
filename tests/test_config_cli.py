"""Tests of config_cli: configs from the command line, and train.py's use of it."""
import os
import subprocess
import sys

import pytest

import config_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


# ----------------------------------------------------------------------------- config_cli


def test_get_config_applies_typed_overrides():
  config = config_cli.get_config('configs/listops.py:topk', [
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
  with pytest.raises(config_cli.ConfigError, match=message):
    config_cli.get_config(spec, overrides)


def test_split_overrides():
  rest, overrides = config_cli.split_overrides(
      ['train.py', '--config=c.py:topk', '--config.attention.k=32', '--workdir', 'w',
       '--config.data_dir', '/d', '--jax_log_compiles'])
  assert rest == ['train.py', '--config=c.py:topk', '--workdir', 'w', '--jax_log_compiles']
  assert overrides == [('attention.k', '32'), ('data_dir', '/d')]
  with pytest.raises(config_cli.ConfigError, match='--config.data_dir has no value'):
    config_cli.split_overrides(['--config.data_dir', '--workdir=w'])


# ----------------------------------------------------------------------------- train.py


@pytest.mark.slow
def test_train_py_takes_jax_flags_and_reports_a_config_mistake_in_one_line():
  # JAX's options are absl flags (an unknown flag would end absl's parsing with a FATAL error);
  # a ConfigError ends the program with one line naming the script (config_cli.run). The
  # messages themselves are checked in test_get_config_errors_name_the_mistake.
  result = _run('train.py', '--jax_log_compiles', '--jax_platforms=cpu',
                '--config=configs/listops.py:smoke', '--config.attention.kk=3',
                '--workdir=/tmp/unused')
  assert result.returncode != 0
  assert 'Unknown command line flag' not in result.stderr
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
  assert result.stderr.startswith('train.py: --config.attention.kk: no such field')
