"""Tests of configs/: reference values, arg parsing, overrides, validation and sweeps."""
import csv
import json
import os
import subprocess
import sys
import tempfile
import warnings

from absl import flags
from absl.testing import absltest, parameterized
from ml_collections import config_flags

from configs import common, image, listops, pathfinder, pathx, retrieval, text
from lra import sweep

_CONTRACT_FIELDS = {
    'task', 'task_options', 'data_dir', 'seed', 'batch_size', 'eval_batch_size', 'max_length',
    'num_train_steps', 'eval_frequency', 'num_eval_steps', 'checkpoint_every', 'keep_checkpoints',
    'log_every', 'learning_rate', 'schedule', 'warmup_steps', 'weight_decay', 'grad_clip_norm',
    'model', 'attention', 'ffn', 'profile_steps'}
_MODULES = {'listops': listops, 'text': text, 'retrieval': retrieval, 'image': image,
            'pathfinder': pathfinder, 'pathx': pathx}

# The LRA repository's vanilla-Transformer settings (lra.md §1), written out literally:
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


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(*_REFERENCE)
  def test_full_config_matches_reference(self, name, arg):
    config = _MODULES[name].get_config(arg)
    self.assertEqual(_actual(config), _REFERENCE[name, arg])
    self.assertEqual(config.eval_batch_size, config.batch_size)
    self.assertEqual(config.num_eval_steps, -1)
    self.assertTrue(config.model.mask_padding)  # the original masks token id 0 everywhere
    self.assertEqual(dict(config.attention), {'kind': 'vanilla', 'k': 128,
                                              'query_chunk_size': 1024, 'kernel': 'softmax'})
    self.assertEqual(config.ffn.kind, 'dense')

  @parameterized.parameters(*[(name, preset) for name in _MODULES for preset in ('', 'smoke')])
  def test_builds_locked_with_contract_fields(self, name, preset):
    config = _MODULES[name].get_config(preset)
    self.assertEqual(set(config.keys()), _CONTRACT_FIELDS)
    self.assertTrue(config.is_locked)
    with self.assertRaises(AttributeError):
      config.not_a_field = 1
    common.validate(config)
    if preset:
      self.assertLessEqual(config.max_length, 64)
      self.assertEqual((config.batch_size, config.num_eval_steps), (8, 2))
      self.assertLessEqual(config.num_train_steps, 10)

  def test_task_names_and_options(self):
    self.assertEqual([_MODULES[n].get_config().task for n in _MODULES],
                     ['listops', 'text', 'retrieval', 'image', 'pathfinder32', 'pathx'])
    self.assertEqual(retrieval.get_config().model.interaction, 'concat')
    self.assertEqual(dict(pathfinder.get_config().task_options), {'difficulty': 'hard'})
    self.assertEqual(dict(pathx.get_config().task_options), {})
    config = pathfinder.get_config('64,easy,chunked')
    self.assertEqual((config.task, config.task_options.difficulty, config.attention.kind),
                     ('pathfinder64', 'easy', 'chunked'))

  def test_arg_sets_attention(self):
    config = listops.get_config('topk,k=64,smoke')
    self.assertEqual((config.attention.kind, config.attention.k), ('topk', 64))
    self.assertEqual(listops.get_config('topk,smoke').attention.k, 8)  # the smoke default
    config = text.get_config('query_chunk_size=100,chunked')
    self.assertEqual((config.attention.kind, config.attention.query_chunk_size), ('chunked', 100))
    self.assertTrue(image.get_config('smoke=true').max_length <= 64)

  @parameterized.parameters(('flash', 'valid tokens'), ('kk=3', 'valid names'),
                            ('k=abc', 'expected int'), ('smoke=yes', 'true or false'),
                            ('attention=linear', 'expected one of'))
  def test_bad_arg_raises(self, arg, message):
    with self.assertRaisesRegex(ValueError, message):
      listops.get_config(arg)

  def test_bad_pathfinder_arg_raises(self):
    for arg in ('48', 'size=48', 'difficulty=medium'):
      with self.assertRaisesRegex(ValueError, 'expected one of|valid tokens'):
        pathfinder.get_config(arg)
    with self.assertRaisesRegex(ValueError, 'valid tokens'):
      pathx.get_config('64')

  def _parse_command_line(self, *args: str):
    argv = ['train.py', *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    with warnings.catch_warnings():
      # ml_collections 1.1.0 loads config files with the deprecated importlib load_module().
      warnings.simplefilter('ignore', DeprecationWarning)
      flag_values(argv)
    return flag_values.config

  def test_command_line_overrides(self):
    config = self._parse_command_line('--config=configs/listops.py:topk',
                                      '--config.attention.k=32', '--config.model.num_layers=2')
    self.assertEqual((config.attention.kind, config.attention.k, config.model.num_layers),
                     ('topk', 32, 2))
    with self.assertRaisesRegex(AttributeError, 'kk'):  # unknown field of the locked config
      self._parse_command_line('--config=configs/listops.py', '--config.attention.kk=32')

  @parameterized.parameters(
      ('attention', 'kind', 'linear'), ('attention', 'k', 0), ('attention', 'query_chunk_size', -1),
      ('attention', 'kernel', 'cosine'), ('ffn', 'kind', 'sparse'), ('ffn', 'k', 0),
      (None, 'batch_size', 0), (None, 'schedule', 'linear'), (None, 'num_eval_steps', 0),
      (None, 'learning_rate', 0.0), (None, 'warmup_steps', -1), ('model', 'dropout_rate', 1.0),
      ('model', 'num_heads', 3), ('model', 'classifier_pool', 'MAX'))
  def test_validate_rejects(self, group, field, value):
    config = listops.get_config()
    (config[group] if group else config)[field] = value
    name = f'{group}.{field}' if group else field
    with self.assertRaisesRegex(ValueError, f'config.{name}='):
      common.validate(config)


class SweepTest(parameterized.TestCase):

  @parameterized.parameters(*_MODULES)
  def test_sweep_points_are_valid_overrides(self, name):
    module = _MODULES[name]
    points = module.get_sweep('topk')
    self.assertEqual(points[0], {'attention.kind': 'vanilla'})
    self.assertLen(points, 1 + len(common.SWEEP_KS) * len(common.SWEEP_CHUNKS))
    self.assertLen({sweep.point_name(p) for p in points}, len(points))
    for point in points:
      config = module.get_config('topk')
      for key, value in point.items():
        group, field = key.split('.')
        config[group][field] = value
      common.validate(config)

  def test_sweep_kinds(self):
    self.assertEqual(listops.get_sweep('vanilla'), [{'attention.kind': 'vanilla'}])
    self.assertEqual(listops.get_sweep('chunked,smoke'),
                     [{'attention.kind': 'vanilla'},
                      {'attention.kind': 'chunked', 'attention.query_chunk_size': 16}])
    self.assertLen(pathfinder.get_sweep('128,topk,smoke'), 3)

  def test_load_sweep_and_flags(self):
    points = sweep.load_sweep('configs/listops.py:topk,smoke')
    self.assertEqual(points, listops.get_sweep('topk,smoke'))
    self.assertEqual(sweep.point_name(points[1]), 'topk_k4_c16')
    self.assertEqual(
        sweep.train_flags('configs/listops.py:topk,smoke', points[1], 'root/topk_k4_c16'),
        ['--config=configs/listops.py:topk,smoke', '--workdir=root/topk_k4_c16',
         '--config.attention.kind=topk', '--config.attention.k=4',
         '--config.attention.query_chunk_size=16'])
    with self.assertRaises(FileNotFoundError):
      sweep.load_sweep('configs/missing.py:topk')

  def test_prints_commands(self):
    result = subprocess.run(
        [sys.executable, '-m', 'lra.sweep', '--config=configs/text.py:chunked,smoke',
         '--workdir_root=/tmp/root'], capture_output=True, text=True, check=True)
    self.assertEqual(result.stdout.splitlines(), [
        'python train.py --config=configs/text.py:chunked,smoke --workdir=/tmp/root/vanilla '
        '--config.attention.kind=vanilla',
        'python train.py --config=configs/text.py:chunked,smoke --workdir=/tmp/root/chunked_c16 '
        '--config.attention.kind=chunked --config.attention.query_chunk_size=16'])

  def test_summarize_fake_results(self):
    with tempfile.TemporaryDirectory() as root:
      self._check_summary(root)

  def _check_summary(self, root: str):
    points = [(sweep.point_name(p), p) for p in listops.get_sweep('topk,smoke')]
    fake = {'validation': {'accuracy': 0.375, 'loss': 1.5}, 'test': {'accuracy': 0.25, 'loss': 2.0}}
    for name, _ in points[:2]:
      os.makedirs(os.path.join(root, name))
      with open(os.path.join(root, name, 'results.json'), 'w') as f:
        json.dump(fake, f)
    rows = sweep.summarize(points, root)
    self.assertLen(rows, 3)
    self.assertEqual((rows[1]['name'], rows[1]['attention.k'], rows[1]['test_accuracy']),
                     ('topk_k4_c16', 4, 0.25))
    self.assertEqual(rows[2]['validation_accuracy'], '')  # no results.json yet
    with open(os.path.join(root, 'summary.csv')) as f:
      table = list(csv.DictReader(f))
    self.assertEqual(table[0]['validation_accuracy'], '0.375')
    self.assertEqual(table[0]['attention.kind'], 'vanilla')
    with open(os.path.join(root, 'summary.md')) as f:
      lines = f.read().splitlines()
    self.assertLen(lines, 2 + len(points))
    self.assertIn('| topk_k4_c16 | topk | 4 | 16 | 0.3750 | 1.5000 | 0.2500 | 2.0000 |', lines)


if __name__ == '__main__':
  absltest.main()
