"""Memory and speed of vanilla, chunked and top-k attention versus sequence length.

For each attention form and length: compiled temporary memory (XLA memory_analysis, forward and
forward+backward) and median wall time of the forward and forward+backward passes, plus the
forward time of the bare q @ k^T product. Writes a table to stdout, `attention.csv` and
`attention.png` under --out, the longest length whose compiled forward+backward fits
--budget_mib (compile only), and the target ratios (memory at L=8192, time at L=4096).

  python -m benchmarks.attention --lengths 1024,2048,4096,8192 --repeats 5
"""
import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import topk

MIB = 2**20


def _forms(k: int, chunk: int) -> dict[str, Callable[..., jax.Array]]:
  return {
      'vanilla': topk.make_attention_fn('vanilla'),
      'chunked': topk.make_attention_fn('chunked', query_chunk_size=chunk),
      'topk': topk.make_attention_fn('topk', k=k, query_chunk_size=chunk),
  }


def _fwd(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  return jax.jit(fn)


def fwd_bwd(fn: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, ...]]:
  """Jitted gradient of `sum(fn(q, k, v))` with respect to q, k and v."""
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                          argnums=(0, 1, 2)))


def _qk(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  del v
  return jnp.einsum('bqhd,bkhd->bhqk', q, k)


def _spec(args: argparse.Namespace, length: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((args.batch, length, args.heads, args.head_dim), jnp.float32)


def _memory(jitted: Callable[..., object], spec: jax.ShapeDtypeStruct) -> tuple[int, int]:
  """(temp bytes, temp + argument + output bytes) of the compiled function."""
  mem = jitted.lower(spec, spec, spec).compile().memory_analysis()
  return (mem.temp_size_in_bytes,
          mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)


def _median_seconds(jitted: Callable[..., object], inputs: tuple[jax.Array, ...],
                    repeats: int) -> float:
  jax.block_until_ready(jitted(*inputs))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _longest_fitting(fn: Callable[..., jax.Array], args: argparse.Namespace) -> int | None:
  """Longest power-of-two multiple of the smallest length whose fwd+bwd fits the budget."""
  best, length = None, min(args.lengths)
  while length <= args.max_search_length:
    if _memory(fwd_bwd(fn), _spec(args, length))[1] > args.budget_mib * MIB:
      break
    best, length = length, length * 2
  return best


def _plot(rows: list[dict[str, float]], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for form in sorted({r['form'] for r in rows}):
    mine = [r for r in rows if r['form'] == form]
    lengths = [r['length'] for r in mine]
    if form != 'qk_product':
      axes[0].plot(lengths, [r['fwd_bwd_temp_mib'] for r in mine], 'o-', label=form)
      axes[1].plot(lengths, [r['fwd_bwd_ms'] for r in mine], 'o-', label=f'{form} fwd+bwd')
    axes[1].plot(lengths, [r['fwd_ms'] for r in mine], 'x--', label=f'{form} fwd')
  for ax, label in zip(axes, ('fwd+bwd temp memory (MiB)', 'median time (ms)'), strict=True):
    ax.set(xscale='log', yscale='log', xlabel='sequence length', ylabel=label)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def ratio_line(name: str, numerator: float, denominator: float, target: float) -> str:
  ratio = numerator / denominator
  return f'{name}: {ratio:.3f} (target <= {target:.3f}: {"PASS" if ratio <= target else "FAIL"})'


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lengths', default='1024,2048,4096,8192',
                      type=lambda s: [int(x) for x in s.split(',')])
  parser.add_argument('--repeats', type=int, default=5, help='timed runs per measurement')
  parser.add_argument('--k', type=int, default=64, help='keys kept per query (topk)')
  parser.add_argument('--chunk', type=int, default=256, help='query chunk size')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--out', default='benchmarks/out', help='directory for CSV and PNG')
  parser.add_argument('--budget_mib', type=float, default=16 * 1024,
                      help='memory budget for the longest-length search (MiB)')
  parser.add_argument('--max_search_length', type=int, default=2**20,
                      help='stop the longest-length search here')
  args = parser.parse_args(argv)
  for name in ('repeats', 'k', 'chunk', 'batch', 'heads', 'head_dim'):
    topk.inputs.check_positive_int(getattr(args, name), f'--{name}')

  print(f'device: {jax.devices()[0].device_kind}; batch {args.batch}, heads {args.heads}, '
        f'head_dim {args.head_dim}, k {args.k}, chunk {args.chunk}, float32')
  forms = _forms(args.k, args.chunk)
  rows = []
  for length in args.lengths:
    spec = _spec(args, length)
    keys = jax.random.split(jax.random.key(length), 3)
    data = tuple(jax.random.normal(key, spec.shape, spec.dtype) for key in keys)
    rows.append({'form': 'qk_product', 'length': length, 'fwd_temp_mib': float('nan'),
                 'fwd_bwd_temp_mib': float('nan'), 'fwd_bwd_ms': float('nan'),
                 'fwd_ms': 1e3 * _median_seconds(jax.jit(_qk), data, args.repeats)})
    for form, fn in forms.items():
      forward, both = _fwd(fn), fwd_bwd(fn)
      rows.append({
          'form': form, 'length': length,
          'fwd_temp_mib': _memory(forward, spec)[0] / MIB,
          'fwd_bwd_temp_mib': _memory(both, spec)[0] / MIB,
          'fwd_ms': 1e3 * _median_seconds(forward, data, args.repeats),
          'fwd_bwd_ms': 1e3 * _median_seconds(both, data, args.repeats),
      })
      r = rows[-1]
      print(f'{form:>10} L={length:>6}  temp fwd {r["fwd_temp_mib"]:9.1f} MiB  fwd+bwd '
            f'{r["fwd_bwd_temp_mib"]:9.1f} MiB  time fwd {r["fwd_ms"]:9.2f} ms  fwd+bwd '
            f'{r["fwd_bwd_ms"]:9.2f} ms', flush=True)
    print(f'{"q@k^T":>10} L={length:>6}  time fwd {rows[-4]["fwd_ms"]:9.2f} ms', flush=True)

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'attention.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  _plot(rows, os.path.join(args.out, 'attention.png'))
  print(f'wrote {args.out}/attention.csv and {args.out}/attention.png')

  for form, fn in forms.items():
    print(f'longest length within {args.budget_mib:.0f} MiB (fwd+bwd, compiled): {form}: '
          f'{_longest_fitting(fn, args)}')

  at = {(r['form'], r['length']): r for r in rows}
  mem = {form: _memory(fwd_bwd(fn), _spec(args, 8192))[0] for form, fn in forms.items()
         if form != 'chunked'}  # compile-only, so it is checked at 8192 whatever --lengths says
  print(ratio_line('fwd+bwd temp memory at L=8192, topk / vanilla', mem['topk'], mem['vanilla'],
                    1 / 16))
  if ('topk', 4096) in at:
    t = {form: at[(form, 4096)]['fwd_bwd_ms'] for form in forms}
    print(ratio_line('fwd+bwd time at L=4096, topk / vanilla', t['topk'], t['vanilla'], 0.4))
    print(ratio_line('fwd+bwd time at L=4096, topk / chunked', t['topk'], t['chunked'], 1.0))
  else:
    print('time targets need L=4096 in --lengths')
  return rows


if __name__ == '__main__':
  main()
