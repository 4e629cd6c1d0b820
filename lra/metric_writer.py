"""Writes scalar metrics to `metrics.jsonl` and to TensorBoard event files in a workdir.

TensorBoard events come from tensorboardX, which writes them without TensorFlow (`clu.
metric_writers` imports TensorFlow and the `tensorboard` package).
"""

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import tensorboardX
from absl import logging


class MetricWriter:
  """Appends `{"step": int, "split": str, <name>: float, ...}` lines and TensorBoard scalars.

  TensorBoard tags are `<split>/<name>`, e.g. `validation/accuracy`. A NaN or infinite value is
  written as `null` to `metrics.jsonl` (strict JSON has no NaN) and as it is to TensorBoard. A
  writer created with `enabled=False` (processes other than 0 in a multi-process run) writes
  nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               keep: Callable[[dict[str, Any]], bool] = lambda record: True,
               purge_step: int | None = None):
    """`keep` selects the existing records to keep (a resumed run drops the ones it will write
    again); the others are removed before anything is appended. Event files cannot be edited, so
    a resumed run passes `purge_step` instead: TensorBoard then hides the events of steps >=
    `purge_step` in the earlier files, which would otherwise show twice."""
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(path):
      with open(path) as f:
        lines = [line for line in f if _keep_line(line, keep)]
      with open(path + '.tmp', 'w') as f:
        f.writelines(lines)
      os.replace(path + '.tmp', path)
    self._jsonl = open(path, 'a')
    self._summary = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'),
                                               purge_step=purge_step)

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    values = {name: float(value) for name, value in values.items()}
    strict = {name: value if math.isfinite(value) else None for name, value in values.items()}
    record = {'step': int(step), 'split': split, **strict}
    self._jsonl.write(json.dumps(record, allow_nan=False) + '\n')
    self._jsonl.flush()
    for name, value in values.items():
      self._summary.add_scalar(f'{split}/{name}', value, global_step=int(step))
    self._summary.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._summary.close()


def _keep_line(line: str, keep: Callable[[dict[str, Any]], bool]) -> bool:
  try:
    return keep(json.loads(line))
  except json.JSONDecodeError:  # the last line of a process killed mid-write
    logging.warning('Dropping an unreadable metrics.jsonl line: %r', line[:200])
    return False
