r"""`make demo`: top-k attention as a drop-in for dense attention on a small ListOps, on CPU.

Generates a short-sequence ListOps set with `lra.data.listops_gen` (skipped when present), trains a
vanilla and a top-k (k=8) Transformer with the ListOps config plus small-model overrides, evaluates
the vanilla checkpoint zero-shot with top-k attention, and prints validation/test accuracy next to
the majority-class rate of the test split. Everything goes under ./demo_runs; rerunning reuses the
data and the finished runs (training resumes from their checkpoints).

  python demo.py [--root=demo_runs] [--steps=1500]
"""

import collections
import logging as std_logging
import math
import os
import time
from collections.abc import Sequence

import ml_collections
from absl import app, flags, logging

from configs import listops as listops_config
from lra import evaluate, train
from lra.data import get_task, listops, listops_gen

_ROOT = flags.DEFINE_string('root', 'demo_runs', 'Folder for the data and the run workdirs.')
_STEPS = flags.DEFINE_integer('steps', 1500, 'Training steps per model.')

DEMO_K = 8
# Short, shallow expressions: learnable by a small model in a few CPU-minutes.
_DATA = dict(seed=0, num_train=6000, num_valid=500, num_test=500, max_depth=4, max_args=5,
             min_length=10, max_length=60)
_MAX_LENGTH = 64  # tokens after padding; generated expressions are shorter than 60


def demo_config(attention: str, data_dir: str, steps: int) -> ml_collections.ConfigDict:
  """The ListOps config shrunk to a ~80K-parameter model that trains in minutes on 2 cores."""
  config = listops_config.get_config(attention)
  config.update(data_dir=data_dir, max_length=_MAX_LENGTH, num_train_steps=steps,
                eval_frequency=steps // 5, checkpoint_every=steps // 5, log_every=steps // 10,
                batch_size=32, eval_batch_size=100, num_eval_steps=-1,
                # A short run: a brief warmup and cosine decay instead of LRA's rsqrt schedule,
                # whose 1000 warmup steps would take most of the run.
                schedule='cosine', learning_rate=2e-3, warmup_steps=100, weight_decay=0.01)
  config.model.update(emb_dim=64, qkv_dim=64, mlp_dim=128, num_heads=4, num_layers=2)
  config.attention.update(k=DEMO_K, query_chunk_size=_MAX_LENGTH + 1)
  return config


def ensure_data(data_dir: str) -> None:
  if all(os.path.exists(os.path.join(data_dir, listops.DIRNAME, name))
         for name in listops.FILES.values()):
    print(f'Using the ListOps data in {data_dir}.')
    return
  print(f'Generating a short-sequence ListOps set in {data_dir} ...')
  listops_gen.write_splits(data_dir, **_DATA)


def majority_rate(data_dir: str) -> tuple[float, int]:
  """Accuracy of always predicting the most frequent test label, and the test split's size."""
  task = get_task('listops', data_dir, batch_size=32, max_length=_MAX_LENGTH)
  counts = collections.Counter(int(label) for batch in task.test()
                               for label in batch['targets'])
  return max(counts.values()) / sum(counts.values()), sum(counts.values())


def _only_our_logs(record: std_logging.LogRecord) -> bool:
  # Progress lines of lra/ only; orbax logs every checkpoint operation at INFO.
  return f'{os.sep}lra{os.sep}' in record.pathname or record.levelno >= std_logging.WARNING


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.addFilter(_only_our_logs)
  start = time.time()
  root = _ROOT.value
  data_dir = os.path.join(root, 'data')
  ensure_data(data_dir)
  rows = []
  for attention in ('vanilla', 'topk'):
    config = demo_config(attention, data_dir, _STEPS.value)
    workdir = os.path.join(root, attention)
    print(f'Training {attention} attention for {config.num_train_steps} steps in {workdir} ...')
    results = train.train_and_evaluate(config, workdir)
    label = 'vanilla' if attention == 'vanilla' else f'top-k (k={DEMO_K})'
    rows.append((f'{label}, trained', results['num_params'], results['best']))
    if attention == 'vanilla':
      vanilla_params = results['num_params']
      swapped = demo_config('topk', data_dir, _STEPS.value)
      evaluated = evaluate.evaluate(swapped, workdir)
      rows.append((f'vanilla checkpoint, top-k (k={DEMO_K}) zero-shot', vanilla_params,
                   evaluated))
  majority, num_test = majority_rate(data_dir)
  print(f'\nListOps, sequences < 60 tokens padded to {_MAX_LENGTH}; best-validation checkpoints.')
  print(f'{"model":45} {"params":>8} {"val acc":>8} {"test acc":>8}')
  for name, params, metrics in rows:
    print(f'{name:45} {params:>8,d} {metrics["validation"]["accuracy"]:>8.1%} '
          f'{metrics["test"]["accuracy"]:>8.1%}')
  print(f'{"majority class (test split)":45} {"":>8} {"":>8} {majority:>8.1%}')
  print(f'{"chance (10 classes)":45} {"":>8} {"":>8} {0.1:>8.1%}')
  # Training amplifies the last bit of the CPU's vector arithmetic (AVX-512 or not rounds
  # differently), so another machine prints other figures, about this far apart.
  mean = sum(metrics['test']['accuracy'] for _, _, metrics in rows) / len(rows)
  stderr = math.sqrt(mean * (1 - mean) / num_test)
  print(f'One standard error of an accuracy here: {stderr:.1%} ({num_test:,d} test examples); '
        'another CPU rounds differently and moves figures by about that much.')
  print(f'Wall time: {time.time() - start:.0f} s')


if __name__ == '__main__':
  app.run(main)
