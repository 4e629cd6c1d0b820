"""Value-aware study (Gupta & Berant): how well r-sparse approximations reproduce attention.

For each trained run (a `lra/train.py` workdir) this collects every attention layer's per-head
queries, keys and values on validation batches and reports, per layer and per r:
- the relative output error `||o - o~|| / ||o||` of top-r attention (value-oblivious, renormalised
  and not) and of the greedy value-aware approximation (`topk.value_aware`), plus the mass of
  the top-r weights (kernel skewness);
- the validation accuracy, and the agreement with the unmodified model's predictions, when that
  layer's attention output (or every layer's, `layer=all`) is replaced by each approximation.
Runs trained with different kernels (`config.attention.kernel`) are compared side by side.

  python -m benchmarks.value_aware --workdir runs/listops_softmax --workdir runs/listops_relu \
    --r 1,2,4,8,16,32 --accuracy_r 1,4 --num_batches 4 --out benchmarks/out/value_aware

The downstream-accuracy part solves the value-aware problem for every query of every layer (the
error table samples `--max_queries`), so on CPU keep `--accuracy_r` short; full LRA sizes need a
GPU.

Smoke run on a random-init model and random tokens (no data or checkpoint needed):

  python -m benchmarks.value_aware --random_init --config configs/listops.py:vanilla,smoke \
    --kernels softmax,relu --synthetic --r 1,2,4 --num_batches 1 --out /tmp/value_aware

Writes errors.csv, accuracy.csv, errors.png and accuracy.png under --out and prints markdown.
"""
import argparse
import csv
import dataclasses
import functools
import importlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lra import data, models
from topk import value_aware

# Approximations compared; 'exact' recomputes full kernel attention (a check of the capture).
METHODS = ('exact', 'oblivious', 'oblivious_raw', 'value_aware')
# Methods whose downstream accuracy is measured (the error table covers all of METHODS).
REPLACED_METHODS = ('oblivious', 'value_aware')

Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass
class Run:
  """A model to study: `batches()` yields validation batches (numpy dicts with 'targets')."""

  name: str
  kernel: str
  model: nn.Module
  params: Any
  batches: Callable[[], Iterator[Batch]]


@dataclasses.dataclass
class LayerCall:
  """One attention call, per-head layout: query `[B, H, L, d]`, key `[B, H, n, d]`, value
  `[B, H, n, d_v]`, bool mask broadcastable to `[B, H, L, n]` or None."""

  layer: str
  query: jax.Array
  key: jax.Array
  value: jax.Array
  mask: jax.Array | None


# ----------------------------------------------------------------------------- runs


def _load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/listops.py:vanilla,smoke' -> that module's get_config('vanilla,smoke')."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config file {path!r} does not exist.')
  module = importlib.import_module(os.path.splitext(os.path.normpath(path))[0].replace(os.sep, '.'))
  return module.get_config(arg or None)


def _limited(batches: Iterator[Batch], num_batches: int) -> Iterator[Batch]:
  return itertools.islice(batches, num_batches)


def load_run(workdir: str, num_batches: int, checkpoint: str = 'best') -> Run:
  """Restores a trained workdir (its config.json and best checkpoint) and its validation data.

  The one place that knows how `lra/train.py` lays out a workdir.
  """
  from lra import train  # Heavy (optax, orbax); only trained runs need it.
  from lra.checkpointing import RunCheckpoints

  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'--workdir {workdir!r} has no config.json.')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task, trainer = train.setup(config)
  checkpoints = RunCheckpoints(workdir, keep=config.keep_checkpoints)
  try:
    _, state = checkpoints.restore(checkpoint, trainer.init_state())
  finally:
    checkpoints.close()
  return Run(os.path.basename(os.path.normpath(workdir)), config.attention.kernel,
             models.build_model(config, task.info), state.params,
             lambda: _limited(task.validation().as_numpy_iterator(), num_batches))


def random_run(config: ml_collections.ConfigDict, kernel: str, num_batches: int,
               synthetic: bool, seed: int = 0) -> Run:
  """A randomly initialised model for `config` with `kernel`; random tokens if `synthetic`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.attention.kernel = kernel
  info = data.task_info(config.task, max_length=config.max_length, **config.task_options)
  model = models.build_model(config, info)

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
    task = data.get_task(config.task, config.data_dir, batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size, max_length=config.max_length,
                         seed=config.seed, **config.task_options)
    return _limited(task.validation().as_numpy_iterator(), num_batches)

  batches = synthetic_batches if synthetic else real_batches
  example = next(iter(synthetic_batches()))
  params = model.init(jax.random.key(seed), example, train=False)['params']
  return Run(f'random_{kernel}', kernel, model, params, batches)


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


def _intercepting(on_out: Callable[[LayerCall, jax.Array], jax.Array]):
  """An interceptor that gathers each attention call's q/k/v/mask and, at the output
  projection, replaces its input `x` by `on_out(call, x)`."""
  pending: dict[str, dict[str, Any]] = {}

  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name == '__call__'
        and isinstance(context.module, nn.MultiHeadDotProductAttention)):
      if context.module.normalize_qk or context.module.decode:
        raise ValueError('value-aware study supports plain self/cross attention only.')
      mask = kwargs.get('mask')
      pending['/'.join(context.module.path)] = {'mask': None if mask is None else
                                                mask.astype(bool)}
      return next_fun(*args, **kwargs)
    child = _attention_child(context)
    if child is None:
      return next_fun(*args, **kwargs)
    layer, name = child
    if name != 'out':
      output = next_fun(*args, **kwargs)
      pending[layer][name] = _per_head(output)
      return output
    parts = pending.pop(layer)
    call = LayerCall(layer, parts['query'], parts['key'], parts['value'], parts['mask'])
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


# ----------------------------------------------------------------------------- analysis


def _attending(weights: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Queries `[..., L]` with an unmasked key and non-zero kernel mass.

  The others are padding (every key masked) or, under relu-type kernels, rows with no positive
  score, whose output is the empty sum 0: outside the hull of the values, so no convex
  combination approximates it and its relative error is undefined.
  """
  attends = jnp.sum(weights, axis=-1) > 0
  return attends if mask is None else attends & jnp.any(mask, axis=-1)


def approximate(call: LayerCall, kernel: str, method: str, r: int,
                query_chunk_size: int | None = None) -> jax.Array:
  """Attention output `[B, H, L, d_v]` of `call` under `method` with budget r; the value-aware
  solver handles `query_chunk_size` queries at a time (None: all).

  Queries that attend to nothing keep the exact output (see `_attending`).
  """
  weights = value_aware.attention_weights(call.query, call.key, call.mask, kernel)
  exact = jnp.einsum('...qk,...kv->...qv', weights, call.value)
  if method == 'exact':
    return exact
  if method in ('oblivious', 'oblivious_raw'):
    approx = value_aware.top_r_approximation(weights, call.value, r,
                                             renormalise=method == 'oblivious').output
  elif method == 'value_aware':
    approx = value_aware.value_aware_greedy(call.value, exact, r, call.mask, weights=weights,
                                            query_chunk_size=query_chunk_size).output
  else:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}.')
  return jnp.where(_attending(weights, call.mask)[..., None], approx, exact)


def layer_errors(call: LayerCall, kernel: str, rs: list[int], max_queries: int,
                 seed: int = 0, query_chunk_size: int | None = None) -> list[dict[str, Any]]:
  """Mean relative output error and top-r mass of `call`, per r and method.

  Uses at most `max_queries` randomly chosen attending (query, head) pairs (`_attending`).

  Returns:
    Rows {'layer', 'r', 'method', 'rel_error', 'top_r_mass', 'queries'}.
  """
  batch, heads, length, _ = call.query.shape
  n = call.key.shape[-2]
  mask = (jnp.ones((batch, heads, length, n), bool) if call.mask is None else
          jnp.broadcast_to(call.mask, (batch, heads, length, n)))
  all_weights = value_aware.attention_weights(call.query, call.key, mask, kernel)
  rows = np.flatnonzero(np.asarray(_attending(all_weights, mask)).reshape(-1))
  rows = np.random.default_rng(seed).permutation(rows)[:max_queries]
  b, h, q = np.unravel_index(rows, (batch, heads, length))
  # One problem per sampled query: value [m, n, d_v], mask and weights [m, 1, n].
  value = call.value[b, h]
  sub_mask = mask[b, h, q][:, None]
  weights = all_weights[b, h, q][:, None]
  exact = jnp.einsum('...qk,...kv->...qv', weights, value)
  results = []
  for r in rs:
    approxes = {
        'oblivious': value_aware.top_r_approximation(weights, value, r).output,
        'oblivious_raw': value_aware.top_r_approximation(weights, value, r,
                                                         renormalise=False).output,
        'value_aware': value_aware.value_aware_greedy(
            value, exact, r, sub_mask, weights=weights,
            query_chunk_size=query_chunk_size).output,
    }
    mass = float(jnp.mean(value_aware.top_r_mass(weights, r)))
    for method, approx in approxes.items():
      error = value_aware.relative_error(exact, approx)
      results.append({'layer': call.layer, 'r': r, 'method': method,
                      'rel_error': float(jnp.mean(error)), 'top_r_mass': mass,
                      'queries': len(rows)})
  return results


def predictions(run: Run, replace: Callable[[LayerCall, jax.Array], jax.Array] | None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Predicted and true labels `[N]` on `run`'s validation batches, with attention outputs
  rewritten by `replace` if given."""

  @jax.jit
  def predict(params, batch):
    if replace is None:
      return jnp.argmax(run.model.apply({'params': params}, batch, train=False), -1)
    with nn.intercept_methods(_intercepting(replace)):
      return jnp.argmax(run.model.apply({'params': params}, batch, train=False), -1)

  predicted, targets = [], []
  for batch in run.batches():
    inputs = {name: value for name, value in batch.items() if name != 'targets'}
    predicted.append(np.asarray(predict(run.params, inputs)))
    targets.append(batch['targets'])
  if not targets:
    raise ValueError(f'run {run.name} has no validation batches.')
  return np.concatenate(predicted), np.concatenate(targets)


def _replacement(kernel: str, method: str, r: int, layer: str,
                 query_chunk_size: int | None = None):
  """A `replace` for `predictions`: swaps in `method`'s output for `layer` ('all' = every
  layer)."""

  def replace(call: LayerCall, x: jax.Array) -> jax.Array:
    if layer not in ('all', call.layer):
      return x
    return jnp.swapaxes(approximate(call, kernel, method, r, query_chunk_size), -3, -2)

  return replace


def study_run(run: Run, rs: list[int], max_queries: int, query_chunk_size: int | None = None,
              accuracy_rs: list[int] | None = None) -> tuple[list[dict], list[dict]]:
  """Error rows (averaged over batches) for budgets `rs` and accuracy rows of one run for
  `accuracy_rs` (default `rs`): replacing whole layers solves every query, far costlier than the
  sampled error table."""
  sums: dict[tuple, list[dict]] = {}
  layers: list[str] = []
  for batch in run.batches():
    inputs = {name: value for name, value in batch.items() if name != 'targets'}
    for call in capture_attention(run.model, run.params, inputs):
      layers += [call.layer] if call.layer not in layers else []
      for row in layer_errors(call, run.kernel, rs, max_queries,
                              query_chunk_size=query_chunk_size):
        sums.setdefault((row['layer'], row['r'], row['method']), []).append(row)
  errors = []
  for (layer, r, method), rows in sums.items():
    weights = np.array([row['queries'] for row in rows], float)
    errors.append({'run': run.name, 'kernel': run.kernel, 'layer': layer, 'r': r,
                   'method': method, 'queries': int(weights.sum()), **{
                       name: float(np.average([row[name] for row in rows], weights=weights))
                       for name in ('rel_error', 'top_r_mass')}})
  model, targets = predictions(run, None)

  def row(layer, r, method, predicted):
    # Agreement with the unmodified model is meaningful even for random-init smoke models.
    return {'run': run.name, 'kernel': run.kernel, 'layer': layer, 'r': r, 'method': method,
            'accuracy': float(np.mean(predicted == targets)),
            'agreement': float(np.mean(predicted == model))}

  accuracies = [row('none', 0, 'model', model),
                row('all', 0, 'exact', predictions(run, _replacement(run.kernel, 'exact', 0,
                                                                     'all'))[0])]
  for layer in layers + ['all']:
    for method in REPLACED_METHODS:
      for r in rs if accuracy_rs is None else accuracy_rs:
        replace = _replacement(run.kernel, method, r, layer, query_chunk_size)
        predicted = predictions(run, replace)[0]
        accuracies.append(row(layer, r, method, predicted))
  return errors, accuracies


# ----------------------------------------------------------------------------- reporting


def _write_csv(path: str, rows: list[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _r_axis(ax: Any, rs: list[int]) -> None:
  """Log-scale r axis ticked at the studied budgets."""
  ax.set_xscale('log')
  ax.set_xticks(rs, [str(r) for r in rs])
  ax.minorticks_off()


def _plot(errors: list[dict], accuracies: list[dict], out: str) -> None:
  import matplotlib  # Plotting is the only reason to import it.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  runs = sorted({row['run'] for row in errors})
  fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
  for ax, run in zip(axes[0], runs, strict=True):
    for method in ('oblivious', 'oblivious_raw', 'value_aware'):
      rows = [row for row in errors if row['run'] == run and row['method'] == method]
      rs = sorted({row['r'] for row in rows})
      mean = [np.mean([row['rel_error'] for row in rows if row['r'] == r]) for r in rs]
      ax.plot(rs, mean, marker='o', label=method)
    _r_axis(ax, rs)
    ax.set(xlabel='r', ylabel='relative output error (mean over layers)',
           title=f'{run} ({next(e["kernel"] for e in errors if e["run"] == run)})')
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'errors.png'), dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 8), squeeze=False)
  for column, run in enumerate(runs):
    rows = [row for row in accuracies if row['run'] == run]
    for ax, metric in zip(axes[:, column], ('accuracy', 'agreement'), strict=True):
      model = next(row[metric] for row in rows if row['method'] == 'model')
      ax.axhline(model, color='gray', linestyle='--', label='model')
      for method in REPLACED_METHODS:
        chosen = sorted((row['r'], row[metric]) for row in rows
                        if row['method'] == method and row['layer'] == 'all')
        ax.plot(*zip(*chosen, strict=True), marker='o', label=f'{method} (all layers)')
      _r_axis(ax, [r for r, _ in chosen])
      ax.set(xlabel='r', ylabel=f'validation {metric}', title=run)
      ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'accuracy.png'), dpi=120)
  plt.close(fig)


def markdown(errors: list[dict], accuracies: list[dict]) -> str:
  """Two markdown tables: mean relative error per run/layer/r, and accuracy per run/layer/r."""
  lines = ['| run | kernel | layer | r | top-r mass | oblivious | oblivious (raw) | value-aware |',
           '|---|---|---|---|---|---|---|---|']
  keys = sorted({(row['run'], row['kernel'], row['layer'], row['r']) for row in errors})
  for key in keys:
    rows = {row['method']: row for row in errors
            if (row['run'], row['kernel'], row['layer'], row['r']) == key}
    lines.append('| ' + ' | '.join(map(str, key)) + f' | {rows["oblivious"]["top_r_mass"]:.3f} | '
                 + ' | '.join(f'{rows[m]["rel_error"]:.4f}'
                              for m in ('oblivious', 'oblivious_raw', 'value_aware')) + ' |')
  lines += ['', '| run | kernel | layer replaced | r | oblivious acc (agree) '
            '| value-aware acc (agree) |', '|---|---|---|---|---|---|']
  for row in accuracies:
    if row['method'] in ('model', 'exact'):
      cell = f'{row["accuracy"]:.4f} ({row["agreement"]:.3f})'
      lines.append(f'| {row["run"]} | {row["kernel"]} | {row["layer"]} ({row["method"]}) | - | '
                   f'{cell} | {cell} |')
  keys = sorted({(row['run'], row['kernel'], row['layer'], row['r']) for row in accuracies
                 if row['method'] in REPLACED_METHODS})
  for key in keys:
    acc = {row['method']: row for row in accuracies
           if (row['run'], row['kernel'], row['layer'], row['r']) == key}
    lines.append('| ' + ' | '.join(map(str, key)) + ' | ' + ' | '.join(
        f'{acc[m]["accuracy"]:.4f} ({acc[m]["agreement"]:.3f})' for m in REPLACED_METHODS) + ' |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> str:
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
  parser.add_argument('--out', default='benchmarks/out/value_aware')
  args = parser.parse_args(argv)
  rs = [int(r) for r in args.r.split(',')]
  accuracy_rs = rs if args.accuracy_r is None else [int(r) for r in args.accuracy_r.split(',')]
  if min(rs + accuracy_rs) < 1:
    raise ValueError(f'--r and --accuracy_r must list integers >= 1, got {args.r!r} and '
                     f'{args.accuracy_r!r}.')
  if args.num_batches < 1:
    raise ValueError(f'--num_batches must be >= 1, got {args.num_batches}.')
  if args.random_init == bool(args.workdir):
    raise ValueError('give either --workdir (one or more) or --random_init with --config.')
  if args.random_init:
    if not args.config:
      raise ValueError('--random_init needs --config, e.g. configs/listops.py:vanilla,smoke.')
    config = _load_config(args.config)
    runs = [functools.partial(random_run, config, kernel, args.num_batches, args.synthetic)
            for kernel in args.kernels.split(',')]
  else:
    runs = [functools.partial(load_run, workdir, args.num_batches) for workdir in args.workdir]
  errors, accuracies = [], []
  for make_run in runs:
    run_errors, run_accuracies = study_run(make_run(), rs, args.max_queries,
                                           args.query_chunk_size, accuracy_rs)
    errors += run_errors
    accuracies += run_accuracies
  os.makedirs(args.out, exist_ok=True)
  _write_csv(os.path.join(args.out, 'errors.csv'), errors)
  _write_csv(os.path.join(args.out, 'accuracy.csv'), accuracies)
  _plot(errors, accuracies, args.out)
  table = markdown(errors, accuracies)
  print(table)
  return table


if __name__ == '__main__':
  main()
