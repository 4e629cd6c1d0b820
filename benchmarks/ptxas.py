"""Registers, spills and shared memory of the fused Pallas kernels on this GPU (`ptxas -v`).

A kernel that spills registers to local memory, or holds so many that few warps fit on an SM,
is slow for reasons no timing names. This compiles `topk_attention` (forward and backward) with
each fused variant at a small length in a child process that keeps their PTX
(`compile_kernels`), finds the PTX files that define the kernels (by `KERNEL_NAME`: the name
Pallas gives the kernel's entry function), runs `ptxas -v` on each for the target its
`.target` line names, and writes one row per kernel entry to ptxas.csv (and ptxas's own output
to ptxas_output.log) under --out.

Without a GPU, or without ptxas (on PATH, or in the `nvidia-cuda-nvcc` wheel jax's CUDA extra
installs), it says so and exits 0: the other GPU benchmarks go on.

  python -m benchmarks.ptxas --out benchmarks/out/gpu
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

import topk
from benchmarks.attention import machine, write_csv
from topk import fused

COLUMNS = ('device', 'jax', 'variant', 'entry', 'target', 'registers', 'spill_stores',
           'spill_loads', 'stack_bytes', 'smem_bytes', 'ptx_file')
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_FRAME = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads')
_USED = re.compile(r'Used (\d+) registers(?:.*?(\d+) bytes smem)?')


def parse_ptxas(text: str) -> list[dict]:
  """`ptxas -v` output -> one dict per entry function: entry, target, registers, spill_stores,
  spill_loads, stack_bytes, smem_bytes (0 where ptxas does not print them)."""
  rows, row = [], None
  for line in text.splitlines():
    if match := _ENTRY.search(line):
      row = dict(entry=match[1], target=match[2], registers=0, spill_stores=0, spill_loads=0,
                 stack_bytes=0, smem_bytes=0)
      rows.append(row)
    elif row is not None and (match := _FRAME.search(line)):
      row.update(stack_bytes=int(match[1]), spill_stores=int(match[2]),
                 spill_loads=int(match[3]))
    elif row is not None and (match := _USED.search(line)):
      row.update(registers=int(match[1]), smem_bytes=int(match[2] or 0))
  return rows


def ptx_target(ptx: str) -> str | None:
  """The `.target` a PTX text is written for (e.g. `sm_90a`), or None."""
  match = re.search(r'^\s*\.target\s+(sm_\w+)', ptx, re.MULTILINE)
  return match[1] if match else None


def defines(ptx: str, name: str) -> bool:
  """Whether a PTX text defines an entry function whose name contains `name`."""
  return re.search(rf'\.entry\s+\S*{re.escape(name)}', ptx) is not None


def find_ptxas() -> str | None:
  """ptxas on PATH, else the one in the `nvidia-cuda-nvcc` wheel, else None."""
  found = shutil.which('ptxas')
  if found:
    return found
  try:
    import nvidia.cuda_nvcc  # noqa: PLC0415 (installed with jax's CUDA extra only)
  except ImportError:
    return None
  for root in nvidia.cuda_nvcc.__path__:
    path = os.path.join(root, 'bin', 'ptxas')
    if os.access(path, os.X_OK):
      return path
  return None


def compile_kernels(length: int, heads: int, head_dim: int, k: int, dump: str) -> None:
  """Compiles forward+backward of `topk_attention` with each fused variant (bfloat16, causal)
  so that their PTX lands in `dump`: XLA writes it there with `--xla_dump_to` in XLA_FLAGS where
  it compiles the Triton kernels (jaxlib <= 0.10.2); where jax compiles them itself at lowering
  (later jaxlibs), the PTX it gets is written there too."""
  from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: PLC0415
  original = getattr(registration, 'triton', None)
  if original is not None and hasattr(original, 'compile'):
    def compile_and_keep(*a, **kw):
      result = original.compile(*a, **kw)
      with tempfile.NamedTemporaryFile('w', suffix='.ptx', dir=dump, delete=False) as f:
        f.write(result.asm)
      return result
    registration.triton = argparse.Namespace(compile=compile_and_keep)
  try:
    spec = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.bfloat16)
    for variant in fused.VARIANTS:
      fn = topk.make_attention_fn('topk', k=k, query_chunk_size=min(length, 1024),
                                  is_causal=True,
                                  fused_options=fused.FusedOptions(variant=variant))
      loss = lambda q, key, v, fn=fn: jnp.sum(fn(q, key, v).astype(jnp.float32))
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
  finally:
    if original is not None:
      registration.triton = original


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=4096)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--k', type=int, default=64)
  parser.add_argument('--out', default='benchmarks/out')
  parser.add_argument('--compile_into', default=None,
                      help='(the child process) compile the kernels, their PTX into this folder')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
  """Rows of ptxas.csv (none, with a message, where there is no GPU or no ptxas)."""
  args = _parse(argv)
  if args.compile_into:
    compile_kernels(args.length, args.heads, args.head_dim, args.k, args.compile_into)
    return []
  if jax.default_backend() != 'gpu':
    print(f'ptxas: no GPU here (backend {jax.default_backend()}): nothing to measure')
    return []
  ptxas = find_ptxas()
  if ptxas is None:
    print('ptxas: no ptxas on PATH or in the nvidia-cuda-nvcc wheel: nothing to measure')
    return []
  rows, logs = [], []
  with tempfile.TemporaryDirectory() as dump:
    env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} --xla_dump_to={dump}')
    child = [sys.executable, '-m', 'benchmarks.ptxas', f'--compile_into={dump}',
             *(f'--{n}={getattr(args, n)}' for n in ('length', 'heads', 'head_dim', 'k'))]
    subprocess.run(child, env=env, check=True)
    for path in sorted(glob.glob(os.path.join(dump, '**', '*.ptx'), recursive=True)):
      with open(path) as f:
        ptx = f.read()
      variants = [v for v, x in fused.VARIANTS.items() if defines(ptx, x.kernel_name)]
      if not variants:
        continue
      result = subprocess.run([ptxas, '-v', f'--gpu-name={ptx_target(ptx)}', path, '-o',
                               os.devnull], capture_output=True, text=True, check=False)
      logs.append(f'== {os.path.basename(path)}\n{result.stdout}{result.stderr}')
      for row in parse_ptxas(result.stdout + result.stderr):
        variant = next((v for v in variants if fused.VARIANTS[v].kernel_name in row['entry']),
                       None)
        if variant is not None:
          rows.append(dict(device=machine(), jax=jax.__version__, variant=variant,
                           ptx_file=os.path.basename(path)) | row)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'ptxas_output.log'), 'w') as f:
    f.write('\n'.join(logs))
  write_csv(args.out, 'ptxas.csv', COLUMNS, rows)
  if not rows:
    print('ptxas: no PTX in the dump defines a fused kernel (ptxas_output.log has what ran)')
  for row in rows:
    print(f'{row["variant"]:>8} {row["entry"][:40]:<40} {row["target"]}: {row["registers"]} '
          f'registers, spills {row["spill_stores"]}/{row["spill_loads"]} bytes, '
          f'smem {row["smem_bytes"]} bytes', flush=True)
  return rows


if __name__ == '__main__':
  main()
