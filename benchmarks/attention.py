"""Memory and speed of attention forms versus sequence length, on CPU or one accelerator.

For each form, length and dtype: compiled temporary memory (XLA `memory_analysis()`, forward and
forward+backward) and the median time of the forward and forward+backward passes (warm-up
excluded), and both times as ratios to a baseline form of the same length and dtype. Forms:

  qk_product  the bare `q @ k^T` product (forward only)
  vanilla     dense attention as XLA compiles it (`topk.dot_product_attention`)
  chunked     exact query-chunked attention (`topk.chunked_attention`)
  topk        top-k attention (`topk.topk_attention`), unfused: scores, then `topk.select`
  topk_fused  the same with the fused score-and-select kernel (`topk.fused`'s default variant
              'compact'; NVIDIA GPU)
  topk_filter the same with the fused variant 'filter' (`topk.filter`, off by default in the
              library; NVIDIA GPU)
  topk_filter_mix  'filter' selecting and mixing in a second kernel (`topk.select_mix`,
              `FusedOptions.mix_in_kernel`; off by default; NVIDIA GPU)
  cudnn       cuDNN flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`;
              NVIDIA GPU, bfloat16/float16 only)
  torch       PyTorch's `scaled_dot_product_attention` on the same device, when torch is
              importable (not a project requirement; no compiled memory)

A form that cannot run (platform, dtype, missing library, over the memory limit, error) gets a
row with the reason in `skipped`. Defaults follow `jax.default_backend()`: on CPU the table of
benchmarks/README.md (float32, lengths 1K-8K, chunk 256, ratios to vanilla); on an accelerator
lengths 4K, 16K, 64K and the longest power-of-two multiple whose top-k forward+backward compiles
within the device's memory, bfloat16 and float32, chunk 1024, ratios to cuDNN flash, and a time
budget that stops adding lengths once spent (the given lengths are timed first, then the searches).
Writes the table to stdout and `attention.csv` (and `attention.png` when matplotlib is
installed) under --out, then the targets as PASS/FAIL lines.

  python -m benchmarks.attention                     # platform defaults
  python -m benchmarks.attention --lengths 1024,2048 --dtypes float32 --forms vanilla,topk
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

import topk
from topk import fused

MIB = 2**20
GIB = 2**30
PROJECT_FORMS = ('vanilla', 'chunked', 'topk')  # the forms `topk.make_attention_fn` builds
# 'topk' with a fused kernel (`topk_attention(fused_options=...)`), by form: its variant (a key
# of `topk.fused.VARIANTS`) and whether it selects and mixes in a kernel
# (`FusedOptions.mix_in_kernel`); the form 'topk' runs `fused=False`.
FUSED_FORMS = {'topk_fused': ('compact', False), 'topk_filter': ('filter', False),
               'topk_filter_mix': ('filter', True)}
FORMS = ('qk_product', *PROJECT_FORMS, *FUSED_FORMS, 'cudnn', 'torch')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# Defaults per platform: CPU keeps benchmarks/README.md's table; any accelerator gets the GPU study.
DEFAULTS = {
    'cpu': dict(lengths='1024,2048,4096,8192', dtypes='float32', chunk=256, baseline='vanilla',
                forms='qk_product,vanilla,chunked,topk', budget_s=math.inf, time_longest=False),
    'accelerator': dict(lengths='4096,16384,65536', dtypes='bfloat16,float32', chunk=1024,
                        baseline='cudnn', forms='cudnn,torch,vanilla,chunked,topk,topk_fused',
                        budget_s=220, time_longest=True),
}
COLUMNS = ('device', 'jax', 'form', 'length', 'dtype', 'fwd_ms', 'fwd_bwd_ms', 'fwd_temp_mib',
           'fwd_bwd_temp_mib', 'fwd_ratio', 'fwd_bwd_ratio', 'skipped')


class Unavailable(Exception):
  """A form cannot run here; the message says why (it goes into the row's `skipped`)."""


def fwd_bwd(fn: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, ...]]:
  """Jitted gradient of `sum(fn(q, k, v))` with respect to q, k and v."""
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                          argnums=(0, 1, 2)))


def ratio_line(name: str, numerator: float, denominator: float, target: float) -> str:
  ratio = numerator / denominator
  return f'{name}: {ratio:.3f} (target <= {target:.3f}: {"PASS" if ratio <= target else "FAIL"})'


def machine() -> str:
  """The device this process computes on: the accelerator's name, or the CPU model and cores."""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    return device.device_kind
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                   model)
  except OSError:
    pass
  return f'{model} ({os.cpu_count()} cores)'


def write_csv(out: str, name: str, columns: tuple[str, ...], rows: list[dict]) -> str:
  """Writes `rows` (dicts keyed by `columns`; missing keys as NaN) to `out/name`; returns the
  path."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, name)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval=math.nan)
    writer.writeheader()
    writer.writerows(rows)
  return path


def size(num_bytes: float) -> str:
  """`num_bytes` in GiB, or in MiB below one GiB."""
  return f'{num_bytes / GIB:.1f} GiB' if num_bytes >= GIB else f'{num_bytes / MIB:.1f} MiB'


def _qk(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  del v
  return jnp.einsum('bqhd,bkhd->bhqk', q, k)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')


def _jax_form(form: str, dtype: str, args: argparse.Namespace) -> Callable[..., jax.Array]:
  """The attention function `fn(q, k, v)` `[B, L, H, D] -> [B, L, H, D]` of a JAX form."""
  if form == 'qk_product':
    return _qk
  if form == 'cudnn':
    if jax.default_backend() != 'gpu':
      raise Unavailable(f'cuDNN attention needs an NVIDIA GPU (backend: {jax.default_backend()})')
    if dtype not in ('bfloat16', 'float16'):
      raise Unavailable(f'cuDNN flash attention supports bfloat16 and float16 only, not {dtype}')
    return _cudnn
  if form == 'topk':
    return topk.make_attention_fn('topk', k=args.k, query_chunk_size=args.chunk, fused=False)
  if form in FUSED_FORMS:
    variant, mix_in_kernel = FUSED_FORMS[form]
    fn = topk.make_attention_fn('topk', k=args.k, query_chunk_size=args.chunk,
                                fused_options=fused_options(args, variant, mix_in_kernel))
    _check_fused(fn, dtype, args, variant)
    return fn
  options = {'chunked': dict(query_chunk_size=args.chunk), 'vanilla': {}}[form]
  return topk.make_attention_fn(form, **options)


def _check_fused(fn: Callable[..., jax.Array], dtype: str, args: argparse.Namespace,
                 variant: str) -> None:
  """Raises Unavailable unless `fn` (`topk_attention(fused=True)`) runs `variant`'s kernel here
  for inputs of `dtype` and `args`' shapes: where it does not take them or Triton fails to
  compile it, the unfused path runs, which a fused form's row must not time."""
  if jax.default_backend() != 'gpu':
    raise Unavailable('the fused kernel compiles for NVIDIA GPUs only (Pallas interpret mode '
                      'elsewhere is a test path, not a benchmark)')
  spec = _spec(args, args.lengths[0], dtype)
  if not fused.runs_kernel(jax.jit(fn).lower(spec, spec, spec), variant):
    raise Unavailable(f'the fused kernel {variant!r} does not run here for {dtype}, head_dim '
                      f'{args.head_dim}, k {args.k} (unsupported input or a Triton failure: '
                      'the log says which); topk_attention would run the unfused path')


def _compile(jitted: Callable[..., object], spec: jax.ShapeDtypeStruct
             ) -> tuple[jax.stages.Compiled, int, int]:
  """The function compiled for `(spec, spec, spec)`, its temp bytes and all the bytes it holds
  (temp + arguments + outputs). Timing calls this executable, so each pass compiles once."""
  compiled = jitted.lower(spec, spec, spec).compile()
  mem = compiled.memory_analysis()
  return (compiled, mem.temp_size_in_bytes,
          mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
  """Median seconds of `repeats` calls of `run` (which waits for its result), after a warm-up."""
  run()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def memory_limit(limit_mib: float | None) -> int:
  """Bytes a compiled function may use: `limit_mib`, else the device's allocator limit (or
  16 GiB where the device does not report one, e.g. CPU)."""
  if limit_mib is not None:
    return int(limit_mib * MIB)
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('bytes_limit', 16 * GIB)


def _spec(args: argparse.Namespace, length: int, dtype: str) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((args.batch, length, args.heads, args.head_dim), DTYPES[dtype])


def _measure_jax(row: dict, data: tuple[jax.Array, ...], args: argparse.Namespace,
                 limit: int) -> None:
  """Fills `row` with the memory and times of its JAX form on `data`.

  Raises Unavailable when the form does not fit `limit` bytes or fails; what was measured
  before (e.g. the memory of a pass over the limit) stays in `row`.
  """
  form, dtype = row['form'], row['dtype']
  fn = _jax_form(form, dtype, args)
  spec = jax.ShapeDtypeStruct(data[0].shape, data[0].dtype)
  passes = {'fwd': jax.jit(fn)} if form == 'qk_product' else {'fwd': jax.jit(fn),
                                                               'fwd_bwd': fwd_bwd(fn)}
  try:
    compiled = {}
    for name, jitted in passes.items():
      compiled[name], temp, total = _compile(jitted, spec)
      row[f'{name}_temp_mib'] = temp / MIB
      if total > limit:
        raise Unavailable(f'{name} needs {size(total)} compiled, over the limit of '
                          f'{size(limit)}')
    for name, executable in compiled.items():
      row[f'{name}_ms'] = 1e3 * median_seconds(
          lambda executable=executable: jax.block_until_ready(executable(*data)), args.repeats)
  except Unavailable:
    raise
  except Exception as e:  # a compile or run failure is reported in the table, not fatal
    raise Unavailable(f'{type(e).__name__}: {str(e).splitlines()[0][:200]}') from None


def _measure_torch(row: dict, data: tuple[jax.Array, ...], args: argparse.Namespace) -> None:
  """Fills `row` with the times of PyTorch's fused attention on the same inputs and device."""
  try:
    import numpy as np
    import torch
  except ImportError:
    raise Unavailable('torch is not importable (pip install torch to compare)') from None
  device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
  if device == 'cuda' and not torch.cuda.is_available():
    raise Unavailable('torch has no CUDA device')
  dtype = getattr(torch, str(data[0].dtype))
  q, k, v = (torch.tensor(np.asarray(x.astype(jnp.float32)).transpose(0, 2, 1, 3),
                          device=device, dtype=dtype) for x in data)  # [B, H, L, D]
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def forward() -> None:
    with torch.no_grad():
      sdpa(q, k, v)
    sync()

  grads = [x.detach().requires_grad_() for x in (q, k, v)]

  def forward_backward() -> None:
    for x in grads:
      x.grad = None
    sdpa(*grads).float().sum().backward()
    sync()

  try:
    row['fwd_ms'] = 1e3 * median_seconds(forward, args.repeats)
    row['fwd_bwd_ms'] = 1e3 * median_seconds(forward_backward, args.repeats)
  except RuntimeError as e:  # e.g. CUDA out of memory
    raise Unavailable(f'torch: {str(e).splitlines()[0][:200]}') from None


# `_longest_fitting`'s notes where the deadline or --max_search_length, not a length over the
# limit, ended the search.
STOPPED_BY_BUDGET = ' (search stopped by the time budget)'
STOPPED_AT_MAX = ' (search stopped at --max_search_length)'


def _longest_fitting(form: str, start: int, lowest: int, args: argparse.Namespace, limit: int,
                     deadline: float) -> tuple[int | None, str]:
  """Longest length `start * 2**n` (n may be negative, not below `lowest`) whose fwd+bwd
  compiles within `limit` bytes; compile only, up to --max_search_length and until `deadline`
  (time.perf_counter()). Returns it (None if none fits) and a note."""
  try:
    fn = _jax_form(form, args.dtypes[0], args)
  except Unavailable as e:
    return None, f' ({e})'

  def fits(length: int) -> bool:
    try:
      return _compile(fwd_bwd(fn), _spec(args, length, args.dtypes[0]))[2] <= limit
    except Exception:  # e.g. XLA refuses a buffer that large: it does not fit either
      return False

  length = start
  while not fits(length):
    length //= 2
    if length < lowest:
      return None, ''
    if time.perf_counter() > deadline:
      return None, STOPPED_BY_BUDGET
  while length * 2 <= args.max_search_length:
    if time.perf_counter() > deadline:
      return length, STOPPED_BY_BUDGET
    if not fits(length * 2):
      return length, ''
    length *= 2
  return length, STOPPED_AT_MAX


def _with_ratios(rows: list[dict], baseline: str) -> None:
  """Adds each row's fwd and fwd+bwd time over the baseline form's (same length and dtype)."""
  base = {(r['length'], r['dtype']): r for r in rows if r['form'] == baseline}
  for r in rows:
    b = base.get((r['length'], r['dtype']), {})
    for name in ('fwd', 'fwd_bwd'):
      r[f'{name}_ratio'] = r[f'{name}_ms'] / b.get(f'{name}_ms', math.nan)


def _plot(rows: list[dict], path: str) -> str:
  if all(r['skipped'] for r in rows):
    return 'nothing measured: no PNG'
  try:
    import matplotlib
  except ImportError:
    return 'matplotlib not installed: no PNG'
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for form, dtype in sorted({(r['form'], r['dtype']) for r in rows}):
    mine = [r for r in rows if (r['form'], r['dtype']) == (form, dtype) and not r['skipped']]
    if not mine:
      continue
    lengths = [r['length'] for r in mine]
    label = f'{form} {dtype}'
    if form not in ('qk_product', 'torch'):
      axes[0].plot(lengths, [r['fwd_bwd_temp_mib'] for r in mine], 'o-', label=label)
    if form != 'qk_product':
      axes[1].plot(lengths, [r['fwd_bwd_ms'] for r in mine], 'o-', label=f'{label} fwd+bwd')
    axes[1].plot(lengths, [r['fwd_ms'] for r in mine], 'x--', label=f'{label} fwd')
  for ax, label in zip(axes, ('fwd+bwd temp memory (MiB)', 'median time (ms)'), strict=True):
    ax.set(xscale='log', yscale='log', xlabel='sequence length', ylabel=label)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return f'wrote {path}'


def _targets(rows: list[dict], args: argparse.Namespace) -> Iterator[str]:
  """The speed and memory targets whose rows this run measured, as ratio_line strings."""
  at = {(r['form'], r['length'], r['dtype']): r for r in rows if not r['skipped']}
  for (form, length, dtype), r in sorted(at.items()):
    flash = at.get(('cudnn', length, dtype))
    if form in FUSED_FORMS and length >= 65536 and flash:
      for column, name in (('fwd_ms', 'fwd'), ('fwd_bwd_ms', 'fwd+bwd')):
        yield ratio_line(f'{name} time at L={length} {dtype}, {form} / cudnn flash',
                         r[column], flash[column], 1.0)
    if form != 'topk':
      continue
    if length >= 16384 and ('cudnn', length, dtype) in at:
      yield ratio_line(f'fwd+bwd time at L={length} {dtype}, topk / cudnn flash',
                       r['fwd_bwd_ms'], at[('cudnn', length, dtype)]['fwd_bwd_ms'], 2.5)
    if length >= 16384 and ('chunked', length, dtype) in at:
      yield ratio_line(f'fwd+bwd temp memory at L={length} {dtype}, topk / chunked',
                       r['fwd_bwd_temp_mib'], at[('chunked', length, dtype)]['fwd_bwd_temp_mib'],
                       1.0)
    if length == 4096 and jax.default_backend() == 'cpu':
      for other, target in (('vanilla', 0.4), ('chunked', 1.0)):
        if (other, length, dtype) in at:
          yield ratio_line(f'fwd+bwd time at L=4096 {dtype}, topk / {other}', r['fwd_bwd_ms'],
                           at[(other, length, dtype)]['fwd_bwd_ms'], target)
  if jax.default_backend() == 'cpu' and {'topk', 'vanilla'} <= set(args.forms):
    # Compile only, so it is checked at 8192 whatever --lengths says.
    spec = _spec(args, 8192, 'float32')
    mem = {form: _compile(fwd_bwd(_jax_form(form, 'float32', args)), spec)[1]
           for form in ('topk', 'vanilla')}
    yield ratio_line('fwd+bwd temp memory at L=8192 float32, topk / vanilla', mem['topk'],
                     mem['vanilla'], 1 / 16)


def _parse(argv: list[str] | None) -> argparse.Namespace:
  defaults = DEFAULTS['cpu' if jax.default_backend() == 'cpu' else 'accelerator']
  names = lambda valid: lambda s: [_choice(x, valid) for x in s.split(',')]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lengths', type=lambda s: [int(x) for x in s.split(',')],
                      default=defaults['lengths'])
  parser.add_argument('--dtypes', type=names(DTYPES), default=defaults['dtypes'])
  parser.add_argument('--forms', type=names(FORMS), default=defaults['forms'])
  parser.add_argument('--baseline', type=lambda s: _choice(s, FORMS),
                      default=defaults['baseline'], help='form the ratio columns divide by')
  parser.add_argument('--repeats', type=int, default=5, help='timed runs per measurement')
  parser.add_argument('--k', type=int, default=64, help='keys kept per query (topk)')
  parser.add_argument('--chunk', type=int, default=defaults['chunk'], help='query chunk size')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--out', default='benchmarks/out', help='directory for CSV and PNG')
  add_fused_options(parser)
  parser.add_argument('--memory_limit_mib', type=float, default=None,
                      help="memory a compiled pass may use (default: the device's limit, or "
                           '16 GiB where the device does not say, e.g. CPU)')
  parser.add_argument('--max_search_length', type=int, default=2**20,
                      help='stop the longest-length search here')
  parser.add_argument('--search_longest', action=argparse.BooleanOptionalAction, default=True,
                      help='search the longest length each form compiles within the memory limit')
  parser.add_argument('--time_longest', action=argparse.BooleanOptionalAction,
                      default=defaults['time_longest'],
                      help="also time topk's longest fitting length (default on accelerators)")
  parser.add_argument('--budget_s', type=float, default=defaults['budget_s'],
                      help='stop adding lengths once this many seconds are spent or predicted')
  args = parser.parse_args(argv)
  for name in ('repeats', 'k', 'chunk', 'batch', 'heads', 'head_dim', 'max_search_length'):
    topk.inputs.check_positive_int(getattr(args, name), f'--{name}')
  for length in args.lengths:
    topk.inputs.check_positive_int(length, '--lengths')
  return args


def add_fused_options(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--fused_options', type=_fused_options, default={},
                      help="the fused kernels' tuning options by variant (a key of "
                           '`topk.fused.VARIANTS`: the fields of its `tuning_type`, e.g. '
                           '`topk.fused.Tiling` for compact), a JSON object or a JSON file such '
                           'as the fused_options.json of benchmarks.fused: {"compact": '
                           '{"block_q": 16}}; a variant not named keeps its defaults')
  parser.add_argument('--fused_platforms', type=lambda text: tuple(text.split(',')),
                      default=fused.FusedOptions().platforms,
                      help="where the fused kernel runs (`topk.fused.FusedOptions.platforms`): "
                           "comma-separated; 'cpu' runs it in Pallas' interpreter")


def fused_options(args: argparse.Namespace, variant: str,
                  mix_in_kernel: bool = False) -> fused.FusedOptions:
  """`variant`'s options (a key of `topk.fused.VARIANTS`) as `add_fused_options`' flags give."""
  return fused.FusedOptions(variant=variant, platforms=args.fused_platforms,
                            tuning=args.fused_options.get(variant), mix_in_kernel=mix_in_kernel)


def _fused_options(text: str) -> dict[str, object]:
  """`--fused_options`' JSON (or JSON file) -> each variant's tuning options."""
  if os.path.exists(text):
    with open(text) as f:
      text = f.read()
  try:
    options = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f'not a JSON object or a JSON file: {e}') from None
  if not (isinstance(options, dict) and all(isinstance(x, dict) for x in options.values())):
    raise argparse.ArgumentTypeError(f'expected a JSON object of objects, got {options!r}')
  try:
    return {variant: fused.VARIANTS[_choice(variant, fused.VARIANTS)].tuning_type(**fields)
            for variant, fields in options.items()}
  except (TypeError, ValueError) as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _choice(name: str, valid: object) -> str:
  if name not in valid:
    raise argparse.ArgumentTypeError(f'{name!r} is not one of {", ".join(valid)}')
  return name


def _time_lengths(lengths: list[int], args: argparse.Namespace, device: str, limit: int,
                  start: float, previous: tuple[float, float, float] | None
                  ) -> tuple[list[dict], tuple[float, float, float] | None]:
  """Rows of every form at each length, in order, until the budget (from `start`) is spent or
  predicted to be; `previous` (length, compile seconds, run seconds) of the last length timed,
  which the prediction scales by the length squared, goes in and comes back."""
  rows = []
  for length in lengths:
    spent = time.perf_counter() - start
    predicted = previous and previous[1] + previous[2] * (length / previous[0]) ** 2
    skip = None
    if spent > args.budget_s or (predicted and spent + predicted > args.budget_s):
      skip = (f'time budget: {spent:.0f} s spent, about {predicted or 0:.0f} s more predicted, '
              f'budget {args.budget_s:.0f} s')
      print(f'L={length}: skipped, {skip}', flush=True)
    length_start, run_s = time.perf_counter(), 0.0
    for dtype in args.dtypes:
      spec = _spec(args, length, dtype)
      keys = jax.random.split(jax.random.key(length), 3)
      data = () if skip else tuple(jax.random.normal(key, spec.shape, spec.dtype) for key in keys)
      for form in args.forms:
        row = dict.fromkeys(COLUMNS, math.nan)
        row.update(device=device, jax=jax.__version__, form=form, length=length, dtype=dtype,
                   skipped=skip or '')
        try:
          if form == 'torch' and not skip:
            _measure_torch(row, data, args)
          elif not skip:
            _measure_jax(row, data, args, limit)
        except Unavailable as e:
          row['skipped'] = str(e)
        rows.append(row)
        if not skip:
          run_s += (args.repeats + 1) * sum(
              0 if math.isnan(row[p]) else row[p] / 1e3 for p in ('fwd_ms', 'fwd_bwd_ms'))
          print(f'{form:>10} L={length:>7} {dtype:>8}  ' + (
              f'skipped: {row["skipped"]}' if row['skipped'] else
              f'temp fwd {row["fwd_temp_mib"]:9.1f} MiB  fwd+bwd {row["fwd_bwd_temp_mib"]:9.1f} '
              f'MiB  time fwd {row["fwd_ms"]:9.2f} ms  fwd+bwd {row["fwd_bwd_ms"]:9.2f} ms'),
              flush=True)
    if not skip:
      previous = (length, time.perf_counter() - length_start - run_s, run_s)
  return rows, previous


def main(argv: list[str] | None = None) -> list[dict]:
  """Runs the benchmark; returns the CSV's rows (dicts keyed by `COLUMNS`)."""
  start = time.perf_counter()
  args = _parse(argv)
  device, limit = machine(), memory_limit(args.memory_limit_mib)
  print(f'device: {device}; jax {jax.__version__} ({jax.default_backend()}); batch {args.batch}, '
        f'heads {args.heads}, head_dim {args.head_dim}, k {args.k}, chunk {args.chunk}; memory '
        f'limit {size(limit)}; time budget {args.budget_s} s; fused kernel options '
        f'{ {v: dataclasses.asdict(x) for v, x in args.fused_options.items()} } on '
        f'{",".join(args.fused_platforms)}',
        flush=True)

  # The given lengths first (the speed targets are theirs), then the longest lengths that
  # compile within the limit (fused top-k first: the memory target is its) with half the time
  # left, then top-k's longest timed if the budget still allows.
  lengths = sorted(set(args.lengths))
  rows, previous = _time_lengths(lengths, args, device, limit, start, None)
  longest, notes = {}, {}
  deadline = time.perf_counter() + max(0.0, args.budget_s - (time.perf_counter() - start)) / 2
  for form in (f for f in ('topk_fused', *PROJECT_FORMS) if args.search_longest and f in args.forms
               and not (f == 'topk_fused' and jax.default_backend() != 'gpu')):
    longest[form], notes[form] = _longest_fitting(form, lengths[-1], lengths[0], args, limit,
                                                  deadline)
    print(f'longest length within {size(limit)} (fwd+bwd {args.dtypes[0]}, compiled): '
          f'{form}: {longest[form]}{notes[form]}', flush=True)
  if 'topk_fused' in longest and limit <= 80 * GIB:
    # Within a smaller limit, or from a search stopped before a length over the limit, a miss
    # says nothing of the target: only a fit passes there.
    ok = (longest['topk_fused'] or 0) >= 2**20
    note = notes['topk_fused']
    verdict = ('PASS' if ok else 'not checked: pass --memory_limit_mib 81920' if limit < 80 * GIB
               else f'not checked: {note.strip(" ()")}' if note in (STOPPED_BY_BUDGET,
                                                                   STOPPED_AT_MAX) else 'FAIL')
    print(f'fused top-k fwd+bwd at L=1048576 compiles within {size(limit)}: '
          f'{"yes" if ok else "no"} (target: within 80 GiB: {verdict})')
  top = max((longest.get(form) or 0) for form in ('topk', 'topk_fused'))
  if args.time_longest and top > lengths[-1]:
    rows += _time_lengths([top], args, device, limit, start, previous)[0]

  _with_ratios(rows, args.baseline)
  path = write_csv(args.out, 'attention.csv', COLUMNS, rows)
  print(f'wrote {path}; ratios are to {args.baseline}')
  print(_plot(rows, os.path.join(args.out, 'attention.png')))
  for line in _targets(rows, args):
    print(line)
  print(f'total {time.perf_counter() - start:.0f} s')
  return rows


if __name__ == '__main__':
  main()
