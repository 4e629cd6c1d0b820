"""Tests of the ListOps generator (lra.data.listops_gen), checked by an independent evaluator."""
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver

from lra.data import get_task, listops, listops_gen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate_source(source: str) -> tuple[int, int]:
  """(value, token count) of a ListOps string, parsed with a stack, ignoring parentheses."""
  stack, num_tokens = [[]], 0
  for token in source.replace('(', ' ').replace(')', ' ').split():
    num_tokens += 1
    if token.startswith('['):
      stack.append([token])
    elif token == ']':
      operator, *args = stack.pop()
      value = {'[MIN': min, '[MAX': max, '[SM': lambda a: sum(a) % 10,
               '[MED': lambda a: int(np.median(a))}[operator](args)
      stack[-1].append(value)
    else:
      stack[-1].append(int(token))
  assert len(stack) == 1 and len(stack[0]) == 1, source
  return stack[0][0], num_tokens


def test_labels_and_lengths():
  examples = listops_gen.generate(3, 300, min_length=10, max_length=60, max_depth=6, max_args=5)
  assert len({source for source, _ in examples}) == 300
  operators = set()
  for source, label in examples:
    value, num_tokens = evaluate_source(source)
    assert label == value and 10 < num_tokens < 60
    assert source.count('(') == source.count(')')
    operators.update(t for t in source.split() if t.startswith('['))
  assert operators == {'[MIN', '[MAX', '[MED', '[SM'}


def test_depth_and_arity_limits():
  for source, _ in listops_gen.generate(0, 200, min_length=4, max_length=200, max_depth=3,
                                        max_args=3):
    depth = max_depth = 0
    for token in source.split():
      depth += token.startswith('[') - (token == ']')
      max_depth = max(max_depth, depth)
    assert max_depth <= 2  # operators at depths 1..max_depth-1; leaves fill depth max_depth
    tokens = source.replace('(', ' ').replace(')', ' ').split()
    assert all(t.startswith('[') or t == ']' or 0 <= int(t) <= 9 for t in tokens)


def test_median_truncates_mean_of_middle_pair():
  tree = ((((('[MED', 1), 2), 7), 8), ']')
  assert listops_gen.evaluate(tree) == int(statistics.median([1, 2, 7, 8])) == 4
  assert listops_gen.to_string(tree) == '( ( ( ( ( [MED 1 ) 2 ) 7 ) 8 ) ] )'


def test_seeded_and_reproducible():
  make = lambda seed: listops_gen.generate(seed, 50, min_length=5, max_length=40)
  assert make(1) == make(1)
  assert make(1) != make(2)


def test_bad_limits():
  with pytest.raises(ValueError, match='min_length < max_length - 1'):
    listops_gen.generate(0, 5, min_length=10, max_length=11)
  with pytest.raises(ValueError, match='num_examples >= 0, got -1'):
    listops_gen.generate(0, -1)
  with pytest.raises(ValueError, match='found only'):  # fewer than 20 distinct 1-token trees
    listops_gen.generate(0, 20, min_length=0, max_length=2)


@pytest.mark.slow
def test_command_line_writes_files_that_get_task_reads(tmp_path):
  subprocess.run([sys.executable, '-m', 'lra.data.listops_gen', f'--output_dir={tmp_path}',
                  '--seed=5', '--num_train=40', '--num_valid=6', '--num_test=4',
                  '--min_length=5', '--max_length=50'], cwd=REPO, check=True, capture_output=True)
  for name in ('train', 'val', 'test'):
    with open(os.path.join(tmp_path, 'listops-1000', f'basic_{name}.tsv')) as f:
      assert f.readline() == 'Source\tTarget\n'
  task = get_task('listops', str(tmp_path), batch_size=8, eval_batch_size=4, max_length=50)
  assert [len(b['targets']) for b in task.validation()] == [4, 2]
  assert sum(len(b['targets']) for b in task.test()) == 4
  batch = next(iter(task.train()))
  assert batch['inputs'].shape == (8, 50) and batch['inputs'].max() < task.info.vocab_size


def run_main(*args: str) -> None:
  """Runs the command line's `main` in this process with `args` parsed as its flags."""
  with flagsaver.flagsaver():
    listops_gen.main(flags.FLAGS(['listops_gen', *args]))


def test_splits_are_disjoint_and_parse(tmp_path):
  """Bare digits (min_length=0) included: every row the generator writes is one the reader takes."""
  run_main(f'--output_dir={tmp_path}', '--num_train=60', '--num_valid=25', '--num_test=15',
           '--min_length=0', '--max_length=12')
  sources = {}
  for split, filename in listops.FILES.items():
    path = os.path.join(tmp_path, listops.DIRNAME, filename)
    with open(path, encoding='utf-8') as f:
      sources[split] = [line.split('\t')[0] for line in f.read().splitlines()[1:]]
    assert len(listops.read_tsv(path)[2]) == len(sources[split])
  assert {split: len(rows) for split, rows in sources.items()} == {
      'train': 60, 'validation': 25, 'test': 15}
  assert len(set().union(*sources.values())) == 100
  assert any(source.isdigit() for rows in sources.values() for source in rows)


@pytest.mark.parametrize('args, match', [
    (['--num_train=-5', '--num_valid=10', '--num_test=10'],
     r"every split needs at least one example, got \{'train': -5\}"),
    (['--num_train=3', '--num_valid=0', '--num_test=0'], r"\{'validation': 0, 'test': 0\}"),
    (['--min_length=50', '--max_length=20'], 'min_length < max_length - 1, got 50, 20'),
    (['--min_length=-1'], '0 <= min_length'),
    (['--max_depth=0'], 'max_depth >= 1'),
    (['--max_args=1'], 'max_args >= 2'),
    (['extra'], "Unexpected arguments: \\['extra'\\]"),
])
def test_command_line_rejects_bad_values_before_writing(tmp_path, args, match):
  with pytest.raises(app.UsageError, match=match):
    run_main(f'--output_dir={tmp_path}', '--min_length=5', '--max_length=40', *args)
  assert not os.listdir(tmp_path)


def test_command_line_needs_output_dir():
  with pytest.raises(app.UsageError, match='--output_dir is required'):
    run_main('--num_train=1', '--num_valid=1', '--num_test=1', '--min_length=0', '--max_length=9')

