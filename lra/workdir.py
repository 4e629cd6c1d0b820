"""The files of a training workdir other than its checkpoints, metrics and lock.

A workdir holds:
  lock                   held by the training process (lra.workdir_lock): one run per workdir
  config.json            the config of the latest start
  configs/<step>.json    the config of every start, by the step it started from (0: fresh)
  metrics.jsonl          one JSON object per line: {"step", "split", <metric>: value, ...}
  tensorboard/           the same scalars as TensorBoard events (`<split>/<metric>`)
  checkpoints/<step>/    periodic orbax checkpoints (the last `keep_checkpoints`)
  best_checkpoint/<step>/  the best-validation-accuracy checkpoint
  unusable_checkpoints/  checkpoints set aside: unrestorable, or of a diverged state
  profile/               a `jax.profiler` trace of `profile_steps` steps, when asked for
  results.json           final metrics (see `lra.train.train_and_evaluate`)
  eval_results_<tag>.json  written by `lra.evaluate.evaluate` (`eval_tag`: settings and config
                         hash)
"""
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import logging


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} of a nested dict {'a': {'b': value}}."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{name}.'))
    else:
      flat[f'{prefix}{name}'] = value
  return flat


def config_history(workdir: str) -> list[dict[str, Any]]:
  """[{'step', 'config'}] of every start of a run in `workdir` (`configs/<step>.json`), by
  step."""
  folder = os.path.join(workdir, 'configs')
  steps = sorted(int(name[:-len('.json')]) for name in
                 (os.listdir(folder) if os.path.isdir(folder) else []) if name.endswith('.json'))
  history = []
  for step in steps:
    with open(os.path.join(folder, f'{step}.json')) as f:
      history.append({'step': step, 'config': json.load(f)})
  return history


def record_start(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Writes `config` to config.json and configs/<step>.json, and logs the fields in which it
  differs from the config of the previous start, so a changed config never erases what the
  earlier steps ran with."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2) + '\n'
  history = config_history(workdir)
  if history:
    before, after = _flatten(history[-1]['config']), _flatten(json.loads(text))
    changes = [f'{name}: {before.get(name)!r} -> {after.get(name)!r}'
               for name in sorted(before.keys() | after.keys())
               if before.get(name) != after.get(name)]
    if changes:
      logging.warning('Starting at step %d with a config that differs from the start at step %d '
                      '(configs/%d.json) in: %s', step, history[-1]['step'],
                      history[-1]['step'], '; '.join(changes))
  os.makedirs(os.path.join(workdir, 'configs'), exist_ok=True)
  for path in (os.path.join(workdir, 'config.json'),
               os.path.join(workdir, 'configs', f'{step}.json')):
    with open(path, 'w') as f:
      f.write(text)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the latest start in `workdir` (config.json).

  Raises:
    FileNotFoundError: the workdir has no config.json.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--workdir {workdir!r} has no config.json.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON from process 0 (every process computes the same)."""
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(value, f, indent=2)
      f.write('\n')
