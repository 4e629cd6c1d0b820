"""Device memory and time of one full-size training step of a task config, without any data.

Builds the config's model, optimizer and jitted train step exactly as training does
(`lra.build.make_trainer`: `lra.optim`'s optimizer, `lra.steps.train_step`), compiles the step
for a batch of synthetic tokens of the task's shape and vocabulary (`lra.data.task_info`, no
I/O, no TensorFlow), and reports the compiled memory (`memory_analysis()`: temp, arguments =
train state + batch, and the total the step holds), whether that fits the device, and, when it
fits, the median step time after a warm-up step and the training time it implies
(`num_train_steps` steps, evaluation excluded). Column `fused`: whether a top-k step runs the
fused kernel (`topk.fused.runs_kernel` of the lowered step, for the variant `--fused_variant`
names); with `--fused on` a step without it is not timed. With --all it measures every task
config with every attention kind in one process, the first configs first, until --budget_s is
spent. Any `--config.<field>=<value>`
overrides that field of every config measured, as for train.py (column `config` lists them).

  python -m benchmarks.model_step --config=configs/listops.py:topk [--dtype bfloat16]
  python -m benchmarks.model_step --config=configs/text.py:topk --config.batch_size=16
  python -m benchmarks.model_step --all --dtype bfloat16 --budget_s 200
"""
import argparse
import math
import statistics
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

import config_cli
import topk
from benchmarks.attention import (
  GIB,
  add_fused_options,
  fused_options,
  machine,
  memory_limit,
  ratio_line,
  size,
  write_csv,
)
from lra import data, models
from lra.build import build, make_trainer
from lra.steps import shard_batch
from topk import fused

# Every task config, in the order --all measures them (ListOps carries the step-time target).
TASK_CONFIGS = ('listops', 'text', 'retrieval', 'image', 'pathfinder', 'pathx')
COLUMNS = ('device', 'jax', 'config', 'task', 'kind', 'fused', 'dtype', 'batch', 'length',
           'params',
           'temp_gib', 'argument_gib', 'total_gib', 'limit_gib', 'fits', 'step_ms', 'run_hours',
           'compile_s', 'skipped')


def synthetic_batch(info: data.TaskInfo, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch of random non-padding tokens `[B, L]` int32 and targets `[B]` int32."""
  rng = np.random.default_rng(seed)
  tokens = lambda: rng.integers(1, info.vocab_size, (batch_size, info.max_length), np.int32)
  inputs = {'inputs1': tokens(), 'inputs2': tokens()} if info.dual else {'inputs': tokens()}
  return {**inputs, 'targets': rng.integers(0, info.num_classes, (batch_size,), np.int32)}


def _fused_variant(config: ml_collections.ConfigDict) -> str:
  """The fused kernel variant a top-k config's attention names (`AttentionSpec`'s default
  where it names none)."""
  return config.attention.get('fused_options', topk.AttentionSpec.fused_options).variant


def measure(config: ml_collections.ConfigDict, repeats: int, limit: int,
            require_fused: bool = False) -> dict[str, Any]:
  """Compiled memory and (when it fits within `limit` bytes) median time of one train step;
  `fused` says whether the step runs the fused top-k kernel, and `require_fused` skips the
  timing where it does not."""
  parts = build(config)  # checks every value of the config
  trainer, info = make_trainer(parts), parts.info
  batch = synthetic_batch(info, config.batch_size)
  abstract_state = jax.eval_shape(trainer.init_state)
  start = time.perf_counter()
  lowered = trainer.lower_step(abstract_state, batch)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes -
           mem.alias_size_in_bytes)
  row = {'task': info.name, 'kind': config.attention.kind,
         'fused': (fused.runs_kernel(lowered, _fused_variant(config))
                   if config.attention.kind == 'topk' else ''),
         'dtype': config.model.dtype,
         'batch': config.batch_size, 'length': info.max_length,
         'params': sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)),
         'temp_gib': mem.temp_size_in_bytes / GIB, 'argument_gib': mem.argument_size_in_bytes / GIB,
         'total_gib': total / GIB, 'limit_gib': limit / GIB, 'fits': total <= limit,
         'compile_s': time.perf_counter() - start, 'step_ms': math.nan, 'run_hours': math.nan,
         'skipped': ''}
  if not row['fits']:
    row['skipped'] = f'needs {size(total)}, over the limit of {size(limit)}'
    return row
  if require_fused and not row['fused']:
    # topk_attention fell back to the unfused path: its time must not pass for the fused one.
    row['skipped'] = ('the fused kernel is not in the step (it runs on NVIDIA GPUs where it '
                      'takes the inputs and compiles; the log says which)')
    return row
  state = trainer.init_state()
  device_batch = shard_batch(batch, trainer.mesh)
  times = []
  for _ in range(repeats + 1):  # the first call is the warm-up
    begin = time.perf_counter()
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - begin)
  row['step_ms'] = 1e3 * statistics.median(times[1:])
  row['run_hours'] = row['step_ms'] * config.num_train_steps / 3.6e6
  return row


def _parse(argv: list[str] | None) -> argparse.Namespace:
  """The arguments; `overrides` holds the `--config.<field>=<value>` pairs, in order."""
  argv, overrides = config_cli.split_overrides(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--config', action='append',
                     help='path.py:arg as for train.py, e.g. configs/listops.py:topk (repeatable)')
  which.add_argument('--all', action='store_true',
                     help='every config of --tasks with every kind of --kinds')
  parser.add_argument('--tasks', default=','.join(TASK_CONFIGS),
                      help='with --all: config files under configs/, in order')
  parser.add_argument('--kinds', default=','.join(topk.ATTENTION_FNS),
                      help='with --all: attention kinds')
  parser.add_argument('--preset', default='',
                      help="with --all: extra config arg for every config, e.g. 'smoke'")
  parser.add_argument('--dtype', choices=list(models.DTYPES), default=None,
                      help="computation dtype (config.model.dtype); default the config's")
  parser.add_argument('--repeats', type=int, default=5, help='timed steps after the warm-up')
  parser.add_argument('--memory_limit_mib', type=float, default=None,
                      help="default: the device's allocator limit, or 16 GiB where the device "
                           'does not say (CPU)')
  parser.add_argument('--budget_s', type=float, default=math.inf,
                      help='measure no further config once this many seconds are spent')
  parser.add_argument('--out', default='benchmarks/out', help='directory for model_step.csv')
  parser.add_argument('--fused', choices=('on', 'off', 'both'), default=None,
                      help='top-k kinds with config.attention.fused on, off, or both (default: '
                           "the config's); the kernel runs on --fused_platforms (NVIDIA GPUs)")
  parser.add_argument('--fused_variant', choices=list(fused.VARIANTS),
                      default=fused.FusedOptions().variant,
                      help='the fused kernel of top-k steps with config.attention.fused on')
  add_fused_options(parser)
  args = parser.parse_args(argv)
  args.overrides = overrides
  if args.repeats < 1:
    parser.error(f'--repeats must be >= 1, got {args.repeats}')
  if args.all:
    tasks, kinds = args.tasks.split(','), args.kinds.split(',')
    for name, valid, given in (('tasks', TASK_CONFIGS, tasks),
                               ('kinds', tuple(topk.ATTENTION_FNS), kinds)):
      if not set(given) <= set(valid):
        parser.error(f'--{name} must be among {",".join(valid)}, got {",".join(given)}')
    extra = f',{args.preset}' if args.preset else ''
    args.config = [f'configs/{task}.py:{kind}{extra}' for task in tasks for kind in kinds]
  return args


def _runs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
  """(config spec, config.attention.fused: 'on'/'off' or None: the config's) per measurement."""
  # With both, the fused step first: its target is the one a time budget should not cut.
  switches = {None: (None,), 'on': ('on',), 'off': ('off',), 'both': ('on', 'off')}[args.fused]
  return [(spec, switch) for spec in args.config for switch in (
      switches if config_cli.get_config(spec, args.overrides).attention.kind == 'topk'
      else (None,))]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Measures each config; returns the CSV's rows (dicts keyed by `COLUMNS`)."""
  start = time.perf_counter()
  args = _parse(argv)
  device, limit = machine(), memory_limit(args.memory_limit_mib)
  print(f'device: {device}; jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} '
        f'devices); memory limit {size(limit)}', flush=True)
  rows = []
  for spec, switch in _runs(args):
    config = config_cli.get_config(spec, args.overrides)
    label = ' '.join([spec, *(f'--config.{field}={value}' for field, value in args.overrides)])
    if args.dtype:
      config.model.dtype = args.dtype
    if switch is not None:
      config.attention.fused = switch == 'on'
    with config.unlocked():
      config.attention.fused_options = fused_options(args, args.fused_variant)
    spent = time.perf_counter() - start
    if spent > args.budget_s:
      row = dict.fromkeys(COLUMNS, math.nan)
      row.update(task=config.task, kind=config.attention.kind, dtype=config.model.dtype,
                 fused=config.attention.fused if config.attention.kind == 'topk' else '',
                 skipped=f'time budget: {spent:.0f} s spent of {args.budget_s:.0f} s')
    else:
      row = measure(config, args.repeats, limit, require_fused=switch == 'on')
    row.update(device=device, jax=jax.__version__, config=label)
    rows.append(row)
    print(f'{label:>40} {row["dtype"]:>8}{" fused" if row["fused"] else ""}: ' + (
        f'skipped: {row["skipped"]}' if row['skipped'] and math.isnan(row['temp_gib']) else
        f'temp {row["temp_gib"]:6.2f} GiB + arguments {row["argument_gib"]:5.2f} GiB, total '
        f'{row["total_gib"]:6.2f} GiB ({"fits" if row["fits"] else "does not fit"}); step '
        f'{row["step_ms"]:8.1f} ms, {row["run_hours"]:.2f} h for the run; compile '
        f'{row["compile_s"]:.0f} s'), flush=True)

  print(f'wrote {write_csv(args.out, "model_step.csv", COLUMNS, rows)}')
  step = {(r['task'], r['kind'], r['fused'], r['dtype']): r['step_ms'] for r in rows}
  for (task, kind, is_fused, dtype), ms in step.items():
    vanilla = step.get((task, 'vanilla', '', dtype), math.nan)
    if (task, kind) == ('listops', 'topk') and not math.isnan(ms) and not math.isnan(vanilla):
      name = 'topk (fused)' if is_fused else 'topk'
      print(ratio_line(f'{task} step time {dtype}, {name} / vanilla', ms, vanilla,
                       1.0 if is_fused else 1.5))
  print(f'total {time.perf_counter() - start:.0f} s')
  return rows


if __name__ == '__main__':
  main()
