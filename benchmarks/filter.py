"""The one-pass filter kernel (`topk.filter`, experimental, off by default) on one GPU.

1. check: `filter.kept_top_k` against `lax.top_k` of the dense masked scores at --check_length
   (bfloat16 and float32, without and with a causal mask), compiled for the device; and the
   select-and-mix kernel (`topk.select_mix`) against `filter.select` and the XLA mix.
2. time: at each --lengths, the filter kernel alone (candidates + select) for each --tilings
   against the present kernel (`fused.kept_top_k`, its defaults), forward only, with the mean
   candidates per row (entries >= t) and the fraction of rows flagged for redo.

Writes filter.csv under --out after every row (a crash keeps what ran). On CPU the kernels run
in Pallas' interpreter: only tiny shapes are practical (a test does that).

  python -m benchmarks.filter --out benchmarks/out/gpu
"""
import argparse
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.attention import DTYPES, machine, median_seconds, write_csv
from topk import filter as filt
from topk import fused, inputs, select_mix
from topk.topk_attention import _mix_rows

COLUMNS = ('device', 'jax', 'stage', 'name', 'dtype', 'length', 'causal', 'ms', 'ratio',
           'candidates', 'redo', 'detail')
# (block_q, key_tile, num_warps, stride)
TILINGS = ((64, 64, 4, 8), (64, 128, 8, 8), (128, 64, 8, 8), (32, 128, 4, 8))
OPTION_NAMES = ('block_q', 'key_tile', 'num_warps', 'stride')


def _qk(length, heads, head_dim, dtype, seed):
  keys = jax.random.split(jax.random.key(seed), 2)
  return tuple(jax.random.normal(key, (1, length, heads, head_dim), dtype) for key in keys)


def _filter_fn(k, is_causal, interpret, **options):
  def run(q, key):
    can = inputs.canonicalize(q, key, key, is_causal=is_causal)
    cands = filt.candidates(can, k, interpret=interpret, options=filt.Options(**options))
    kept, idx, redo = filt.select(cands, k)
    return kept, idx, redo, cands.above
  return jax.jit(run)


def _fused_fn(k, is_causal, interpret):
  def run(q, key):
    return fused.kept_top_k(inputs.canonicalize(q, key, key, is_causal=is_causal), k,
                            interpret=interpret)
  return jax.jit(run)


def _dense_fn(k, is_causal):
  def run(q, key):
    can = inputs.canonicalize(q, key, key, is_causal=is_causal)
    return jax.lax.top_k(inputs.chunk_scores(can, 0, can.query, None), k)
  return jax.jit(run)


def check(args, dtype, is_causal, interpret):
  q, key = _qk(args.check_length, args.heads, args.head_dim, DTYPES[dtype], seed=1)
  options = dict(zip(OPTION_NAMES, args.tilings[0], strict=True)) | args.small
  kept, idx, redo, above = map(np.asarray, _filter_fn(args.k, is_causal, interpret,
                                                      **options)(q, key))
  want_kept, want_idx = map(np.asarray, _dense_fn(args.k, is_causal)(q, key))
  ok = ~redo
  row = dict(stage='check', name='filter', dtype=dtype, length=args.check_length,
             causal=is_causal, candidates=float(above.mean()), redo=float(redo.mean()))
  if not ok.any():
    return row | dict(detail='FAIL: every row flagged for redo')
  error = float(np.max(np.abs(kept[ok] - want_kept[ok]) / (1 + np.abs(want_kept[ok]))))
  agree = float(np.mean(idx[ok] == want_idx[ok]))
  passed = error <= args.tolerance and agree >= 0.99 and np.isfinite(kept[ok]).all()
  return row | dict(detail=f'{"PASS" if passed else "FAIL"}: max relative kept-score error '
                    f'{error:.2e} (<= {args.tolerance:g}), indices equal {agree:.4%} (>= 99%)')


def _mix_fn(k, is_causal, interpret, **options):
  """The select-and-mix kernel on the filter's candidates, and `filter.select` with the XLA mix
  of the same candidates (`topk_attention`'s two ways to finish the forward)."""
  def run(q, key, value):
    can = inputs.canonicalize(q, key, value, is_causal=is_causal)
    cands = filt.candidates(can, k, interpret=interpret, options=filt.Options(**options))
    out, kept, idx, redo = select_mix.select_and_mix(cands, can.value, k, can.weights_dtype,
                                                     interpret=interpret)
    want_kept, want_idx, _ = filt.select(cands, k)
    want = _mix_rows(jax.nn.softmax(want_kept), want_idx, can.value, can.weights_dtype)
    # Both by descending score, ties by key: the kernel keeps slot order.
    order = lambda kept, idx: jax.lax.sort((-kept, idx), num_keys=2)[1]
    return out, want, order(kept, idx), order(want_kept, want_idx), redo
  return jax.jit(run)


def check_mix(args, dtype, is_causal, interpret):
  """The select-and-mix kernel against `filter.select` and the XLA mix, on the device."""
  q, key = _qk(args.check_length, args.heads, args.head_dim, DTYPES[dtype], seed=1)
  value = _qk(args.check_length, args.heads, args.head_dim, DTYPES[dtype], seed=2)[0]
  options = dict(zip(OPTION_NAMES, args.tilings[0], strict=True)) | args.small
  out, want, idx, want_idx, redo = map(np.asarray, _mix_fn(args.k, is_causal, interpret,
                                                           **options)(q, key, value))
  ok = ~redo
  row = dict(stage='check', name='select_mix', dtype=dtype, length=args.check_length,
             causal=is_causal, redo=float(redo.mean()))
  if not ok.any():
    return row | dict(detail='FAIL: every row flagged for redo')
  # Weights rounded to bfloat16 may round one step apart where Triton's exp differs from XLA's.
  tolerance = args.tolerance if dtype == 'float32' else 2e-2
  error = float(np.max(np.abs(out[ok] - want[ok])) / (1 + np.max(np.abs(want[ok]))))
  agree = float(np.mean(np.all(idx[ok] == want_idx[ok], axis=-1)))
  passed = error <= tolerance and agree >= 0.99 and np.isfinite(out[ok]).all()
  return row | dict(detail=f'{"PASS" if passed else "FAIL"}: max output error {error:.2e} '
                    f'(<= {tolerance:g}, relative to the largest), rows with the same kept '
                    f'keys {agree:.4%} (>= 99%)')


def timing(args, length, is_causal, interpret, emit):
  dtype = args.dtypes[0]
  q, key = _qk(length, args.heads, args.head_dim, DTYPES[dtype], seed=3)
  time_ms = lambda fn: 1e3 * median_seconds(lambda: jax.block_until_ready(fn(q, key)),
                                            args.repeats)
  base = dict(stage='time', dtype=dtype, length=length, causal=is_causal)
  present = math.nan
  try:
    fn = _fused_fn(args.k, is_causal, interpret)
    redo = float(jnp.mean(fn(q, key)[2]))
    present = time_ms(fn)
    emit(base | dict(name='present fused', ms=present, ratio=1.0, redo=redo))
  except Exception as e:  # noqa: BLE001 (reported, the rest runs)
    emit(base | dict(name='present fused', detail=f'failed: {type(e).__name__}: '
                     f'{str(e).splitlines()[0][:160]}'))
  for tiling in args.tilings:
    options = dict(zip(OPTION_NAMES, tiling, strict=True)) | args.small
    row = base | dict(name='filter ' + ' '.join(f'{n}={x}' for n, x in options.items()))
    try:
      fn = _filter_fn(args.k, is_causal, interpret, **options)
      start = time.perf_counter()
      _, _, redo, above = fn(q, key)
      row.update(detail=f'compile+first run {time.perf_counter() - start:.1f} s',
                 redo=float(jnp.mean(redo)), candidates=float(jnp.mean(above)))
      row['ms'] = time_ms(fn)
      row['ratio'] = row['ms'] / present
    except Exception as e:  # noqa: BLE001
      row['detail'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}'
    emit(row)


def _line(row):
  ms = row.get('ms', math.nan)
  return (f'{row["stage"]:>5} {row["name"][:58]:<58} {row["dtype"]:>8} L={row["length"]:>6} '
          f'causal={row["causal"]!s:<5} {"" if math.isnan(ms) else f"{ms:9.3f} ms"} '
          f'cand={row.get("candidates", math.nan):.1f} redo={row.get("redo", math.nan):.2e} '
          f'{row.get("detail", "")}')


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--stages', default='check,time')
  parser.add_argument('--lengths', type=lambda s: [int(x) for x in s.split(',')],
                      default=[16384, 65536])
  parser.add_argument('--check_length', type=int, default=2048)
  parser.add_argument('--dtypes', type=lambda s: s.split(','), default=['bfloat16', 'float32'])
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--k', type=int, default=64)
  parser.add_argument('--causal', type=lambda s: [x == 'true' for x in s.split(',')],
                      default=[False, True], help='timed causal settings: false,true')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--tolerance', type=float, default=1e-3)
  parser.add_argument('--tilings', type=lambda s: [tuple(int(x) for x in v.split(':'))
                                                    for v in s.split(',')],
                      default=list(TILINGS), help='block_q:key_tile:num_warps:stride,...')
  parser.add_argument('--small', type=lambda s: dict(
      (kv.split('=')[0], int(kv.split('=')[1])) for kv in s.split(',')) if s else {},
      default={}, help='extra filter options, e.g. groups=16 (tiny CPU runs)')
  parser.add_argument('--out', default='benchmarks/out')
  return parser.parse_args(argv)


def main(argv=None):
  args = _parse(argv)
  stages = args.stages.split(',')
  device, interpret = machine(), jax.default_backend() != 'gpu'
  print(f'device: {device}; jax {jax.__version__} ({jax.default_backend()}); heads '
        f'{args.heads}, head_dim {args.head_dim}, k {args.k}', flush=True)
  rows = []

  def emit(row):
    row.update(device=device, jax=jax.__version__)
    for name in COLUMNS:
      row.setdefault(name, math.nan if name in ('ms', 'ratio', 'candidates', 'redo') else '')
    rows.append(row)
    print(_line(row), flush=True)
    write_csv(args.out, 'filter.csv', COLUMNS, rows)

  if 'check' in stages:
    for dtype, is_causal in itertools.product(args.dtypes, (False, True)):
      emit(check(args, dtype, is_causal, interpret))
      emit(check_mix(args, dtype, is_causal, interpret))
  if 'time' in stages:
    for length, is_causal in itertools.product(args.lengths, args.causal):
      timing(args, length, is_causal, interpret, emit)
  return rows


if __name__ == '__main__':
  main()
