"""Memory of top-k attention's forward+backward at lengths too long to run, as XLA compiles it.

Each --forms entry (`topk`, the unfused path; `topk_fused` and `topk_filter`, the fused variants
'compact' and 'filter'; `topk_filter_mix`, 'filter' with `mix_in_kernel`) is lowered and compiled,
never run, for abstract `[1, L, heads, head_dim]` inputs at each --lengths; `memory_analysis()`
gives its temporaries, arguments and outputs. Column `kernel`: whether the lowered program holds the
variant's kernel (`topk.fused.runs_kernel`): where a launch's arrays pass Triton's int32 offsets,
`topk_attention` runs the unfused path instead, and the row must say so. `fits`: temp + arguments +
outputs <= --memory_limit_gib.

On a GPU the kernels compile with Triton; on CPU (--fused_platforms cpu, the default there) they
compile in Pallas' interpreter, whose padded float32 copies of the inputs a GPU does not make.

  python -m benchmarks.compile_memory --out benchmarks/out
"""
import argparse
import time

import jax

import topk
from benchmarks.attention import (
    DTYPES,
    FUSED_FORMS,
    GIB,
    MIB,
    add_fused_options,
    fused_options,
    fwd_bwd,
    machine,
    write_csv,
)
from topk import fused

FORMS = ('topk', *FUSED_FORMS)
COLUMNS = ('device', 'jax', 'form', 'length', 'dtype', 'kernel', 'temp_mib', 'arg_mib',
           'out_mib', 'fits', 'compile_s', 'detail')


def measure(form: str, length: int, args: argparse.Namespace) -> dict:
  """One row: `form`'s forward+backward compiled at `length` (arguments as `_parse` gives)."""
  variant, mix_in_kernel = FUSED_FORMS.get(form, (None, False))
  options = dict(fused=False) if variant is None else dict(
      fused_options=fused_options(args, variant, mix_in_kernel))
  fn = topk.make_attention_fn('topk', k=args.k, query_chunk_size=args.chunk, **options)
  spec = jax.ShapeDtypeStruct((1, length, args.heads, args.head_dim), DTYPES[args.dtype])
  start = time.perf_counter()
  lowered = fwd_bwd(fn).lower(spec, spec, spec)
  memory = lowered.compile().memory_analysis()
  mib = lambda num_bytes: round(num_bytes / MIB, 2)
  total = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
           + memory.output_size_in_bytes)
  return dict(form=form, length=length, dtype=args.dtype,
              kernel=variant is not None and fused.runs_kernel(lowered, variant),
              temp_mib=mib(memory.temp_size_in_bytes),
              arg_mib=mib(memory.argument_size_in_bytes),
              out_mib=mib(memory.output_size_in_bytes),
              fits=total <= args.memory_limit_gib * GIB,
              compile_s=round(time.perf_counter() - start, 1),
              detail=f'heads {args.heads}, head_dim {args.head_dim}, k {args.k}, '
                     f'chunk {args.chunk}, fused on {",".join(args.fused_platforms)}')


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lengths', type=lambda s: [int(x) for x in s.split(',')],
                      default=[2**20])
  parser.add_argument('--forms', type=lambda s: s.split(','), default=list(FORMS))
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--k', type=int, default=64)
  parser.add_argument('--chunk', type=int, default=1024)
  parser.add_argument('--dtype', choices=list(DTYPES),
                      default='bfloat16' if jax.default_backend() == 'gpu' else 'float32')
  parser.add_argument('--memory_limit_gib', type=float, default=80.0)
  parser.add_argument('--out', default='benchmarks/out')
  add_fused_options(parser)
  if jax.default_backend() == 'cpu':
    parser.set_defaults(fused_platforms=('cpu',))
  args = parser.parse_args(argv)
  if not set(args.forms) <= set(FORMS):
    parser.error(f'--forms must be among {",".join(FORMS)}, got {",".join(args.forms)}')
  return args


def main(argv: list[str] | None = None) -> list[dict]:
  """Compiles every form at every length; writes compile_memory.csv after each row."""
  args = _parse(argv)
  device, rows = machine(), []
  for length in args.lengths:
    for form in args.forms:
      row = dict(device=device, jax=jax.__version__) | measure(form, length, args)
      rows.append(row)
      write_csv(args.out, 'compile_memory.csv', COLUMNS, rows)
      gib = {name: row[f'{name}_mib'] * MIB / GIB for name in ('temp', 'arg', 'out')}
      print(f'{form:>12} L={length:>8} {args.dtype:>8} kernel={row["kernel"]!s:>5} temp '
            f'{gib["temp"]:7.2f} GiB, arguments {gib["arg"]:5.2f}, outputs {gib["out"]:5.2f}; '
            f'fits {args.memory_limit_gib:g} GiB: {row["fits"]} ({row["compile_s"]} s)',
            flush=True)
  return rows


if __name__ == '__main__':
  main()
