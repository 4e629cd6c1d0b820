"""The fused score-and-select kernel on one GPU: checks, the exact selections, block sizes.

Three stages (--stages), each on fresh random inputs (`[1, L, heads, head_dim]`, no mask unless
said):

1. checks: `topk.fused.kept_top_k` against `lax.top_k` of the dense masked scores (float32 and
   bfloat16, without and with a causal mask) and every exact selection of `topk.select.METHODS`
   against `lax.top_k`, compiled for the device. The kernel's and XLA's score products may round
   differently, so kept scores are compared to a tolerance and indices by the fraction that agree.
2. selection: the median time of each exact method on `[rows, L]` scores (what one query chunk
   of the unfused path selects from), float32 and bfloat16.
3. tuning: the median forward time of the kernel for each tiling (--tilings) of a grid of its
   options (`block_q`, `key_tile`, `num_warps`, `num_stages`) at --length, against the unfused
   path's scores-and-selection loop and cuDNN flash attention's forward at the same length.

Writes fused.csv and the fastest tiling's options to fused_options.json under --out, as
`{"compact": {...}}` (the --fused_options flag of benchmarks.attention and
benchmarks.model_step), and prints a table.
On CPU the kernel runs in Pallas' interpreter: only tiny shapes are practical (a test does that).

  python -m benchmarks.fused --out benchmarks/out/gpu
"""
import argparse
import functools
import inspect
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.attention import DTYPES, machine, median_seconds, write_csv
from topk import fused, inputs, select

COLUMNS = ('device', 'jax', 'stage', 'name', 'dtype', 'length', 'ms', 'ratio', 'detail')
# The tuning grid: (block_q, key_tile, num_warps, num_stages); the first is the default.
TILINGS = ((16, 128, 4, 2), (32, 128, 4, 2), (64, 128, 4, 2), (32, 64, 4, 2), (32, 256, 4, 2),
           (16, 256, 4, 2), (64, 128, 8, 2), (32, 128, 2, 2), (16, 64, 2, 2))
OPTION_NAMES = ('block_q', 'key_tile', 'num_warps', 'num_stages')


def _qkv(length: int, heads: int, head_dim: int, dtype: Any, seed: int) -> tuple[jax.Array, ...]:
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (1, length, heads, head_dim), dtype) for key in keys)


def _kernel_fn(k: int, is_causal: bool, interpret: bool, **options: Any) -> Callable[..., Any]:
  """`(q, key)` `[1, L, H, D]` -> the kernel's `(kept, indices, redo)` `[1, H, L, k]`."""
  def run(q, key):
    can = inputs.canonicalize(q, key, key, is_causal=is_causal)
    return fused.kept_top_k(can, k, interpret=interpret, tiling=fused.Tiling(**options))
  return jax.jit(run)


def _dense_top_k(k: int, is_causal: bool) -> Callable[..., Any]:
  def run(q, key):
    can = inputs.canonicalize(q, key, key, is_causal=is_causal)
    return jax.lax.top_k(inputs.chunk_scores(can, 0, can.query, None), k)
  return jax.jit(run)


def check_kernel(args: argparse.Namespace, dtype: str, is_causal: bool) -> dict[str, Any]:
  """The kernel against `lax.top_k` of the dense scores at --check_length; a row for the CSV."""
  q, key, _ = _qkv(args.check_length, args.heads, args.head_dim, DTYPES[dtype], seed=1)
  interpret = jax.default_backend() != 'gpu'
  kept, idx, redo = _kernel_fn(args.k, is_causal, interpret)(q, key)
  want_kept, want_idx = _dense_top_k(args.k, is_causal)(q, key)
  kept, idx, redo, want_kept, want_idx = map(np.asarray, (kept, idx, redo, want_kept, want_idx))
  ok = ~redo
  if not ok.any():
    return dict(stage='check', name='kernel causal' if is_causal else 'kernel', dtype=dtype,
                length=args.check_length, detail='FAIL: every row was left to the unfused path')
  error = float(np.max(np.abs(kept[ok] - want_kept[ok]) / (1 + np.abs(want_kept[ok]))))
  agree = float(np.mean(idx[ok] == want_idx[ok]))
  passed = error <= args.tolerance and agree >= 0.99 and np.isfinite(kept[ok]).all()
  detail = (f'{"PASS" if passed else "FAIL"}: max relative kept-score error {error:.2e} (<= '
            f'{args.tolerance:g}), indices equal {agree:.4%} (>= 99%), rows redone unfused '
            f'{redo.mean():.2%}')
  return dict(stage='check', name='kernel causal' if is_causal else 'kernel', dtype=dtype,
              length=args.check_length, detail=detail)


def _method(name: str) -> Callable[..., Any]:
  return jax.jit(functools.partial(select.top_k, method=name), static_argnums=1)


def _stable_false() -> Callable[..., Any] | None:
  """`lax.top_k(..., is_stable=False)` where this jax has it (newer XLA may route it to a fast
  GPU selection), else None."""
  if 'is_stable' not in inspect.signature(jax.lax.top_k).parameters:
    return None
  return jax.jit(lambda s, k: jax.lax.top_k(s, k, is_stable=False), static_argnums=1)


def selection_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Checks and times every exact selection method on `[rows, L]` scores."""
  methods = {name: _method(name) for name in select.METHODS if name != 'ffi'}
  if jax.default_backend() == 'cpu' and select.ISA:
    methods['ffi'] = _method('ffi')
  stable_false = _stable_false()
  rows = []
  for dtype in args.dtypes:
    scores = jax.random.normal(jax.random.key(2), (args.rows, args.length), DTYPES[dtype])
    want = jax.lax.top_k(scores, args.k)
    timed = dict(methods)
    if stable_false is not None:
      timed['lax_unstable'] = stable_false
    base = None
    for name, fn in timed.items():
      got = fn(scores, args.k)
      same = bool(jnp.array_equal(got[0], want[0]) & jnp.array_equal(got[1], want[1]))
      same_values = bool(jnp.array_equal(got[0], want[0]))
      ms = 1e3 * median_seconds(lambda fn=fn, s=scores: jax.block_until_ready(fn(s, args.k)),
                                args.repeats)
      base = base or ms
      rows.append(dict(stage='select', name=name, dtype=dtype, length=args.length, ms=ms,
                       ratio=ms / base, detail=f'[{args.rows}, {args.length}] k {args.k}; ' + (
                           'equal to lax.top_k' if same else
                           'values equal, tie order differs' if same_values else
                           'FAIL: differs from lax.top_k')))
  return rows


def _unfused_scores_and_select(args: argparse.Namespace) -> Callable[..., Any]:
  """The unfused forward's selection part: per query chunk, scores then `select.top_k`."""
  def run(q, key):
    can = inputs.canonicalize(q, key, key, query_chunk_size=args.chunk)
    chunks = inputs.to_chunks(can.query, can.chunk_size)
    return jax.lax.map(lambda a: select.top_k(inputs.chunk_scores(can, a[0], a[1], None), args.k),
                       (jnp.arange(can.num_chunks), chunks))
  return jax.jit(run)


def tuning_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Times each tiling of `TILINGS` (and the baselines) at --length; returns the rows and the
  fastest tiling's options."""
  dtype = args.dtypes[0]
  q, key, v = _qkv(args.length, args.heads, args.head_dim, DTYPES[dtype], seed=3)
  time_ms = lambda fn, *a: 1e3 * median_seconds(lambda: jax.block_until_ready(fn(*a)),
                                                args.repeats)
  rows = []
  baselines = {'unfused scores + select': (_unfused_scores_and_select(args), (q, key))}
  if jax.default_backend() == 'gpu' and dtype in ('bfloat16', 'float16'):
    baselines['cudnn flash forward'] = (jax.jit(functools.partial(
        jax.nn.dot_product_attention, implementation='cudnn')), (q, key, v))
  for name, (fn, operands) in baselines.items():
    rows.append(dict(stage='tune', name=name, dtype=dtype, length=args.length,
                     ms=time_ms(fn, *operands), detail=f'methods {dict(select.DEFAULT_METHODS)}'))
  best, best_ms = None, math.inf
  interpret = jax.default_backend() != 'gpu'
  for tiling in args.tilings:
    options = dict(zip(OPTION_NAMES, tiling, strict=True))
    row = dict(stage='tune', name=' '.join(f'{n}={x}' for n, x in options.items()), dtype=dtype,
               length=args.length)
    try:
      fn = _kernel_fn(args.k, False, interpret, **options)
      start = time.perf_counter()
      redo = float(jnp.mean(fn(q, key)[2]))
      compile_s = time.perf_counter() - start
      row['ms'] = time_ms(fn, q, key)
      row['detail'] = f'compile+first run {compile_s:.1f} s; rows redone unfused {redo:.2%}'
    except Exception as e:  # a tiling Triton rejects (e.g. out of shared memory) is reported
      row['detail'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}'
      row['ms'] = math.nan
    rows.append(row)
    print(_line(row), flush=True)
    if row['ms'] < best_ms:
      best, best_ms = options, row['ms']
  flash = next((r['ms'] for r in rows if r['name'] == 'cudnn flash forward'), math.nan)
  for r in rows:
    r['ratio'] = r['ms'] / flash
  return rows, best


def _line(row: dict[str, Any]) -> str:
  ms = row.get('ms', math.nan)
  return (f'{row["stage"]:>6} {row["name"][:60]:<60} {row["dtype"]:>8} L={row["length"]:>6} '
          f'{"" if math.isnan(ms) else f"{ms:9.3f} ms"} {row.get("detail", "")}')


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--stages', default='check,select,tune')
  parser.add_argument('--length', type=int, default=16384, help='keys (and queries) when timing')
  parser.add_argument('--check_length', type=int, default=2048)
  parser.add_argument('--rows', type=int, default=4096, help='score rows per selection')
  parser.add_argument('--dtypes', type=lambda s: s.split(','), default=['bfloat16', 'float32'])
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--k', type=int, default=64)
  parser.add_argument('--chunk', type=int, default=1024, help="the unfused path's query chunk")
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--tolerance', type=float, default=1e-3,
                      help="kept scores' error relative to 1 + |score| that the check allows")
  parser.add_argument('--tilings', type=lambda s: [tuple(int(x) for x in v.split(':'))
                                                    for v in s.split(',')],
                      default=list(TILINGS),
                      help='block_q:key_tile:num_warps:num_stages,... (default: the grid)')
  parser.add_argument('--out', default='benchmarks/out')
  args = parser.parse_args(argv)
  for dtype in args.dtypes:
    if dtype not in DTYPES:
      parser.error(f'--dtypes: {dtype!r} is not one of {", ".join(DTYPES)}')
  return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Runs the parts; returns the CSV's rows (dicts keyed by `COLUMNS`)."""
  args = _parse(argv)
  stages = args.stages.split(',')
  device = machine()
  print(f'device: {device}; jax {jax.__version__} ({jax.default_backend()}); heads {args.heads}, '
        f'head_dim {args.head_dim}, k {args.k}', flush=True)
  rows, best = [], None
  if 'check' in stages:
    for dtype, is_causal in itertools.product(args.dtypes, (False, True)):
      rows.append(check_kernel(args, dtype, is_causal))
      print(_line(rows[-1]), flush=True)
  if 'select' in stages:
    for row in selection_rows(args):
      rows.append(row)
      print(_line(row), flush=True)
  if 'tune' in stages:
    tuned, best = tuning_rows(args)
    rows += tuned
  for r in rows:
    r.update(device=device, jax=jax.__version__)
  write_csv(args.out, 'fused.csv', COLUMNS, rows)
  print('\n'.join(_line(r) for r in rows))
  if best is not None:
    with open(os.path.join(args.out, 'fused_options.json'), 'w') as f:
      json.dump({'compact': best}, f)
    print(f'fastest kernel options: {json.dumps(best)}')
  return rows


if __name__ == '__main__':
  main()
