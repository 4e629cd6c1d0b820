"""Capture of attention inputs from trained (or random-init) LRA models, without model changes.

A `Run` is a model, its parameters and validation batches (`load_run` restores a training
workdir, `random_run` initialises a config's model at random). `capture_attention` returns each
attention layer's per-head queries, keys, values and mask (`nn.intercept_methods` on
`MultiHeadDotProductAttention`); `apply_replaced` and `predictions` run a model with each layer's
attention output optionally rewritten.
"""
import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lra import build

Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass
class Run:
  """A model to study: `batches()` yields validation batches (numpy dicts with 'targets');
  `config` is the run config the model was built from."""

  name: str
  kernel: str
  model: nn.Module
  params: Any
  batches: Callable[[], Iterator[Batch]]
  config: ml_collections.ConfigDict


@dataclasses.dataclass
class LayerCall:
  """One attention call, per-head layout: query `[B, H, L, d]`, key `[B, H, n, d]`, value
  `[B, H, n, d_v]`, bool mask broadcastable to `[B, H, L, n]` or None."""

  layer: str
  query: jax.Array
  key: jax.Array
  value: jax.Array
  mask: jax.Array | None


def _limited(batches: Iterable[Batch], num_batches: int) -> Iterator[Batch]:
  return itertools.islice(batches, num_batches)


def load_run(workdir: str, num_batches: int, checkpoint: str = 'best') -> Run:
  """A trained workdir's checkpoint (`lra.build.restore`: its config.json, read-only) and its
  validation data."""
  restored = build.restore(workdir, checkpoint=checkpoint)
  return Run(os.path.basename(os.path.normpath(workdir)), restored.config.attention.kernel,
             restored.trainer.model, restored.state.params,
             lambda: _limited(restored.task.validation(), num_batches), restored.config)


def random_run(config: ml_collections.ConfigDict, kernel: str, num_batches: int,
               synthetic: bool, seed: int = 0) -> Run:
  """A randomly initialised model for `config` with `kernel`; random tokens if `synthetic`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.attention.kernel = kernel
  parts = build.build(config)
  info, model = parts.info, parts.model

  def synthetic_batches() -> Iterator[Batch]:
    rng = np.random.default_rng(seed)  # Every pass sees the same batches.
    for _ in range(num_batches):
      shape = (config.eval_batch_size, info.max_length)
      # Random lengths, so that padding masks are exercised.
      lengths = rng.integers(info.max_length // 2, info.max_length + 1, size=(shape[0], 1))
      tokens = [np.where(np.arange(shape[1]) < lengths,
                         rng.integers(1, info.vocab_size, size=shape), 0).astype(np.int32)
                for _ in range(2)]
      inputs = ({'inputs1': tokens[0], 'inputs2': tokens[1]} if info.dual else
                {'inputs': tokens[0]})
      yield {**inputs, 'targets': rng.integers(0, info.num_classes, shape[0]).astype(np.int32)}

  def real_batches() -> Iterator[Batch]:
    return _limited(build.make_task(parts).validation(), num_batches)

  batches = synthetic_batches if synthetic else real_batches
  example = next(iter(synthetic_batches()))
  params = model.init(jax.random.key(seed), example, train=False)['params']
  return Run(f'random_{kernel}', kernel, model, params, batches, config)


# ----------------------------------------------------------------------------- interception


def _attention_child(context: nn.module.InterceptorContext) -> tuple[str, str] | None:
  """(layer path, child name) for calls of an attention layer's query/key/value/out projection."""
  parent = context.module.parent
  if (context.method_name == '__call__' and isinstance(parent, nn.MultiHeadDotProductAttention)
      and context.module.name in ('query', 'key', 'value', 'out')):
    return '/'.join(parent.path), context.module.name
  return None


def _per_head(x: jax.Array) -> jax.Array:
  """flax layout `[B, L, H, d]` -> `[B, H, L, d]` float32."""
  return jnp.swapaxes(x, -3, -2).astype(jnp.float32)


def _call_mask(module: nn.MultiHeadDotProductAttention, mask: jax.Array | None
               ) -> Callable[[int, int], jax.Array | None]:
  """`(L, n) ->` the bool mask broadcastable to `[B, H, L, n]` of one attention call, or None:
  the call's `mask`, the padding masks bound into its `attention_fn` (`[B, n]` keys, `[B, L]`
  queries) and its causal mask (`is_causal` bound: query i sees keys 0..i).

  `functools.partial` of a partial merges their keywords, so one `keywords` holds them all.
  """
  bound = getattr(module.attention_fn, 'keywords', {})
  masks = [] if mask is None else [mask.astype(bool)]
  if bound.get('key_padding_mask') is not None:
    masks.append(bound['key_padding_mask'].astype(bool)[:, None, None, :])
  if bound.get('query_padding_mask') is not None:
    masks.append(bound['query_padding_mask'].astype(bool)[:, None, :, None])

  def call_mask(length: int, n: int) -> jax.Array | None:
    causal = [jnp.tril(jnp.ones((length, n), bool))] if bound.get('is_causal') else []
    return functools.reduce(jnp.logical_and, masks + causal) if masks or causal else None

  return call_mask


def _intercepting(on_out: Callable[[LayerCall, jax.Array], jax.Array]):
  """An interceptor that gathers each attention call's q/k/v/mask and, at the output
  projection, replaces its input `x` by `on_out(call, x)`."""
  pending: dict[str, dict[str, Any]] = {}

  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name == '__call__'
        and isinstance(context.module, nn.MultiHeadDotProductAttention)):
      if context.module.normalize_qk or context.module.decode:
        raise ValueError('value-aware study supports plain self/cross attention only.')
      pending['/'.join(context.module.path)] = {'mask': _call_mask(context.module,
                                                                   kwargs.get('mask'))}
      return next_fun(*args, **kwargs)
    child = _attention_child(context)
    if child is None:
      return next_fun(*args, **kwargs)
    layer, name = child
    if name != 'out':
      output = next_fun(*args, **kwargs)
      pending[layer][name] = _per_head(output)
      return output
    seen = pending.pop(layer)
    call = LayerCall(layer, seen['query'], seen['key'], seen['value'],
                     seen['mask'](seen['query'].shape[-2], seen['key'].shape[-2]))
    x = on_out(call, args[0])
    return next_fun(x.astype(args[0].dtype), *args[1:], **kwargs)

  return interceptor


def capture_attention(model: nn.Module, params: Any, batch: Batch) -> list[LayerCall]:
  """Runs the model on `batch` and returns every attention call's inputs, in call order."""
  calls = []

  def keep(call, x):
    calls.append(call)
    return x

  with nn.intercept_methods(_intercepting(keep)):
    model.apply({'params': params}, batch, train=False)
  return calls


Replace = Callable[[LayerCall, jax.Array], jax.Array]


def apply_replaced(model: nn.Module, params: Any, batch: Batch, replace: Replace | None
                   ) -> jax.Array:
  """The model's output on `batch` (eval mode), with each attention layer's output (the input of
  its output projection, `[B, L, H, d_v]`) rewritten by `replace(call, x)` if given."""
  if replace is None:
    return model.apply({'params': params}, batch, train=False)
  with nn.intercept_methods(_intercepting(replace)):
    return model.apply({'params': params}, batch, train=False)


def predictions(run: Run, replace: Replace | None) -> tuple[np.ndarray, np.ndarray]:
  """Predicted and true labels `[N]` on `run`'s validation batches, with attention outputs
  rewritten by `replace` if given."""

  @jax.jit
  def predict(params, batch):
    return jnp.argmax(apply_replaced(run.model, params, batch, replace), -1)

  predicted, targets = [], []
  for batch in run.batches():
    inputs = {name: value for name, value in batch.items() if name != 'targets'}
    predicted.append(np.asarray(predict(run.params, inputs)))
    targets.append(batch['targets'])
  if not targets:
    raise ValueError(f'run {run.name} has no validation batches.')
  return np.concatenate(predicted), np.concatenate(targets)


