"""Tests of the studies on language models (studies.lm): analysis, and the commands on a real
corpus (the smoke LM configs of tests/test_lm.py)."""
import csv
import os

import jax
import numpy as np
import pytest
from conftest import STDLIB_CORPUS, lm_config

from lra import data, models
from studies import approximations, capture
from studies.lm import analysis, runs
from studies.lm.__main__ import main

# Compilation dominates these tiny models (tests/conftest.py).
pytestmark = pytest.mark.usefixtures('fast_compilation')


def test_ratio_standard_error():
  numerator, denominator = np.array([1.0, 3.0, 2.0, 6.0]), np.full(4, 8.0)
  value, se = analysis.ratio(numerator, denominator)
  per_window = numerator / denominator
  assert value == pytest.approx(per_window.mean())
  assert se == pytest.approx(per_window.std(ddof=1) / 2.0)


@pytest.mark.parametrize('kernel', ['softmax', 'relu'])
def test_replacement_with_every_key_is_the_unmodified_model(kernel):
  config = lm_config('causal,smoke', max_length=8, **{'attention.kernel': kernel})
  info = data.task_info('lm', max_length=8, **config.task_options)
  model = models.build_model(config, info)
  inputs = jax.random.randint(jax.random.key(0), (2, 8), 1, 257)
  params = model.init(jax.random.key(1), {'inputs': inputs}, train=False)['params']
  calls = capture.capture_attention(model, params, {'inputs': inputs})
  assert [call.mask.shape[-2:] for call in calls] == [(8, 8)] * 2
  np.testing.assert_array_equal(np.broadcast_to(calls[0].mask, (2, 2, 8, 8))[1, 0],
                                np.tril(np.ones((8, 8), bool)))
  logits = model.apply({'params': params}, {'inputs': inputs}, train=False)
  for method in analysis.METHODS:
    replaced = capture.apply_replaced(model, params, {'inputs': inputs},
                                      approximations.replacement(kernel, method, 8, 'all'))
    np.testing.assert_allclose(replaced, logits, atol=2e-4)
  # And a small budget does change the model.
  replaced = capture.apply_replaced(model, params, {'inputs': inputs},
                                    approximations.replacement(kernel, 'oblivious', 1, 'all'))
  assert not np.allclose(replaced, logits, atol=2e-4)


@pytest.mark.slow
def test_study_commands_write_their_outputs(tmp_path):
  common = ['--runs', str(tmp_path / 'runs'), '--kernels', 'softmax', '--data_dir', STDLIB_CORPUS,
            '--pattern', '*.py', '--out', str(tmp_path / 'out'), '--config.num_train_steps=4',
            '--config.max_length=32', '--config.batch_size=4', '--config.eval_batch_size=4',
            '--config.model.emb_dim=16', '--config.model.qkv_dim=16',
            '--config.model.mlp_dim=32', '--config.model.num_heads=2']
  table = main(['zero_shot', *common, '--attention_k', '4,32', '--ffn_k', '32'])
  lines = table.splitlines()
  assert lines[0].startswith('Corpus: `*.py` under ') and 'bytes (= tokens; train ' in lines[0]
  assert len([line for line in lines if line.startswith('| softmax |')]) == 4
  with open(tmp_path / 'out' / 'zero_shot.csv') as f:
    rows = {(row['swap'], row['k']): row for row in csv.DictReader(f)}
  assert rows['none', '0']['tokens'] == str(4 * 32)  # one batch of 4 windows of 32 bytes
  # Keeping all 32 keys or all 32 hidden units is the dense model.
  for key in (('attention', '32'), ('ffn', '32')):
    assert float(rows[key]['increase_error']) == 0.0
    assert float(rows[key]['increase_loss']) == pytest.approx(0.0, abs=1e-5)
  table = main(['value_aware', *common, '--r', '2', '--num_starts', '1', '--num_iters', '5'])
  assert len([line for line in table.splitlines() if line.startswith('| softmax |')]) == 3
  for name in ('zero_shot.csv', 'zero_shot.png', 'zero_shot.md', 'value_aware.csv',
               'value_aware_outputs.csv', 'value_aware.png', 'top_r_mass.png', 'value_aware.md'):
    assert os.path.getsize(tmp_path / 'out' / name) > 0
  assert runs.workdir(str(tmp_path / 'runs'), 'causal', 'softmax').endswith('causal_softmax')


def test_study_names_its_own_corpus_flags(tmp_path, capsys):
  common = ['train', '--runs', str(tmp_path), '--data_dir', STDLIB_CORPUS]
  with pytest.raises(ValueError, match=r"matches '\*\.txt'; choose the files with --pattern "):
    main([*common, '--pattern', '*.txt'])
  with pytest.raises(SystemExit):
    main([*common, '--config.task_options.pattern=*.py'])
  assert 'set with --pattern, not --config.task_options.pattern' in capsys.readouterr().err
  assert not os.listdir(tmp_path)  # nothing trained
