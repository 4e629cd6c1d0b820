r"""Trains byte-level language models and runs the studies on them.

  python -m studies.lm train
  python -m studies.lm value_aware --out studies/lm/results
  python -m studies.lm zero_shot --out studies/lm/results

Each command trains `configs/lm.py:<objective>,kernel=<kernel>` for each of `--kernels` into
`<runs>/<objective>_<kernel>` through `lra.train` (skipped when that workdir has finished; an
interrupted run resumes), on the text files under `--data_dir` matching `--pattern` (default: the
`email` package of the running Python's standard library, `**/*.py`), then evaluate the best
checkpoints on the first `--num_batches` validation batches (`train` stops after training).

- value_aware: token error rate and loss with each layer's attention output (and every layer's)
  replaced by its value-oblivious or value-aware r-sparse approximation, for r in `--r`; the top-r
  mass and relative output errors on `--max_queries` sampled queries per layer and batch.
  Writes value_aware.{csv,md,png}, value_aware_outputs.csv and top_r_mass.png.
- zero_shot: token error rate and loss with top-k attention (`--attention_k`) or top-k
  feed-forward layers (`--ffn_k`) swapped in without retraining. Writes zero_shot.{csv,md,png}.

Any `--config.<field>=<value>` but the corpus's (set by `--data_dir` and `--pattern`) is applied
to the training configs, so the same commands study bigger models and corpora on a GPU, e.g.
`--config.model.emb_dim=512 --config.max_length=1024 --config.num_train_steps=20000
--data_dir=CORPUS --pattern='**/*.txt'`.
"""
import argparse
import json
import os
import sys

import config_cli
from lra.data import text_folder
from studies import capture
from studies.lm import analysis, report, runs
from studies.tables import write_csv

OBJECTIVES = ('causal', 'masked')


def _ints(parser: argparse.ArgumentParser, name: str, text: str) -> list[int]:
  try:
    values = [int(value) for value in text.split(',')]
  except ValueError:
    values = [0]
  if min(values) < 1:
    parser.error(f'{name} must list integers >= 1, got {text!r}.')
  return values


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m studies.lm',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('study', choices=('train', 'value_aware', 'zero_shot'))
  parser.add_argument('--runs', default='runs/lm', help='folder of the trained workdirs')
  parser.add_argument('--kernels', default='softmax,relu,elu1',
                      help='attention kernels, one model each (topk.kernels.KERNELS)')
  parser.add_argument('--objective', choices=OBJECTIVES, default='causal')
  parser.add_argument('--data_dir', default=None,
                      help='folder of UTF-8 text files (default: the stdlib email package)')
  parser.add_argument('--pattern', default='**/*.py', help='glob of the files read')
  parser.add_argument('--num_batches', type=int, default=1, help='validation batches evaluated')
  parser.add_argument('--r', default='1,2,4,8', help='value_aware: budgets r')
  parser.add_argument('--max_queries', type=int, default=256,
                      help='value_aware: sampled (query, head) pairs per layer and batch for '
                      'the top-r mass and output errors')
  parser.add_argument('--query_chunk_size', type=int, default=4096,
                      help='value_aware: queries per value-aware solver chunk (bounds memory)')
  # Fewer starts, iterations and sweeps than the solver's defaults (4, 100, 2): a few times
  # cheaper, its errors are upper bounds slightly above theirs (studies/lm/README.md).
  parser.add_argument('--num_starts', type=int, default=2,
                      help='value_aware: greedy starts per query')
  parser.add_argument('--num_iters', type=int, default=30,
                      help='value_aware: projected-gradient iterations per support update')
  parser.add_argument('--num_sweeps', type=int, default=1, help='value_aware: swap sweeps')
  parser.add_argument('--attention_k', default='1,2,4,8,16,32,64',
                      help='zero_shot: keys kept per query')
  parser.add_argument('--ffn_k', default='4,8,16,32,64,128', help='zero_shot: hidden units kept')
  parser.add_argument('--out', default='studies/lm/results')
  return parser


def corpus_line(folder: str, pattern: str) -> str:
  """One line naming the corpus and its size in bytes (= tokens) per split."""
  corpus = text_folder.read_folder(folder, pattern, pattern_flag='--pattern')
  sizes = ', '.join(f'{name} {stop - start:,}' for name, (start, stop) in
                    text_folder.split_bounds(corpus.size).items())
  return f'Corpus: `{pattern}` under {folder}: {corpus.size:,} bytes (= tokens; {sizes}).'


def _final(workdir: str) -> str:
  """The validation and test token error and loss of a finished workdir's best checkpoint."""
  with open(os.path.join(workdir, 'results.json')) as f:
    best = json.load(f)['best']
  return ', '.join(f'{split} token error {1 - best[split]["accuracy"]:.3f}, loss '
                   f'{best[split]["loss"]:.3f}' for split in ('validation', 'test'))


def main(argv: list[str] | None = None) -> str:
  """Runs the study; returns the markdown it prints and writes."""
  argv, overrides = config_cli.split_overrides(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  args = parser.parse_args(argv)
  for name, least in (('num_batches', 1), ('max_queries', 1), ('query_chunk_size', 1),
                      ('num_starts', 1), ('num_iters', 1), ('num_sweeps', 0)):
    if getattr(args, name) < least:
      parser.error(f'--{name} must be >= {least}, got {getattr(args, name)}.')
  rs = _ints(parser, '--r', args.r)
  attention_ks = _ints(parser, '--attention_k', args.attention_k)
  ffn_ks = _ints(parser, '--ffn_k', args.ffn_k)
  for field, flag in (('data_dir', '--data_dir'), ('task_options.pattern', '--pattern')):
    if any(name == field for name, _ in overrides):
      parser.error(f'the corpus is set with {flag}, not --config.{field}.')
  folder = args.data_dir or runs.default_corpus()
  corpus = corpus_line(folder, args.pattern)  # before training: a corpus error comes first
  overrides = [('data_dir', folder), ('task_options.pattern', args.pattern), *overrides]
  try:
    workdirs = [runs.ensure_trained(args.runs, args.objective, kernel, overrides)
                for kernel in args.kernels.split(',')]
  except config_cli.ConfigError as error:
    parser.error(str(error))
  header = (f'{corpus}\nModels: `configs/lm.py:{args.objective}` '
            f'per kernel ({", ".join(args.kernels.split(","))}); overrides: '
            f'{" ".join(f"--config.{k}={v}" for k, v in overrides[2:]) or "none"}.')
  if args.study == 'train':
    text = '\n'.join([header, *(f'{path}: {_final(path)}' for path in workdirs)])
    print(text)
    return text
  loaded = [capture.load_run(path, args.num_batches) for path in workdirs]
  os.makedirs(args.out, exist_ok=True)

  if args.study == 'value_aware':
    solver = {name: getattr(args, name)
              for name in ('query_chunk_size', 'num_starts', 'num_iters', 'num_sweeps')}
    header += (f'\nValue-aware solver: greedy + swaps, {args.num_starts} start(s), '
               f'{args.num_iters} projected-gradient iterations, {args.num_sweeps} sweep(s); '
               f'top-r mass and output errors on {args.max_queries} sampled queries per layer.')
    rows, outputs = [], []
    for run in loaded:
      run_rows, run_outputs = analysis.value_aware_study(run, rs, args.max_queries, solver)
      rows += run_rows
      outputs += run_outputs
    write_csv(os.path.join(args.out, 'value_aware.csv'), rows)
    write_csv(os.path.join(args.out, 'value_aware_outputs.csv'), outputs)
    report.plot_value_aware(rows, outputs, args.out)
    table = report.value_aware_markdown(rows, outputs)
  else:
    rows = []
    for run in loaded:
      rows += analysis.zero_shot_study(run, attention_ks, ffn_ks)
    write_csv(os.path.join(args.out, 'zero_shot.csv'), rows)
    report.plot_zero_shot(rows, args.out)
    table = report.zero_shot_markdown(rows)
  header += (f'\nEvaluated per model: {rows[0]["tokens"]:,} tokens in {rows[0]["windows"]} '
             'validation windows; ± is one standard error over windows (paired for differences).')
  text = f'{header}\n\n{table}\n'
  with open(os.path.join(args.out, f'{args.study}.md'), 'w') as f:
    f.write(text)
  print(text)
  return text


if __name__ == '__main__':
  main()
