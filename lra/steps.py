"""The train and eval steps of a model, jitted over a data-parallel device mesh.

Data parallelism uses `jax.jit` over a 1-D ('data',) mesh of all devices: batches are sharded on
their first axis, the train state is replicated. Each process holds only its own share of every
global batch (`grain.sharding.ShardByJaxProcess`); the shares of all processes make up the global
array (`shard_batch`). Everything here takes plain values: `lra.build` reads the config.
"""
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lra.checkpointing import is_finite

Batch = dict[str, np.ndarray]
Metrics = dict[str, float]


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
    model: the flax module the steps apply.
    mesh: the device mesh.
    state_sharding: sharding tree of the train state (replicated).
  """

  def __init__(self, model: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
               example_batch: Batch, *, seed: int, mesh: Mesh, eval_batch_size: int):
    self.mesh = mesh
    self.model = model
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
    variables = self.model.init({'params': key, 'dropout': key}, self._example, train=False)
    return train_state.TrainState.create(apply_fn=self.model.apply, params=variables['params'],
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
