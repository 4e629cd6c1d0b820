"""From a run config (or a trained workdir) to what runs: task, model, optimizer, trainer.

Training, evaluation, the studies and the benchmarks all build through here, so a config means
the same model and trainer to each of them. A config's fields are listed in configs/common.py and
lra/README.md; `build` checks every value before any data is read or any device is used, and the
modules it calls take plain values (`lra.models.build_model` reads its own groups).
"""
import os
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from lra import data, models
from lra.checkpointing import UNUSABLE_DIR, RunCheckpoints
from lra.optim import make_optimizer, make_schedule
from lra.steps import Batch, Trainer, make_mesh
from lra.workdir import read_config

# Loop settings: ints >= 1. The task's, model's and optimizer's values are checked where they are
# built (`data.task_info`, `models.build_model`, `make_schedule`, `make_optimizer`).
_POSITIVE_INTS = ('batch_size', 'eval_batch_size', 'max_length', 'num_train_steps',
                  'eval_frequency', 'checkpoint_every', 'keep_checkpoints', 'log_every')


def _is_positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_config(config: ml_collections.ConfigDict) -> None:
  for field in _POSITIVE_INTS:
    if not _is_positive_int(config[field]):
      raise ValueError(f'config.{field}={config[field]!r}; expected an int >= 1.')
  if config.num_eval_steps != -1 and not _is_positive_int(config.num_eval_steps):
    raise ValueError(f'config.num_eval_steps={config.num_eval_steps!r}; expected -1 (whole '
                     'split) or an int >= 1.')
  if config.profile_steps != 0 and not _is_positive_int(config.profile_steps):
    raise ValueError(f'config.profile_steps={config.profile_steps!r}; expected 0 (off) or an int '
                     '>= 1.')
  if not isinstance(config.truncate, bool):
    raise ValueError(f'config.truncate={config.truncate!r}; expected True (cut inputs longer than '
                     'max_length, with a warning) or False (such an input is an error).')
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} does not divide among '
                     f'{jax.device_count()} devices')


class RunParts(NamedTuple):
  """What a config describes, short of data and devices: the task's `TaskInfo`, the model, the
  learning-rate schedule and the optimizer, with the config they came from."""

  config: ml_collections.ConfigDict
  info: data.TaskInfo
  model: Any
  schedule: optax.Schedule
  tx: optax.GradientTransformation


def build(config: ml_collections.ConfigDict) -> RunParts:
  """Checks every value of `config` by building what it describes, reading no data.

  Raises:
    ValueError: naming the first bad field.
  """
  _check_config(config)
  info = data.task_info(config.task, max_length=config.max_length, **config.task_options)
  model = models.build_model(config, info)
  schedule = make_schedule(config.schedule, config.learning_rate, config.warmup_steps,
                           config.num_train_steps)
  tx = make_optimizer(schedule, weight_decay=config.weight_decay,
                      grad_clip_norm=config.grad_clip_norm)
  return RunParts(config, info, model, schedule, tx)


def _example_batch(info: data.TaskInfo) -> Batch:
  tokens = np.zeros((1, info.max_length), np.int32)
  inputs = {'inputs1': tokens, 'inputs2': tokens} if info.dual else {'inputs': tokens}
  return {**inputs, 'targets': np.zeros((1,), np.int32)}


def make_trainer(parts: RunParts) -> Trainer:
  """The jitted steps of `parts`' model and optimizer on all devices, reading no data."""
  return Trainer(parts.model, parts.tx, parts.schedule, _example_batch(parts.info),
                 seed=parts.config.seed, mesh=make_mesh(),
                 eval_batch_size=parts.config.eval_batch_size)


def make_task(parts: RunParts) -> Any:
  """The task's input pipelines (`lra.data.Task`), this process's share of every batch."""
  config = parts.config
  return data.get_task(config.task, config.data_dir, batch_size=config.batch_size,
                       eval_batch_size=config.eval_batch_size, max_length=config.max_length,
                       truncate=config.truncate, seed=config.seed,
                       shard=grain.sharding.ShardByJaxProcess(),
                       **config.task_options)


def setup(config: ml_collections.ConfigDict) -> tuple[Any, Trainer]:
  """Everything a run of `config` needs: its task (`lra.data.Task`) and trainer.

  Every value is checked (`build`) before any data is read.
  """
  parts = build(config)
  trainer = make_trainer(parts)
  return make_task(parts), trainer


class Restored(NamedTuple):
  """A workdir's checkpoint restored into what a config builds (`setup`)."""

  config: ml_collections.ConfigDict
  task: Any
  trainer: Trainer
  checkpoint: str  # 'best' or 'latest': the one restored
  step: int
  state: train_state.TrainState


def restore(workdir: str, config: ml_collections.ConfigDict | None = None, *,
            checkpoint: str = 'best') -> Restored:
  """Restores a trained workdir's checkpoint without changing anything in the workdir.

  Reading a workdir never creates, moves or deletes anything there: it may be another user's, or
  one that a training process is writing.

  Args:
    workdir: a training workdir.
    config: the config to build; it may differ from the training config in its attention and FFN
      settings (all kinds share one parameter tree). Default: the workdir's config.json.
    checkpoint: 'best' (falls back to the latest when none exists) or 'latest'.
  Raises:
    FileNotFoundError: the workdir has no checkpoint, or no config.json when `config` is None
      (checked before anything is built).
    CheckpointError: the checkpoint cannot be restored (for 'latest': none of the kept ones).
  """
  if not any(os.path.isdir(os.path.join(workdir, name))
             for name in ('checkpoints', 'best_checkpoint')):
    raise FileNotFoundError(f'no checkpoint in --workdir {workdir!r}: evaluation needs a workdir '
                            'that train.py has trained in')
  config = read_config(workdir) if config is None else config
  task, trainer = setup(config)
  checkpoints = RunCheckpoints(workdir, keep=config.keep_checkpoints, read_only=True)
  try:
    if checkpoint == 'best' and checkpoints.best_step() is None:
      aside = checkpoints.set_aside_best_steps()
      why = (f'the best checkpoint of step(s) {aside} was set aside in {UNUSABLE_DIR}/ as '
             'unrestorable or as a state of steps a resumed run trained again' if aside else
             'no validation ran, or none had a finite loss')
      logging.warning('No best checkpoint in %s (%s); using the latest.', workdir, why)
      checkpoint = 'latest'
    step, state = checkpoints.restore(checkpoint, trainer.init_state())
  finally:
    checkpoints.close()
  return Restored(config, task, trainer, checkpoint, step, state)
