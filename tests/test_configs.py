"""Tests of configs/: reference values, arg parsing, sweeps, and checks of every value."""
import os
import subprocess
import sys

import pytest

from configs import common, image, listops, pathfinder, pathx, retrieval, text
from lra import build

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FIELDS = {
    'task', 'task_options', 'data_dir', 'seed', 'batch_size', 'eval_batch_size', 'max_length',
    'num_train_steps', 'eval_frequency', 'num_eval_steps', 'checkpoint_every', 'keep_checkpoints',
    'log_every', 'learning_rate', 'schedule', 'warmup_steps', 'weight_decay', 'grad_clip_norm',
    'model', 'attention', 'ffn', 'profile_steps', 'truncate'}
_MODULES = {'listops': listops, 'text': text, 'retrieval': retrieval, 'image': image,
            'pathfinder': pathfinder, 'pathx': pathx}

# The LRA repository's vanilla-Transformer settings, written out literally:
# (max_length, batch, steps, eval every, lr, schedule, warmup, weight decay, clip,
#  emb, qkv, mlp, heads, layers, dropout, attention dropout, pooling, learned positions).
_REFERENCE = {
    ('listops', ''): (2000, 32, 5000, 50, 0.05, 'rsqrt', 1000, 0.1, 0.0,
                      512, 512, 1024, 8, 4, 0.1, 0.1, 'CLS', False),
    ('text', ''): (1000, 32, 20000, 100, 0.05, 'rsqrt', 8000, 0.1, 0.0,
                   256, 256, 1024, 4, 4, 0.1, 0.1, 'CLS', False),
    ('retrieval', ''): (4000, 32, 5000, 100, 0.05, 'rsqrt', 8000, 0.1, 0.0,
                        128, 128, 512, 4, 4, 0.1, 0.1, 'CLS', False),
    ('image', ''): (1024, 256, 35000, 175, 5e-4, 'cosine', 175, 0.0, 0.0,
                    128, 64, 128, 8, 1, 0.3, 0.2, 'CLS', True),
    ('pathfinder', ''): (1024, 512, 62400, 312, 1e-3, 'cosine', 312, 0.0, 0.0,
                         32, 16, 32, 4, 4, 0.2, 0.1, 'MEAN', False),
    ('pathfinder', '64'): (4096, 256, 125000, 625, 1e-3, 'cosine', 625, 0.0, 0.0,
                           32, 32, 32, 4, 2, 0.1, 0.1, 'CLS', True),
    ('pathfinder', '128'): (16384, 64, 500000, 2500, 1e-3, 'cosine', 2500, 0.0, 1.0,
                            32, 16, 32, 2, 1, 0.1, 0.1, 'MEAN', True),
    ('pathx', ''): (16384, 64, 500000, 2500, 1e-3, 'cosine', 2500, 0.0, 1.0,
                    32, 16, 32, 2, 1, 0.1, 0.1, 'MEAN', True),
    ('pathfinder', '256'): (65536, 32, 500000, 5000, 1e-3, 'cosine', 5000, 0.0, 0.0,
                            32, 32, 32, 4, 2, 0.1, 0.1, 'CLS', True),
}


def _actual(config):
  m = config.model
  return (config.max_length, config.batch_size, config.num_train_steps, config.eval_frequency,
          config.learning_rate, config.schedule, config.warmup_steps, config.weight_decay,
          config.grad_clip_norm, m.emb_dim, m.qkv_dim, m.mlp_dim, m.num_heads, m.num_layers,
          m.dropout_rate, m.attention_dropout_rate, m.classifier_pool, m.learned_pos)


@pytest.mark.slow
def test_importing_a_config_starts_no_jax():
  code = ('import sys\n'
          'from configs import image, listops, lm, pathfinder, pathx, retrieval, text\n'
          'for module in (image, listops, pathfinder, pathx, retrieval, text):\n'
          '  module.get_config("topk,smoke"); module.get_sweep("topk")\n'
          'lm.get_config("masked,topk,kernel=relu,k=4,smoke")\n'
          'print(sorted(m for m in ("jax", "tensorflow", "lra", "topk") if m in sys.modules))\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True, cwd=_REPO)
  assert result.stdout.strip() == '[]'


@pytest.mark.parametrize('name, arg', _REFERENCE)
def test_full_config_matches_reference(name, arg):
  config = _MODULES[name].get_config(arg)
  assert _actual(config) == _REFERENCE[name, arg]
  assert config.eval_batch_size == config.batch_size
  assert config.num_eval_steps == -1
  assert config.model.mask_padding  # the original masks token id 0 everywhere
  assert dict(config.attention) == {'kind': 'vanilla', 'k': 128, 'query_chunk_size': 1024,
                                    'kernel': 'softmax', 'selection': 'exact',
                                    'recall_target': 0.95, 'method': None, 'fused': True}
  assert config.ffn.kind == 'dense'


@pytest.mark.parametrize('name, preset', [(name, preset) for name in _MODULES
                                          for preset in ('', 'smoke')])
def test_builds_locked_with_every_field(name, preset):
  config = _MODULES[name].get_config(preset)
  assert set(config.keys()) == _FIELDS
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.not_a_field = 1
  build.build(config)  # every value is valid
  if preset:
    assert config.max_length <= 64
    assert (config.batch_size, config.num_eval_steps) == (8, 2)
    assert config.num_train_steps <= 10


def test_task_names_and_options():
  assert [_MODULES[n].get_config().task for n in _MODULES] == [
      'listops', 'text', 'retrieval', 'image', 'pathfinder32', 'pathx']
  assert retrieval.get_config().model.interaction == 'concat'
  assert dict(pathfinder.get_config().task_options) == {'difficulty': 'hard'}
  assert dict(pathx.get_config().task_options) == {}
  config = pathfinder.get_config('64,easy,chunked')
  assert (config.task, config.task_options.difficulty, config.attention.kind) == (
      'pathfinder64', 'easy', 'chunked')


def test_arg_sets_attention():
  config = listops.get_config('topk,k=64,smoke')
  assert (config.attention.kind, config.attention.k) == ('topk', 64)
  assert listops.get_config('topk,smoke').attention.k == 8  # the smoke default
  config = text.get_config('query_chunk_size=100,chunked')
  assert (config.attention.kind, config.attention.query_chunk_size) == ('chunked', 100)
  assert image.get_config('smoke=true').max_length <= 64
  # k=0 is kept, not replaced by the default: test_bad_value_fails_before_any_data_is_read checks
  # that config.attention.k=0 is then an error.
  assert listops.get_config('topk,k=0,smoke').attention.k == 0


@pytest.mark.parametrize('arg, message', [
    ('flash', 'valid tokens'), ('kk=3', 'valid names'), ('k=abc', 'expected int'),
    ('smoke=yes', 'true or false'), ('attention=linear', 'expected one of')])
def test_bad_arg_raises(arg, message):
  with pytest.raises(ValueError, match=message):
    listops.get_config(arg)


@pytest.mark.parametrize('arg', ['topk,k=64,k=32', 'topk,vanilla', 'topk,attention=chunked',
                                 'smoke,smoke=false', 'query_chunk_size=8,query_chunk_size=8'])
def test_arg_given_twice_raises(arg):
  with pytest.raises(ValueError, match='given twice'):
    listops.get_config(arg)
  with pytest.raises(ValueError, match="config arg 'size' is given twice"):
    pathfinder.get_config('32,64')


def test_bad_pathfinder_arg_raises():
  for arg in ('48', 'size=48', 'difficulty=medium'):
    with pytest.raises(ValueError, match='expected one of|valid tokens'):
      pathfinder.get_config(arg)
  with pytest.raises(ValueError, match='valid tokens'):
    pathx.get_config('64')


@pytest.mark.parametrize('group, field, value, message', [
    ('attention', 'kind', 'linear', r"config\.attention: Unknown attention kind 'linear'"),
    ('attention', 'k', 0, r'config\.attention: k must be an integer >= 1'),
    ('attention', 'query_chunk_size', -1, r'config\.attention: query_chunk_size must be'),
    ('attention', 'kernel', 'cosine', r"config\.attention: Unknown attention kernel 'cosine'"),
    ('attention', 'selection', 'fast', r"config\.attention: Unknown selection 'fast'"),
    ('attention', 'recall_target', 0.0, r'config\.attention: recall_target must be'),
    ('ffn', 'kind', 'sparse', r"config\.ffn: Unknown feed-forward kind 'sparse'"),
    ('ffn', 'k', 0, r'config\.ffn: k must be an integer >= 1'),
    (None, 'batch_size', 0, r'config\.batch_size=0'),
    (None, 'num_eval_steps', 0, r'config\.num_eval_steps=0'),
    (None, 'profile_steps', -1, r'config\.profile_steps=-1'),
    (None, 'truncate', None, r'config\.truncate=None'),
    (None, 'task', 'lisptops', r"Unknown task 'lisptops'"),
    (None, 'schedule', 'linear', r"schedule must be one of .*'linear'"),
    (None, 'learning_rate', 0.0, r'learning_rate \(base\) must be > 0'),
    (None, 'warmup_steps', -1, r'warmup_steps must be >= 0'),
    (None, 'weight_decay', -0.1, r'weight_decay must be >= 0'),
    (None, 'grad_clip_norm', -1.0, r'grad_clip_norm must be >= 0'),
    ('model', 'dropout_rate', 1.0, r'config\.model: TransformerConfig\.dropout_rate=1\.0'),
    ('model', 'num_heads', 3, r'config\.model: TransformerConfig\.num_heads=3'),
    ('model', 'classifier_pool', 'MAX', r"config\.model: TransformerConfig\.classifier_pool='MAX'"),
])
def test_bad_value_fails_before_any_data_is_read(group, field, value, message, tmp_path):
  config = listops.get_config('smoke')
  config.data_dir = str(tmp_path / 'no_data_here')  # reading data would raise FileNotFoundError
  (config[group] if group else config)[field] = value
  with pytest.raises(ValueError, match=message):
    build.setup(config)


@pytest.mark.parametrize('name', _MODULES)
def test_sweep_points_are_valid_overrides(name):
  module = _MODULES[name]
  points = module.get_sweep('topk')
  assert points[0] == {'attention.kind': 'vanilla'}
  assert len(points) == 1 + len(common.SWEEP_KS) * len(common.SWEEP_CHUNKS)
  for point in points:
    config = module.get_config('topk')
    for key, value in point.items():
      group, field = key.split('.')
      config[group][field] = value
    build.build(config)


def test_sweep_kinds():
  assert listops.get_sweep('vanilla') == [{'attention.kind': 'vanilla'}]
  assert listops.get_sweep('chunked,smoke') == [
      {'attention.kind': 'vanilla'},
      {'attention.kind': 'chunked', 'attention.query_chunk_size': 16}]
  assert len(pathfinder.get_sweep('128,topk,smoke')) == 3


def test_sweep_arg_pins_its_axis():
  # Every point sets k and query_chunk_size, so an arg's value must pin the axis, not vanish.
  assert listops.get_sweep('topk,k=64') == [{'attention.kind': 'vanilla'}] + [
      {'attention.kind': 'topk', 'attention.k': 64, 'attention.query_chunk_size': c}
      for c in common.SWEEP_CHUNKS]
  assert listops.get_sweep('chunked,query_chunk_size=512') == [
      {'attention.kind': 'vanilla'},
      {'attention.kind': 'chunked', 'attention.query_chunk_size': 512}]
  points = listops.get_sweep('topk,smoke,query_chunk_size=8')
  assert [p['attention.k'] for p in points[1:]] == list(common.SMOKE_SWEEP_KS)
  assert {p['attention.query_chunk_size'] for p in points[1:]} == {8}
