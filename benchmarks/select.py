"""Benchmark of top-k selection against the score product it follows (issue 7).

Queries are processed in chunks as in `topk_attention`: per chunk, scores
`[heads, chunk, L] = q_chunk @ k^T`, then the top `k` keys per query. Times are measured in one
process, interleaved, and reported as ratios to the bare product, in wall and in CPU seconds.

  python -m benchmarks.select [--length 4096 --heads 8 --head_dim 64 --chunk 256 --k 64]
"""
import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from topk import select, topk_attention


def _chunked(query: jax.Array, key: jax.Array, chunk: int,
             select_fn: Callable[[jax.Array], object] | None) -> object:
  """Score chunks `[heads, chunk, L]` of `query, key [L, heads, dim]`, each fed to `select_fn`.

  Without `select_fn` the loop only computes the product: each chunk's scores overwrite the
  loop state, so nothing but the product is timed and none of it can be skipped.
  """
  length, heads, dim = query.shape
  chunks = query.reshape(length // chunk, chunk, heads, dim)
  scores = lambda q: jnp.einsum('qhd,khd->hqk', q, key)
  if select_fn is None:
    return jax.lax.fori_loop(0, length // chunk, lambda i, _: scores(chunks[i]),
                             jnp.zeros((heads, chunk, length), query.dtype))
  return jax.lax.map(lambda q: select_fn(scores(q)), chunks)


def _time(cases: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, tuple[float, float]]:
  """Best (wall, process CPU) seconds per case over `repeats` rounds, after a compiling call.

  Rounds visit every case in turn, so load from other processes hits all cases alike; CPU
  seconds (all threads) are steadier than wall time on a shared machine.
  """
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  best = {name: (float('inf'), float('inf')) for name in cases}
  for _ in range(repeats):
    for name, (fn, args) in cases.items():
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=4096)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--chunk', type=int, default=256)
  parser.add_argument('--k', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  rng_q, rng_k, rng_v = jax.random.split(jax.random.key(0), 3)
  shape = (args.length, args.heads, args.head_dim)
  query, key, value = (jax.random.normal(r, shape) for r in (rng_q, rng_k, rng_v))
  k = args.k
  selections = {
      'q@k^T': None,
      'q@k^T + lax.top_k': lambda s: jax.lax.top_k(s, k),
      f'q@k^T + select.top_k ({select.BACKEND})': lambda s: select.top_k(s, k),
  }
  cases = {
      name: (jax.jit(lambda q, kk, fn=fn: _chunked(q, kk, args.chunk, fn)), (query, key))
      for name, fn in selections.items()}
  # Batch of one: the flax layout [batch, L, heads, dim].
  cases['topk_attention forward'] = (jax.jit(lambda q, kk, v: topk_attention(
      q[None], kk[None], v[None], k=k, query_chunk_size=args.chunk, deterministic=True)),
                                     (query, key, value))
  print(f'L={args.length} heads={args.heads} head_dim={args.head_dim} chunk={args.chunk} '
        f'k={k} backend={jax.default_backend()} devices={jax.device_count()}')
  times = _time(cases, args.repeats)
  bare_wall, bare_cpu = times['q@k^T']
  print(f'{"":>34}  {"wall s":>7} {"ratio":>6}  {"CPU s":>7} {"ratio":>6}')
  for name, (wall, cpu) in times.items():
    print(f'{name:>34}: {wall:7.3f} {wall / bare_wall:5.2f}x  {cpu:7.3f} {cpu / bare_cpu:5.2f}x')


if __name__ == '__main__':
  main()
