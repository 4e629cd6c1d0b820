"""Speed of top-k selection and top-k attention against exact baselines, with their targets.

Queries are processed in chunks as in `topk_attention`: per chunk, scores
`[heads, chunk, L] = q_chunk @ k^T`, then the top `k` keys per query. All cases run in one
process, interleaved round by round; each reports its best wall and CPU seconds, and ratios:
forwards against the bare product, forward+backward passes against exact query-chunked
attention. PyTorch's fused exact attention (`scaled_dot_product_attention`, forward+backward) is
timed too when torch is installed (`pip install torch==2.13.0`; not a project requirement).

  python -m benchmarks.select [--length 4096 --heads 8 --head_dim 64 --chunk 256 --k 64]
"""
import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import topk
from benchmarks.attention import fwd_bwd, ratio_line
from topk import inputs, select

Case = tuple[Callable[..., object], tuple]


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


def _torch_case(query: jax.Array, key: jax.Array, value: jax.Array) -> Case | None:
  """PyTorch's fused exact attention, forward+backward, or None without torch."""
  try:
    import numpy as np
    import torch
  except ImportError:
    return None
  q, k, v = (torch.tensor(np.asarray(x).transpose(1, 0, 2)[None], requires_grad=True)
             for x in (query, key, value))  # [1, heads, L, dim]

  def run() -> float:
    for x in (q, k, v):
      x.grad = None
    torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    return float(q.grad[0, 0, 0, 0])

  return run, ()


def _time(cases: dict[str, Case], repeats: int) -> dict[str, tuple[float, float]]:
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


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=4096)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--chunk', type=int, default=256)
  parser.add_argument('--k', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)
  for name in ('length', 'heads', 'head_dim', 'chunk', 'k', 'repeats'):
    inputs.check_positive_int(getattr(args, name), f'--{name}')
  if args.length % args.chunk:
    parser.error(f'--chunk ({args.chunk}) must divide --length ({args.length})')

  rng_q, rng_k, rng_v = jax.random.split(jax.random.key(0), 3)
  shape = (args.length, args.heads, args.head_dim)
  query, key, value = (jax.random.normal(r, shape) for r in (rng_q, rng_k, rng_v))
  k, chunk = args.k, args.chunk
  selections = {
      'q@k^T': None,
      'q@k^T + lax.top_k': lambda s: jax.lax.top_k(s, k),
      f'q@k^T + select.top_k ({dict(select.DEFAULT_METHODS)})': lambda s: select.top_k(s, k),
  }
  cases: dict[str, Case] = {
      name: (jax.jit(lambda q, kk, fn=fn: _chunked(q, kk, chunk, fn)), (query, key))
      for name, fn in selections.items()}
  top = topk.make_attention_fn('topk', k=k, query_chunk_size=chunk)
  exact = topk.make_attention_fn('chunked', query_chunk_size=chunk)
  batched = (query[None], key[None], value[None])  # flax's layout [batch, L, heads, dim]
  cases['topk_attention forward'] = (jax.jit(top), batched)
  cases['topk_attention fwd+bwd'] = (fwd_bwd(top), batched)
  cases['chunked_attention fwd+bwd'] = (fwd_bwd(exact), batched)
  torch_case = _torch_case(query, key, value)
  if torch_case is not None:
    cases['torch sdpa fwd+bwd'] = torch_case

  print(f'L={args.length} heads={args.heads} head_dim={args.head_dim} chunk={chunk} k={k} '
        f'backend={jax.default_backend()} selection={dict(select.DEFAULT_METHODS)} ({select.ISA})')
  times = _time(cases, args.repeats)
  bare, exact_bwd = times['q@k^T'], times['chunked_attention fwd+bwd']
  print(f'{"":>36}  {"wall s":>7}  {"CPU s":>7}  ratio (wall / CPU)')
  for name, (wall, cpu) in times.items():
    base, base_name = (exact_bwd, 'chunked fwd+bwd') if 'bwd' in name else (bare, 'q@k^T')
    print(f'{name:>36}: {wall:7.3f}  {cpu:7.3f}  {wall / base[0]:5.2f}x / {cpu / base[1]:5.2f}x '
          f'{base_name}')

  wall = {name: seconds[0] for name, seconds in times.items()}
  print(ratio_line('topk_attention forward / q@k^T', wall['topk_attention forward'],
                   wall['q@k^T'], 1.5))
  print(ratio_line('topk_attention fwd+bwd / chunked fwd+bwd', wall['topk_attention fwd+bwd'],
                   wall['chunked_attention fwd+bwd'], 0.6))
  if torch_case is None:
    print('torch not installed: PyTorch comparison skipped (pip install torch==2.13.0)')
  else:
    print(ratio_line('topk_attention fwd+bwd / torch sdpa fwd+bwd',
                     wall['topk_attention fwd+bwd'], wall['torch sdpa fwd+bwd'], 1.0))
  return times


if __name__ == '__main__':
  main()
