"""Top-k selection along the last axis: the one place `topk_attention` selects keys.

Contract of `jax.lax.top_k`: values in descending order, int32 indices, ties broken by the
lower index first. Floats follow the IEEE total order, as XLA's TopK does on CPU:
-NaN < -inf < ... < -0 < +0 < ... < inf < +NaN, so NaNs rank above every number (bfloat16 is
compared as float32, so its NaNs tie with, and come back as, the quiet NaN of their sign).

Exact selection runs one method per platform, chosen with `jax.lax.platform_dependent` from
`DEFAULT_METHODS` (platform -> name in `METHODS`), every method equal to `lax.top_k`:
* 'ffi' (CPU): an exact C++ kernel (`csrc/topk_select.cc`, built into `LIBRARY` by
  `pip install .` or `make build`) registered through the XLA FFI; XLA's own CPU TopK is several
  times slower than the score product it follows. AVX2 where the processor has it (checked at run
  time, `ISA`), portable code elsewhere. Without the library CPU uses 'lax'.
* 'pallas' (a Triton compaction kernel; default on NVIDIA GPUs) and 'two_stage' (plain XLA;
  default on ROCm): see `topk.select_gpu`.
  XLA's GPU TopK sorts whole rows for k > 16.
* 'lax': `jax.lax.top_k`, for other platforms and for dtypes a method does not take.
A caller picks another method with `method=` (`top_k`'s argument, `topk.AttentionSpec.method`),
which then runs on every platform ('ffi' on CPU only). A method forced on a platform it does not
target still runs there ('pallas' in Pallas' interpreter off GPU), which is how the tests run the
GPU paths on CPU.
"""
import ctypes
import functools
import logging
import pathlib
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from topk import select_gpu

LIBRARY = pathlib.Path(__file__).resolve().with_name('libtopk_select.so')
_TARGET = 'topk_select'
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


def _register() -> tuple[str, str | None]:
  """Registers the kernel for CPU if the library is built; returns the active backend and ISA.

  The library has one place, `LIBRARY` next to this module, whichever way `topk` came: setup.py
  compiles it there, into the wheel for `pip install .` and into the checkout's `topk/` for
  `make build` (`setup.py build_ext --inplace`).
  """
  log = logging.getLogger(__name__)
  if not LIBRARY.exists():
    log.warning('top-k selection on CPU: lax.top_k (%s not built; run `make build`)', LIBRARY)
    return 'lax', None
  try:
    library = ctypes.cdll.LoadLibrary(str(LIBRARY))
  except OSError as error:  # e.g. built on another machine; selection still works without it.
    log.warning('top-k selection on CPU: lax.top_k (cannot load %s: %s)', LIBRARY, error)
    return 'lax', None
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.TopkSelect), platform='cpu')
  library.TopkSelectIsa.restype = ctypes.c_char_p
  isa = library.TopkSelectIsa().decode()
  log.info('top-k selection: FFI kernel %s (%s) on CPU', LIBRARY, isa)
  return 'ffi', isa


_CPU_METHOD, ISA = _register()  # ISA: 'avx2' or 'portable' with the kernel, else None.
_GPU_PLATFORMS = ('cuda', 'rocm')


def _ffi_top_k(scores: jax.Array, k: int, vectorized: bool = True) -> tuple[jax.Array, jax.Array]:
  """The kernel's selection; `vectorized=False` forces its portable code (for tests)."""
  shape = scores.shape[:-1] + (k,)
  return jax.ffi.ffi_call(
      _TARGET,
      (jax.ShapeDtypeStruct(shape, scores.dtype), jax.ShapeDtypeStruct(shape, jnp.int32)),
      vmap_method='broadcast_all')(scores, vectorized=vectorized)


# Exact methods: name -> (fn(scores, k, platform), dtypes it takes; None: all of lax.top_k's).
METHODS: dict[str, tuple[Callable[[jax.Array, int, str], tuple[jax.Array, jax.Array]],
                         tuple[Any, ...] | None]] = {
    'lax': (lambda s, k, platform: tuple(jax.lax.top_k(s, k)), None),
    'ffi': (lambda s, k, platform: _ffi_top_k(s, k), _KERNEL_DTYPES),
    'two_stage': (lambda s, k, platform: select_gpu.two_stage_top_k(s, k), None),
    'pallas': (lambda s, k, platform: select_gpu.pallas_top_k(
        s, k, interpret=platform not in _GPU_PLATFORMS), select_gpu.PALLAS_DTYPES),
}
# What exact selection runs per platform unless a method is given ('default': any other
# platform, e.g. TPU). On one H100 (jax 0.11.2, [4096, 16384] scores, k 64) 'pallas' took
# 0.61 ms in bfloat16 and 0.79 ms in float32, 'two_stage' 1.9 and 3.4 ms, `lax.top_k` 2.5 and
# 5.3 ms; ROCm keeps 'two_stage' (plain XLA: the Triton kernel is untested there). Read-only: a
# caller chooses with `method=`, so two models in one process can select differently.
DEFAULT_METHODS: Mapping[str, str] = types.MappingProxyType(
    {'cpu': _CPU_METHOD, 'cuda': 'pallas', 'rocm': 'two_stage', 'default': 'lax'})


def check_method(method: str | None) -> None:
  """Raises ValueError unless `method` is None (`DEFAULT_METHODS`) or a key of `METHODS` that
  runs here ('ffi' needs the built library)."""
  if method is not None and method not in METHODS:
    raise ValueError(f'top_k: method must be one of {sorted(METHODS)} or None, got {method!r}')
  if method == 'ffi' and _CPU_METHOD != 'ffi':
    raise ValueError(f"top_k: 'ffi' runs on CPU only and needs {LIBRARY} (`make build`)")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _exact_top_k(scores: jax.Array, k: int,
                 backend: tuple[tuple[str, str], ...]) -> tuple[jax.Array, jax.Array]:
  """Exact selection with `backend`'s `(platform, method)` pairs, every method taking the dtype."""
  branches = {platform: functools.partial(METHODS[name][0], k=k, platform=platform)
              for platform, name in backend}
  return jax.lax.platform_dependent(scores, **branches)


@_exact_top_k.defjvp
def _exact_top_k_jvp(k, backend, primals, tangents):
  # As lax.top_k: the values' tangent is the input tangent gathered at the selected indices.
  (scores,), (tangent,) = primals, tangents
  values, indices = _exact_top_k(scores, k, backend)
  value_tangent = jnp.take_along_axis(tangent, indices, axis=-1)
  return (values, indices), (value_tangent, np.zeros(indices.shape, jax.dtypes.float0))


def _exact(scores: jax.Array, k: int, method: str | None) -> tuple[jax.Array, jax.Array]:
  """Exact selection with `method` on every platform ('ffi': on CPU only), None:
  `DEFAULT_METHODS`; a method that does not take the dtype gives way to 'lax'."""
  backend = dict(DEFAULT_METHODS)
  if method == 'ffi':  # The kernel exists on CPU only.
    backend['cpu'] = method
  elif method is not None:
    backend = dict.fromkeys(backend, method)
  takes = lambda name: METHODS[name][1] is None or scores.dtype in METHODS[name][1]
  backend = tuple((platform, name if takes(name) else 'lax') for platform, name in backend.items())
  if all(name == 'lax' for _, name in backend):
    return tuple(jax.lax.top_k(scores, k))
  return _exact_top_k(scores, k, backend)


# Selections: name -> fn(scores, k, method, recall_target).
SELECTIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    'exact': lambda s, k, method, recall_target: _exact(s, k, method),
    'approximate': lambda s, k, method, recall_target: tuple(
        jax.lax.approx_max_k(s, k, recall_target=recall_target)),
}


def check_selection(selection: str, recall_target: float, method: str | None) -> None:
  """Raises ValueError unless `selection` is a key of `SELECTIONS`, 0 < recall_target <= 1
  (checked for every selection: a bad value is bad) and `method` passes `check_method` (and is
  None unless the selection is exact)."""
  if selection not in SELECTIONS:
    raise ValueError(f'Unknown selection {selection!r}; valid selections: '
                     f'{sorted(SELECTIONS)}.')
  if (isinstance(recall_target, bool) or not isinstance(recall_target, (int, float))
      or not 0 < recall_target <= 1):
    raise ValueError(f'recall_target must be a number in (0, 1], got {recall_target!r}.')
  check_method(method)
  if selection != 'exact' and method is not None:
    raise ValueError(f'top_k: method applies to exact selection only, got {selection!r}')


def unchecked_top_k(scores: jax.Array, k: int, selection: str, recall_target: float,
                    method: str | None) -> tuple[jax.Array, jax.Array]:
  """`top_k` of arguments already valid (`check_selection`, `0 <= k <= n`), for callers that
  validated them where they were given: `(values [..., k], indices int32 [..., k])`."""
  return SELECTIONS[selection](scores, k, method, recall_target)


def top_k(scores: jax.Array, k: int, *, selection: str = 'exact', recall_target: float = 0.95,
          method: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Returns the `k` largest entries of `scores [..., n]` and their indices, `[..., k]` each.

  Args:
    scores: real (integer or floating) array `[..., n]`.
    k: number of entries to select, an int with 0 <= k <= n.
    selection: a key of `SELECTIONS`: 'exact' (equal to `jax.lax.top_k`) or 'approximate'
      (`jax.lax.approx_max_k`: trades exactness for speed on TPU; exact on CPU and GPU).
    recall_target: expected fraction of the true top k found by 'approximate', in (0, 1].
    method: a key of `METHODS` forcing that exact method on every platform (only on CPU for
      'ffi'), or None: `DEFAULT_METHODS`' choice per platform.

  Returns:
    `(values [..., k], indices int32 [..., k])`, values in descending order.
  """
  dtype = scores.dtype if hasattr(scores, 'dtype') else np.asarray(scores).dtype
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise ValueError(f'top_k: scores must be a real (integer or floating) array, got {dtype}')
  scores = jnp.asarray(scores)
  if scores.ndim == 0:
    raise ValueError('top_k: scores must have at least one axis, got a scalar')
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
    raise ValueError(f'top_k: k must be an int, got {k!r} ({type(k).__name__})')
  if not 0 <= k <= scores.shape[-1]:
    raise ValueError(
        f'top_k: k must be in [0, {scores.shape[-1]}] (the last axis of scores), got {k}')
  check_selection(selection, recall_target, method)
  return unchecked_top_k(scores, int(k), selection, recall_target, method)
