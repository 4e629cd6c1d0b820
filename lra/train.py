"""Training and evaluation loop for LRA classification.

One trainer for every task and attention kind. Data parallelism uses `jax.jit` over a 1-D
('data',) mesh of all devices: batches are sharded on their first axis, the train state is
replicated. This module is the marked edge where a `ConfigDict` is read (its fields are listed in
configs/common.py and lra/README.md); `build` checks every value before any data is read, and
everything below `train_and_evaluate` / `evaluate` takes plain values.

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
  results.json           final metrics (see `train_and_evaluate`)
  eval_results_<tag>.json  written by `evaluate` (`eval_tag`: settings and config hash)

Resuming: `train_and_evaluate` on a workdir with checkpoints continues from the latest usable one.
The checkpoint holds the train stream's position (its grain iterator state), which is restored in
constant time, and the dropout key is the seed's key folded with the step, so an interrupted and
resumed run reproduces the uninterrupted one; metric records past the resumed step are dropped, and
the elapsed wall time and the train metrics of the steps since the last train record carry over in
the checkpoint (so a record spanning the resume averages the same steps as without it).

Input: each process reads only its own share of every global batch (`grain.sharding.
ShardByJaxProcess`); the shares of all processes make up the global array.
"""

import contextlib
import datetime
import functools
import hashlib
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lra import data, models
from lra.checkpointing import UNUSABLE_DIR, CheckpointError, RunCheckpoints, is_finite
from lra.metric_writer import MetricWriter
from lra.optim import make_optimizer, make_schedule
from lra.workdir_lock import WorkdirLock

Batch = dict[str, np.ndarray]
Metrics = dict[str, float]


# ----------------------------------------------------------------------------- devices


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D ('data',) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def shard_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """Places this process's share of a global batch (every array `[B / process_count, ...]`) on
  the mesh: the global arrays `[B, ...]` are split along B, each process's devices holding its
  share.

  Raises:
    ValueError: B is not divisible by the number of devices.
  """
  sharding = NamedSharding(mesh, P('data'))
  out = {}
  for name, array in batch.items():
    shape = (array.shape[0] * jax.process_count(), *array.shape[1:])
    if shape[0] % mesh.size:
      raise ValueError(f'batch of {shape[0]} examples ({name!r}) does not divide among '
                       f'{mesh.size} devices; choose a multiple of {mesh.size}')
    out[name] = jax.make_array_from_process_local_data(sharding, array, shape)
  return out


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-target softmax cross-entropy `[B, ...]` of float logits `[B, ..., C]`, int targets
  `[B, ...]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def target_terms(logits: jax.Array, batch: Mapping[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cross-entropy, correctness and weight of each target, all `[B, ...]` as `batch['targets']`.

  A classification batch has one target per example (`[B]`, weight 1); a language-model batch
  one per position (`[B, L]`) and `target_weights` saying which are scored (masked LM scores the
  masked positions only). Metrics are weighted means over targets, so a language model's
  'accuracy' is its token accuracy.
  """
  targets = batch['targets']
  weights = batch.get('target_weights', jnp.ones(targets.shape, jnp.int32)).astype(jnp.float32)
  return (cross_entropy(logits, targets), (jnp.argmax(logits, -1) == targets).astype(jnp.float32),
          weights)


def train_step(state: train_state.TrainState, batch: Mapping[str, jax.Array], *,
               dropout_key: jax.Array, schedule: optax.Schedule
               ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimizer update on a batch; returns the new state and scalar metrics of the batch.

  The dropout key is `dropout_key` folded with the step, so a resumed run draws the same masks.
  The metric 'finite' says whether the new state (parameters and optimizer moments) is free of
  NaN and infinity: the loss only shows a diverged update one step later. 'scored' is the weight
  of the batch's targets (a masked-LM batch scores a varying number of tokens), so means over
  steps can weight each target once.
  """
  step_key = jax.random.fold_in(dropout_key, state.step)

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, batch, train=True, rngs={'dropout': step_key})
    loss, correct, weights = target_terms(logits, batch)
    total = jnp.maximum(weights.sum(), 1.0)
    return (loss * weights).sum() / total, ((correct * weights).sum() / total, weights.sum())

  (loss, (accuracy, scored)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'accuracy': accuracy, 'scored': scored,
             'learning_rate': schedule(state.step)}
  new_state = state.apply_gradients(grads=grads)
  return new_state, {**metrics, 'finite': is_finite(new_state)}


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, apply_fn: Callable[..., jax.Array]
              ) -> dict[str, jax.Array]:
  """Sums of loss, correct predictions and weight over the targets of a padded batch.

  `batch['weights']` `[B]` is 1 for real examples and 0 for padding rows; padding rows (and
  unscored targets, see `target_terms`) are excluded with `where`, not multiplied, so a NaN on
  an all-padding row cannot leak in.
  """
  logits = apply_fn({'params': params}, batch, train=False)
  loss, correct, weights = target_terms(logits, batch)
  real = batch['weights'].reshape(weights.shape[:1] + (1,) * (weights.ndim - 1)) > 0
  scored = real & (weights > 0)
  return {'loss': jnp.where(scored, loss * weights, 0.0).sum(),
          'correct': jnp.where(scored, correct * weights, 0.0).sum(),
          'count': jnp.where(scored, weights, 0.0).sum()}


def pad_batch(batch: Batch, size: int) -> Batch:
  """Pads every array of `batch` with zero rows to `size` and adds float `weights` `[size]`."""
  rows = next(iter(batch.values())).shape[0]
  if rows > size:
    raise ValueError(f'eval batch has {rows} examples, more than the padded size {size}')
  padded = {name: np.concatenate([a, np.zeros((size - rows, *a.shape[1:]), a.dtype)])
            for name, a in batch.items()}
  padded['weights'] = (np.arange(size) < rows).astype(np.float32)
  return padded


class Trainer:
  """The jitted steps of one model on one mesh, and evaluation over a dataset.

  Attributes:
    mesh: the device mesh.
    state_sharding: sharding tree of the train state (replicated).
  """

  def __init__(self, model: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
               example_batch: Batch, *, seed: int, mesh: Mesh, eval_batch_size: int):
    self.mesh = mesh
    self._model = model
    self._tx = tx
    self._example = example_batch
    init_key, self._dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    self._init_key = init_key
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(self._init, init_key)
    self.state_sharding = jax.tree.map(lambda _: replicated, abstract)
    batch_sharding = NamedSharding(mesh, P('data'))
    self._train_step = jax.jit(
        functools.partial(train_step, dropout_key=self._dropout_key, schedule=schedule),
        in_shardings=(self.state_sharding, batch_sharding),
        out_shardings=(self.state_sharding, replicated), donate_argnums=0)
    self._eval_step = jax.jit(
        functools.partial(eval_step, apply_fn=model.apply),
        in_shardings=(self.state_sharding.params, batch_sharding), out_shardings=replicated)
    # Every eval batch is padded to one size that the devices divide, so it compiles once; each
    # process pads its share.
    self._eval_size = math.ceil(eval_batch_size / mesh.size) * mesh.size // jax.process_count()

  def _init(self, key: jax.Array) -> train_state.TrainState:
    variables = self._model.init({'params': key, 'dropout': key}, self._example, train=False)
    return train_state.TrainState.create(apply_fn=self._model.apply, params=variables['params'],
                                         tx=self._tx)

  def init_state(self) -> train_state.TrainState:
    """A freshly initialised, replicated train state (same seed -> same parameters)."""
    return jax.jit(self._init, out_shardings=self.state_sharding)(self._init_key)

  def step(self, state: train_state.TrainState, batch: Batch
           ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """Dispatches one train step; the returned metrics are still on device."""
    return self._train_step(state, shard_batch(batch, self.mesh))

  def lower_step(self, state: Any, batch: Batch) -> jax.stages.Lowered:
    """The train step lowered for `state` (arrays or `jax.ShapeDtypeStruct`s) and `batch`.

    `.compile().memory_analysis()` of the result is the device memory a training step needs.
    """
    return self._train_step.lower(state, shard_batch(batch, self.mesh))

  def evaluate(self, params: Any, batches: Iterable[Batch]) -> Metrics:
    """Exact mean loss and accuracy over all targets of `batches` (examples, or tokens; this
    process's shares)."""
    totals = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
    for batch in batches:
      sums = self._eval_step(params, shard_batch(pad_batch(batch, self._eval_size), self.mesh))
      for name, value in jax.device_get(sums).items():
        totals[name] += float(value)
    if totals['count'] == 0:
      raise ValueError('evaluation split is empty')
    return {'loss': totals['loss'] / totals['count'],
            'accuracy': totals['correct'] / totals['count']}


def num_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- config edge


def _example_batch(info: data.TaskInfo) -> Batch:
  tokens = np.zeros((1, info.max_length), np.int32)
  inputs = {'inputs1': tokens, 'inputs2': tokens} if info.dual else {'inputs': tokens}
  return {**inputs, 'targets': np.zeros((1,), np.int32)}


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
  """What a config describes, short of data: the task's `TaskInfo`, model, schedule, optimizer."""

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
  return RunParts(info, model, schedule, tx)


def make_trainer(config: ml_collections.ConfigDict) -> Trainer:
  """The trainer of the model and optimizer a config describes (`build`), reading no data."""
  parts = build(config)
  return Trainer(parts.model, parts.tx, parts.schedule, _example_batch(parts.info),
                 seed=config.seed, mesh=make_mesh(), eval_batch_size=config.eval_batch_size)


def setup(config: ml_collections.ConfigDict) -> tuple[Any, Trainer]:
  """Builds the task, model, optimizer and trainer a config describes.

  Every value is checked (`build`) before any data is read.
  """
  trainer = make_trainer(config)
  task = data.get_task(config.task, config.data_dir, batch_size=config.batch_size,
                       eval_batch_size=config.eval_batch_size, max_length=config.max_length,
                       truncate=config.truncate, seed=config.seed,
                       shard=grain.sharding.ShardByJaxProcess(),
                       **config.task_options)
  return task, trainer


def _limit(batches: Iterable[Batch], num_batches: int) -> Iterable[Batch]:
  return batches if num_batches == -1 else itertools.islice(batches, num_batches)


def _write_json(path: str, value: Any) -> None:
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(value, f, indent=2)
      f.write('\n')


# ----------------------------------------------------------------------------- signals


class _StopRequest:
  """Turns SIGTERM/SIGINT into a stop after a step that every process agrees on.

  One process: the handlers set a flag that `at(step)` reads.
  Under `jax.distributed` (several processes, or `--multiprocess` with one): a per-process flag
  would let hosts stop, and save, at different steps. `jax.distributed.initialize` installs JAX's
  preemption notifier as the SIGTERM handler; it tells every process of the job, and
  `multihost_utils.reached_preemption_sync_point(step)` turns True on all of them at the same
  step (one past the largest step any of them had reached). A Python SIGTERM handler would
  replace the notifier, so only SIGINT gets one, and it forwards the interrupt as a SIGTERM.

  Used as a context manager; handlers are only installed from the main thread (Python allows no
  other) and the previous handlers come back on exit. `resend()` then delivers the signal again
  (under `jax.distributed` with the default action, since the notifier would swallow it), so the
  process ends the way a signal ends it (after the checkpoint is written).
  """

  def __init__(self):
    self.signum: int | None = None
    self._synced = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
    if jax.process_count() > 1 and not self._synced:
      raise RuntimeError('several processes need JAX\'s preemption service (the default '
                         'jax_enable_preemption_service=True) so that a SIGTERM stops all of them '
                         'at the same step')
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> '_StopRequest':
    if threading.current_thread() is threading.main_thread():
      signums = (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT)
      for signum in signums:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self._synced:
      signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier
    else:
      self.signum = signum

  def at(self, step: int) -> bool:
    """Whether training stops after `step`; every process calls it at every step."""
    if self._synced and multihost_utils.reached_preemption_sync_point(step):
      logging.warning('Preemption sync point reached at step %d on every process.', step)
      self.signum = signal.SIGTERM
    return self.signum is not None

  def __exit__(self, *exc_info: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def resend(self) -> None:
    if self.signum is not None:
      if self._synced:
        signal.signal(self.signum, signal.SIG_DFL)
      signal.raise_signal(self.signum)


# ----------------------------------------------------------------------------- profiling


class _Profiler:
  """Traces `num_steps` train steps with `jax.profiler` into `log_dir` (TensorBoard's profile
  plugin reads it), from the second step this process runs, so that compilation stays out."""

  def __init__(self, log_dir: str, first_step: int, num_steps: int):
    self._log_dir = log_dir
    self._start, self._stop = first_step + 2, first_step + 1 + num_steps
    self._enabled = num_steps > 0
    self._started = self._active = False

  def before(self, step: int) -> None:
    if self._enabled and step == self._start:
      jax.profiler.start_trace(self._log_dir)
      self._started = self._active = True

  def after(self, step: int, state: Any) -> None:
    if self._active and step == self._stop:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
      logging.info('Wrote a profile of steps %d-%d to %s.', self._start, self._stop,
                   self._log_dir)
    elif self._enabled and not self._started:
      logging.warning('No profile written: this process ran fewer than 2 steps.')


# ----------------------------------------------------------------------------- training


class _Diverged(FloatingPointError):
  """Training produced NaN or infinity; `state_step` is the first step whose state is bad."""

  def __init__(self, message: str, state_step: int):
    super().__init__(message)
    self.state_step = state_step


# Train metrics that are means over a batch's scored targets (`target_terms`).
_PER_TARGET = ('loss', 'accuracy')


class _TrainMetrics:
  """Host-side accumulator of per-step train metrics, fetched one step behind dispatch so the
  host never waits for the step it has just launched."""

  def __init__(self, window: Mapping[str, tuple[float, float]]):
    """`window`: the (weighted sum, weight) of each metric over the steps since the last summary
    (a resumed run's, from its checkpoint; empty for a fresh start)."""
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._sums = {name: total for name, (total, _) in window.items()}
    self._weights = {name: weight for name, (_, weight) in window.items()}

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def fetch(self, keep_last: bool) -> None:
    """Fetches pending metrics (all but the newest if `keep_last`).

    Raises:
      _Diverged: a step's loss is NaN or infinite (the state it started from is bad), or its
        update made the state so.
    """
    ready = self._pending[:-1] if keep_last else self._pending
    self._pending = self._pending[len(ready):]
    for step, metrics in ready:
      values = jax.device_get(metrics)
      finite = values.pop('finite')
      if not np.isfinite(values['loss']):
        raise _Diverged(f'training loss is {values["loss"]} at step {step}', step - 1)
      if not finite:
        raise _Diverged(f'the update of step {step} made the train state NaN or infinite (the '
                        f'loss of its batch was {values["loss"]:.4g})', step)
      scored = float(values.pop('scored'))
      for name, value in values.items():
        weight = scored if name in _PER_TARGET else 1.0
        self._sums[name] = self._sums.get(name, 0.0) + weight * float(value)
        self._weights[name] = self._weights.get(name, 0.0) + weight

  def window(self) -> dict[str, tuple[float, float]]:
    """(weighted sum, weight) of each metric over the fetched steps since the last summary."""
    return {name: (total, self._weights[name]) for name, total in self._sums.items()}

  def summary(self) -> Metrics:
    """Means since the last summary (of loss and accuracy: over the scored targets; other
    metrics: over steps), then resets."""
    means = {name: total / max(self._weights[name], 1.0) for name, total in self._sums.items()}
    self._sums, self._weights = {}, {}
    return means


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config`'s model on its task in `workdir`, resuming from the latest checkpoint there.

  Every `eval_frequency` steps (and at the last step) the model is evaluated on the validation
  split (`num_eval_steps` batches, -1 = all) and the best-accuracy state is checkpointed. At the
  end, the final state and the best state are each evaluated on the full validation and test
  splits in this process. Process 0 holds the workdir's lock throughout.

  Returns:
    The contents of results.json: {'step', 'validation': {'accuracy', 'loss'}, 'test': {...}
    (both of the final state), 'best_step', 'best': {'validation': ..., 'test': ...} (of the
    best-validation state), 'wall_time_s' (summed over the processes that trained this workdir,
    each up to the checkpoint the next one resumed from), 'num_params', 'config',
    'config_history' ([{'step', 'config'}] of every start in this workdir, by the step it started
    from)}.
    After SIGTERM/SIGINT: a checkpoint of the current step is saved, no results are computed
    and the signal is re-delivered once the handlers are restored, so the process ends as it
    would have without them.
  Raises:
    FloatingPointError: training diverged (NaN or infinity); the message names the step and the
      last checkpoint, which is finite, so a rerun with a corrected config resumes from it.
    WorkdirLockedError: another process is training in `workdir`.
    CheckpointError: checkpoints exist but none can be restored.
  """
  start_time = time.time()
  task, trainer = setup(config)
  os.makedirs(workdir, exist_ok=True)
  stop = _StopRequest()
  try:
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
      return _train_and_evaluate(config, workdir, task, trainer, stop, start_time)
  finally:
    stop.resend()


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} of a nested dict {'a': {'b': value}}."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{name}.'))
    else:
      flat[f'{prefix}{name}'] = value
  return flat


def _config_history(workdir: str) -> list[dict[str, Any]]:
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


def _record_start(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Writes `config` to config.json and configs/<step>.json, and logs the fields in which it
  differs from the config of the previous start, so a changed config never erases what the
  earlier steps ran with."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2) + '\n'
  history = _config_history(workdir)
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


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Any,
                        trainer: Trainer, stop: _StopRequest, start_time: float
                        ) -> dict[str, Any]:
  checkpoints = RunCheckpoints(workdir, keep=config.keep_checkpoints)
  writer = None
  batches = iter(task.train())
  try:
    state = trainer.init_state()
    count = num_params(state.params)
    logging.info('Model has %d parameters.', count)
    previous_time, window = 0.0, {}
    if checkpoints.latest_step() is not None:
      step, state = checkpoints.restore('latest', state, data_iterator=batches)
      previous_time, window = checkpoints.wall_time_s(step), checkpoints.train_window(step)
      logging.info('Resuming from step %d in %s.', step, workdir)
    first = int(state.step)
    _record_start(config, workdir, first)
    best_step = checkpoints.best_step()
    if best_step is not None and best_step > first:
      # A state of steps this run trains again (e.g. of a diverged run): the best is chosen anew.
      logging.warning('Best checkpoint of step %d is past the resumed step %d; setting it aside.',
                      best_step, first)
      checkpoints.set_aside([best_step], 'best')
    # Records past the resumed step (and its final results) are written again.
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0, keep=lambda record: (
        record['step'] < first or (record['step'] == first
                                   and not record['split'].startswith('final_'))),
        purge_step=first + 1)
    wall_time = lambda: previous_time + time.time() - start_time
    with stop:
      try:
        state = _train_loop(config, task, batches, trainer, state, _TrainMetrics(window),
                            writer, checkpoints, stop, wall_time,
                            os.path.join(workdir, 'profile'))
      except _Diverged as error:
        raise FloatingPointError(f'{error}; {_set_aside_diverged(checkpoints, error)}') from None
    if stop.signum is not None:
      logging.warning('Stopped by signal %d at step %d; checkpoint saved. Rerun to resume.',
                      stop.signum, int(state.step))
      return {'step': int(state.step), 'stopped_by_signal': stop.signum}
    results = _final_results(task, trainer, state, writer, checkpoints)
    results.update(wall_time_s=wall_time(), num_params=count, config=config.to_dict(),
                   config_history=_config_history(workdir))
    _write_json(os.path.join(workdir, 'results.json'), results)
    return results
  finally:
    if writer is not None:
      writer.close()
    batches.close()  # stops its decoding threads
    checkpoints.close()


def _set_aside_diverged(checkpoints: RunCheckpoints, error: _Diverged) -> str:
  """Moves the periodic checkpoints of diverged states out of the resume's way (a state can be
  finite yet so large that its next loss is NaN) and says where a rerun starts."""
  diverged = [step for step in checkpoints.steps() if step >= error.state_step]
  checkpoints.set_aside(diverged)
  moved = (f'moved the diverged checkpoint(s) of step(s) {diverged} to {UNUSABLE_DIR}/; '
           if diverged else '')
  step = checkpoints.latest_step()
  if step is None:
    return (f'{moved}no checkpoint is left, so a rerun (e.g. with a lower learning_rate) starts '
            'from scratch')
  return (f'{moved}the last checkpoint, {checkpoints.path("latest", step)} (step {step}), is '
          'sound and a rerun (e.g. with a lower learning_rate) resumes from it')


def _train_loop(config: ml_collections.ConfigDict, task: Any, batches: grain.DatasetIterator,
                trainer: Trainer, state: train_state.TrainState, metrics: _TrainMetrics,
                writer: MetricWriter, checkpoints: RunCheckpoints, stop: _StopRequest,
                wall_time: Callable[[], float], profile_dir: str) -> train_state.TrainState:
  """Runs steps from `state.step` to `num_train_steps` (or until a stop signal), reading
  `batches` from where `state` left it and adding to `metrics` (holding the steps since the last
  train record)."""
  total = config.num_train_steps
  first = int(state.step)
  profiler = _Profiler(profile_dir, first, config.profile_steps)
  clock, clock_step = time.time(), first
  try:
    for step in range(first + 1, total + 1):
      profiler.before(step)
      state, step_metrics = trainer.step(state, next(batches))
      profiler.after(step, state)
      metrics.add(step, step_metrics)
      metrics.fetch(keep_last=True)
      last = step == total
      # Asked once: a signal arriving during this step's hooks is handled at the next step.
      stopping = stop.at(step)
      do_log = step % config.log_every == 0 or last
      do_eval = step % config.eval_frequency == 0 or last
      do_save = step % config.checkpoint_every == 0 or last or stopping
      if not (do_log or do_eval or do_save):
        continue
      # Every step up to this one is checked finite before anything is evaluated or saved.
      metrics.fetch(keep_last=False)
      if do_log:
        summary = metrics.summary()
        rate = (step - clock_step) / max(time.time() - clock, 1e-9)
        summary['steps_per_second'] = rate
        writer.write(step, 'train', summary)
        eta = (total - step) / rate
        logging.info('step %d/%d: loss %.4f accuracy %.4f lr %.3g, %.2f steps/s, ETA %s', step,
                     total, summary['loss'], summary['accuracy'], summary['learning_rate'], rate,
                     datetime.timedelta(seconds=round(eta)))
      if do_eval:
        validation = trainer.evaluate(state.params, _limit(task.validation(),
                                                           config.num_eval_steps))
        writer.write(step, 'validation', validation)
        improved = checkpoints.save_best(step, state, validation)
        note = ' (best so far)' if improved else ''
        if not math.isfinite(validation['loss']):
          note = ' (non-finite loss: never selected as best)'
        logging.info('step %d validation: loss %.4f accuracy %.4f%s', step, validation['loss'],
                     validation['accuracy'], note)
      if do_save:
        checkpoints.save(step, state, wall_time_s=wall_time(), train_window=metrics.window(),
                         data_iterator=batches)
      if stopping:
        break
      clock, clock_step = time.time(), step  # steps/s counts training time only
  finally:
    profiler.close()
  return state


def _evaluate_splits(task: Any, trainer: Trainer, params: Any) -> dict[str, Metrics]:
  return {'validation': trainer.evaluate(params, task.validation()),
          'test': trainer.evaluate(params, task.test())}


def _final_results(task: Any, trainer: Trainer, state: train_state.TrainState,
                   writer: MetricWriter, checkpoints: RunCheckpoints) -> dict[str, Any]:
  step = int(state.step)
  final = _evaluate_splits(task, trainer, state.params)
  best_step = checkpoints.best_step()
  best = final
  if best_step is not None and best_step != step:
    try:
      _, best_state = checkpoints.restore('best', state)
      best = _evaluate_splits(task, trainer, best_state.params)
    except CheckpointError as error:
      # The periodic checkpoints restore into this state's layout, so the best one is damaged,
      # not of another model: set aside, so that a rerun does not fail on it again.
      logging.warning('Best checkpoint %s is unusable; setting it aside and reporting no best '
                      'step (%s).', checkpoints.path('best', best_step), error)
      checkpoints.set_aside([best_step], 'best')
      best_step = None
  for split, values in final.items():
    writer.write(step, f'final_{split}', values)
  logging.info('final step %d: %s; best step %s: %s', step, final, best_step, best)
  return {'step': step, **final, 'best_step': best_step, 'best': best}


# ----------------------------------------------------------------------------- evaluation mode


def config_hash(config: ml_collections.ConfigDict) -> str:
  """8 hex digits of the SHA-256 of `config`'s fields (its JSON with sorted keys): configs that
  differ in any field get different hashes."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def eval_tag(config: ml_collections.ConfigDict, checkpoint: str = 'best') -> str:
  """Names an evaluation by its attention and FFN settings, for people, and by the hash of its
  whole config (`config_hash`), so that evaluations differing in any field (max_length too) never
  share a file, e.g. 'topk_k32_1a2b3c4d', 'vanilla_relu_<hash>', 'topk_k32_approx0.9_latest_<hash>'.
  The same evaluation run again gets the same tag."""
  attention = config.attention
  tag = attention.kind
  if attention.kind == 'topk':
    tag += f'_k{attention.k}'
    if attention.selection == 'approximate':
      tag += f'_approx{attention.recall_target}'
  if attention.kernel != 'softmax':
    tag += f'_{attention.kernel}'
  if config.ffn.kind == 'topk':
    tag += f'_ffntopk_k{config.ffn.k}'
  if checkpoint != 'best':
    tag += f'_{checkpoint}'
  return f'{tag}_{config_hash(config)}'


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             checkpoint: str = 'best') -> dict[str, Any]:
  """Evaluates a trained workdir's checkpoint with `config`'s model on validation and test.

  The config may differ from the training config in its attention and FFN settings (all kinds
  share one parameter tree), e.g. a vanilla-trained checkpoint evaluated with top-k attention.
  Writes `eval_results_<eval_tag(config)>.json` to the workdir.

  Args:
    config: the run config, possibly with other attention/ffn settings.
    workdir: a training workdir.
    checkpoint: 'best' (falls back to the latest when none exists) or 'latest'.
  Returns:
    {'step', 'checkpoint' (the one used), 'tag', 'validation': {'accuracy', 'loss'},
     'test': {...}, 'config' (all of `config`)}.
  Raises:
    FileNotFoundError: the workdir has no checkpoint (checked before anything is built or
      written).
    CheckpointError: the checkpoint cannot be restored (for 'latest': none of the kept ones).
  """
  if not any(os.path.isdir(os.path.join(workdir, name))
             for name in ('checkpoints', 'best_checkpoint')):
    raise FileNotFoundError(f'no checkpoint in --workdir {workdir!r}: evaluation needs a workdir '
                            'that train.py has trained in')
  task, trainer = setup(config)
  # Read-only: evaluating never creates, moves or deletes anything in a workdir.
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
  tag = eval_tag(config, checkpoint)
  results = {'step': step, 'checkpoint': checkpoint, 'tag': tag,
             **_evaluate_splits(task, trainer, state.params),
             'config': config.to_dict()}
  logging.info('evaluation %s of step %d: %s', tag, step, results)
  _write_json(os.path.join(workdir, f'eval_results_{tag}.json'), results)
  return results
