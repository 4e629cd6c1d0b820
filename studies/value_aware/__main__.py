"""Runs the value-aware study on trained runs and reports it.

For each trained run (a `train.py` workdir) this collects every attention layer's per-head
queries, keys and values on validation batches and reports, per layer and per r:
- the relative output error `||o - o~|| / ||o||` of top-r attention (value-oblivious, renormalised
  and not) and of the greedy value-aware approximation, plus the mass of the top-r weights
  (kernel skewness);
- the validation accuracy, and the agreement with the unmodified model's predictions, when that
  layer's attention output (or every layer's, `layer=all`) is replaced by each approximation.
Runs trained with different kernels (`config.attention.kernel`) are compared side by side.

  python -m studies.value_aware --workdir runs/listops_softmax --workdir runs/listops_relu \
    --r 1,2,4,8,16,32 --accuracy_r 1,4 --num_batches 4 --out studies/value_aware/out

The downstream-accuracy part solves the value-aware problem for every query of every layer (the
error table samples `--max_queries`), so on CPU keep `--accuracy_r` short; full LRA sizes need a
GPU.

Smoke run on a random-init model and random tokens (no data or checkpoint needed):

  python -m studies.value_aware --random_init --config configs/listops.py:vanilla,smoke \
    --kernels softmax,relu --synthetic --r 1,2,4 --num_batches 1 --out /tmp/value_aware

Writes errors.csv, accuracy.csv, errors.png and accuracy.png under --out and prints markdown.
"""
import argparse
import functools
import os

import config_cli
from studies import capture
from studies.tables import write_csv
from studies.value_aware import analysis, report


def _budgets(parser: argparse.ArgumentParser, name: str, text: str) -> list[int]:
  try:
    budgets = [int(r) for r in text.split(',')]
  except ValueError:
    budgets = [0]
  if min(budgets) < 1:
    parser.error(f'{name} must list integers >= 1, got {text!r}.')
  return budgets


def main(argv: list[str] | None = None) -> str:
  """Runs the study; returns the markdown it prints."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', action='append', default=[], help='trained run (repeatable)')
  parser.add_argument('--random_init', action='store_true', help='study random-init models')
  parser.add_argument('--config', help='config spec for --random_init, e.g. '
                      'configs/listops.py:vanilla,smoke')
  parser.add_argument('--kernels', default='softmax',
                      help='--random_init: one model per kernel, comma-separated')
  parser.add_argument('--synthetic', action='store_true',
                      help='--random_init: random tokens instead of the validation split')
  parser.add_argument('--r', default='1,2,4,8,16,32', help='comma-separated budgets')
  parser.add_argument('--accuracy_r', help='comma-separated budgets for the accuracy table '
                      '(default: --r)')
  parser.add_argument('--num_batches', type=int, default=4, help='validation batches per run')
  parser.add_argument('--max_queries', type=int, default=1024,
                      help='(query, head) pairs per layer and batch for the error table')
  parser.add_argument('--query_chunk_size', type=int, default=1024,
                      help='queries per value-aware solver chunk (bounds memory)')
  parser.add_argument('--out', default='studies/value_aware/out')
  args = parser.parse_args(argv)
  rs = _budgets(parser, '--r', args.r)
  accuracy_rs = rs if args.accuracy_r is None else _budgets(parser, '--accuracy_r',
                                                             args.accuracy_r)
  if args.num_batches < 1:
    parser.error(f'--num_batches must be >= 1, got {args.num_batches}.')
  if args.random_init == bool(args.workdir):
    parser.error('give either --workdir (one or more) or --random_init with --config.')
  if args.random_init:
    if not args.config:
      parser.error('--random_init needs --config, e.g. configs/listops.py:vanilla,smoke.')
    try:
      config = config_cli.get_config(args.config)
    except config_cli.ConfigError as error:
      parser.error(str(error))
    runs = [functools.partial(capture.random_run, config, kernel, args.num_batches,
                              args.synthetic) for kernel in args.kernels.split(',')]
  else:
    runs = [functools.partial(capture.load_run, workdir, args.num_batches)
            for workdir in args.workdir]
  errors, accuracies = [], []
  for make_run in runs:
    run_errors, run_accuracies = analysis.study_run(make_run(), rs, args.max_queries,
                                                    {'query_chunk_size': args.query_chunk_size},
                                                    accuracy_rs)
    errors += run_errors
    accuracies += run_accuracies
  os.makedirs(args.out, exist_ok=True)
  write_csv(os.path.join(args.out, 'errors.csv'), errors)
  write_csv(os.path.join(args.out, 'accuracy.csv'), accuracies)
  report.plot(errors, accuracies, args.out)
  table = report.markdown(errors, accuracies)
  print(table)
  return table


if __name__ == '__main__':
  main()
