"""Tests of evaluation mode (lra.evaluate): tags, files, checkpoint choice."""
import json
import os
import re
import shutil

import pytest
from conftest import read_json, smoke_config

from lra import evaluate
from lra.checkpointing import RunCheckpoints


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
                        evaluate.eval_tag(smoke_config('listops', '', 'vanilla', **overrides)))
  config = smoke_config('listops', '', 'topk,k=32')
  assert evaluate.eval_tag(config, 'latest').startswith('topk_k32_latest_')
  # Any other field (here max_length) gives another tag; the same config, the same tag.
  tags = {evaluate.eval_tag(smoke_config('listops', '', 'topk,k=32', **overrides))
          for overrides in ({}, {}, {'max_length': 24})}
  assert len(tags) == 2


@pytest.mark.slow
def test_evaluate_vanilla_checkpoint_with_exact_topk(listops_run):
  config, workdir, results = listops_run
  # k covers all 65 keys (64 tokens + CLS), so top-k must reproduce dense attention.
  topk_config = smoke_config('listops', config.data_dir, 'topk,k=128,smoke')
  evaluated = evaluate.evaluate(topk_config, workdir)
  assert evaluated['tag'].startswith('topk_k128_') and evaluated['step'] == results['best_step']
  assert read_json(os.path.join(workdir, f'eval_results_{evaluated["tag"]}.json')) == (
      json.loads(json.dumps(evaluated)))
  assert evaluated['config'] == topk_config.to_dict()
  for split in ('validation', 'test'):
    assert evaluated[split]['accuracy'] == results['best'][split]['accuracy']
    assert evaluated[split]['loss'] == pytest.approx(results['best'][split]['loss'], rel=1e-5)


@pytest.mark.slow
def test_evaluations_of_other_configs_keep_their_own_files(listops_run, tmp_path):
  config, source, _ = listops_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  short = smoke_config('listops', config.data_dir, max_length=24)
  evaluated = [evaluate.evaluate(c, workdir) for c in (config, short)]
  assert evaluated[0]['tag'] != evaluated[1]['tag']
  for results, max_length in zip(evaluated, (64, 24), strict=True):
    written = read_json(os.path.join(workdir, f'eval_results_{results["tag"]}.json'))
    assert written['config']['max_length'] == max_length
  assert evaluated[0]['test'] != evaluated[1]['test']  # expressions of up to 40 tokens, cut at 24


@pytest.mark.slow
def test_evaluate_says_why_it_falls_back_to_the_latest(listops_run, tmp_path, caplog):
  config, source, results = listops_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  checkpoints = RunCheckpoints(workdir, keep=2)
  checkpoints.set_aside([results['best_step']], 'best')
  checkpoints.close()
  evaluated = evaluate.evaluate(config, workdir)
  assert evaluated['checkpoint'] == 'latest' and evaluated['step'] == 4
  assert (f'No best checkpoint in {workdir} (the best checkpoint of step(s) '
          f'[{results["best_step"]}] was set aside in unusable_checkpoints/') in caplog.text
  assert 'no validation ran' not in caplog.text


def test_evaluate_without_checkpoint_is_an_error(listops_data, tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    evaluate.evaluate(smoke_config('listops', listops_data), str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing created
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    evaluate.evaluate(smoke_config('listops', listops_data), str(tmp_path / 'missing'))
  assert not os.path.exists(tmp_path / 'missing')
