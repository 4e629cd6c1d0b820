"""Expands a config's `get_sweep(arg)` into train.py runs and tabulates their results.

  python sweep.py --config=configs/listops.py:topk --config.data_dir=DATA   # print the commands
  python sweep.py --config=configs/listops.py:topk --config.data_dir=DATA --run \
      --workdir_root=runs/listops_topk

`--config.<field>=<value>` overrides (data folder, steps, batch size, ...) go to every point,
before the point's own overrides; they are checked against the config before anything runs.
With --run the points train one after another (each a `train.py` subprocess, which resumes from
its workdir), then `summary.csv` and `summary.md` in --workdir_root list the validation and test
accuracy and loss of every point, read from each run's results.json.
"""
import csv
import json
import os
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from lra import config_loader

_TRAIN_PY = pathlib.Path(__file__).resolve().parent / 'train.py'
_SPLITS = ('validation', 'test')
_METRICS = ('accuracy', 'loss')


def point_name(overrides: dict[str, Any]) -> str:
  """Short workdir name of a sweep point, e.g. 'topk_k64_c1024'."""
  abbreviations = {'attention.k': 'k', 'attention.query_chunk_size': 'c'}
  parts = [str(overrides.get('attention.kind', 'point'))]
  parts += [f'{abbreviations.get(key, key.replace(".", "-"))}{value}'
            for key, value in overrides.items() if key != 'attention.kind']
  return '_'.join(parts)


def point_overrides(shared: config_loader.Overrides, point: dict[str, Any]
                    ) -> list[tuple[str, str]]:
  """The (field, value text) overrides of one point: the shared ones, then the point's own."""
  return list(shared) + [(key, str(value)) for key, value in point.items()]


def train_flags(config_spec: str, overrides: config_loader.Overrides, workdir: str) -> list[str]:
  """The train.py flags of one sweep point with `overrides` (see `point_overrides`)."""
  return ([f'--config={config_spec}', f'--workdir={workdir}']
          + [f'--config.{key}={value}' for key, value in overrides])


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


def run_sweep(config_spec: str, shared: config_loader.Overrides = (),
              workdir_root: str | None = None, run: bool = False) -> None:
  """Prints the train.py command of every point; with `run`, trains them and summarizes.

  Raises:
    config_loader.ConfigError: the config, an override or a point does not load.
  """
  path, _, arg = config_spec.partition(':')
  workdir_root = workdir_root or os.path.join(
      'runs', '_'.join(filter(None, [pathlib.Path(path).stem] + arg.split(','))))
  points = [(point_name(point), point) for point in config_loader.get_sweep(config_spec)]
  for _, point in points:  # every command must parse before the first one runs
    config_loader.get_config(config_spec, point_overrides(shared, point))
  for name, point in points:
    train_args = train_flags(config_spec, point_overrides(shared, point),
                             os.path.join(workdir_root, name))
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
                                'configs/listops.py:topk; --config.<field>=<value> overrides go '
                                'to every point.', required=True)
  _RUN = flags.DEFINE_bool('run', False, 'Train every point in sequence, then summarize.')
  _WORKDIR_ROOT = flags.DEFINE_string('workdir_root', None, 'Parent of the per-point workdirs; '
                                      'default runs/<config>_<arg>.')

  def main(argv: list[str], shared: list[tuple[str, str]]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    run_sweep(_CONFIG.value, shared, _WORKDIR_ROOT.value, _RUN.value)

  config_loader.run(main)
