"""Expands a config's `get_sweep(arg)` into train.py runs and tabulates their results.

  python -m lra.sweep --config=configs/listops.py:topk                 # print the commands
  python -m lra.sweep --config=configs/listops.py:topk --run --workdir_root=runs/listops_topk

With --run the points train one after another (each a `train.py` subprocess, which resumes from
its workdir), then `summary.csv` and `summary.md` in --workdir_root list the validation and test
accuracy and loss of every point, read from each run's results.json.
"""
import csv
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

_TRAIN_PY = pathlib.Path(__file__).resolve().parents[1] / 'train.py'
_SPLITS = ('validation', 'test')
_METRICS = ('accuracy', 'loss')


def load_sweep(config_spec: str) -> list[dict[str, Any]]:
  """Calls `get_sweep(arg)` of the config file in `config_spec` ('path.py[:arg]')."""
  path, _, arg = config_spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config file {path!r} does not exist.')
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'--config file {path!r} defines no get_sweep(arg).')
  return module.get_sweep(arg or None)


def point_name(overrides: dict[str, Any]) -> str:
  """Short workdir name of a sweep point, e.g. 'topk_k64_c1024'."""
  abbreviations = {'attention.k': 'k', 'attention.query_chunk_size': 'c'}
  parts = [str(overrides.get('attention.kind', 'point'))]
  parts += [f'{abbreviations.get(key, key.replace(".", "-"))}{value}'
            for key, value in overrides.items() if key != 'attention.kind']
  return '_'.join(parts)


def train_flags(config_spec: str, overrides: dict[str, Any], workdir: str) -> list[str]:
  """The train.py flags of one sweep point."""
  return ([f'--config={config_spec}', f'--workdir={workdir}']
          + [f'--config.{key}={value}' for key, value in overrides.items()])


def summarize(points: Sequence[tuple[str, dict[str, Any]]], workdir_root: str
              ) -> list[dict[str, Any]]:
  """Writes summary.csv and summary.md under `workdir_root` and returns their rows.

  Args:
    points: (name, overrides) per sweep point; point `name` ran in `workdir_root/name`.
    workdir_root: parent of the per-point workdirs.

  Returns:
    One row per point: name, the overrides, then `<split>_<metric>` for validation/test
    accuracy/loss, empty where the point has no results.json.
  """
  keys = list(dict.fromkeys(key for _, overrides in points for key in overrides))
  rows = []
  for name, overrides in points:
    row = {'name': name, **{key: overrides.get(key, '') for key in keys}}
    path = os.path.join(workdir_root, name, 'results.json')
    results = {}
    if os.path.isfile(path):
      with open(path) as f:
        results = json.load(f)
    for split in _SPLITS:
      for metric in _METRICS:
        row[f'{split}_{metric}'] = results.get(split, {}).get(metric, '')
    rows.append(row)
  columns = list(rows[0]) if rows else ['name']
  with open(os.path.join(workdir_root, 'summary.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  cell = lambda v: f'{v:.4f}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(row[c]) for c in columns) + ' |' for row in rows]
  with open(os.path.join(workdir_root, 'summary.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return rows


def run_sweep(config_spec: str, workdir_root: str | None = None, run: bool = False) -> None:
  """Prints the train.py command of every point; with `run`, trains them and summarizes."""
  path, _, arg = config_spec.partition(':')
  workdir_root = workdir_root or os.path.join(
      'runs', '_'.join(filter(None, [pathlib.Path(path).stem] + arg.split(','))))
  points = [(point_name(overrides), overrides) for overrides in load_sweep(config_spec)]
  for name, overrides in points:
    train_args = train_flags(config_spec, overrides, os.path.join(workdir_root, name))
    print(shlex.join(['python', 'train.py'] + train_args), flush=True)
    if run:
      # A failed point shows as empty cells in the summary rather than ending the sweep.
      returncode = subprocess.run([sys.executable, str(_TRAIN_PY)] + train_args).returncode
      if returncode:
        print(f'point {name} failed with exit status {returncode}', file=sys.stderr)
  if run:
    summarize(points, workdir_root)
    print(f'wrote {workdir_root}/summary.csv and summary.md')


if __name__ == '__main__':
  # Flags live here so that importing this module (tests) never clashes with train.py's --config.
  _CONFIG = flags.DEFINE_string('config', None, 'Config file and arg, e.g. '
                                'configs/listops.py:topk.', required=True)
  _RUN = flags.DEFINE_bool('run', False, 'Train every point in sequence, then summarize.')
  _WORKDIR_ROOT = flags.DEFINE_string('workdir_root', None, 'Parent of the per-point workdirs; '
                                      'default runs/<config>_<arg>.')

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    run_sweep(_CONFIG.value, _WORKDIR_ROOT.value, _RUN.value)

  app.run(main)
