"""Top-k selection along the last axis: the one place `topk_attention` selects keys.

Contract of `jax.lax.top_k`: values in descending order, int32 indices, ties broken by the
lower index first. Floats follow the IEEE total order, as XLA's TopK does on CPU:
-NaN < -inf < ... < -0 < +0 < ... < inf < +NaN, so NaNs rank above every number (bfloat16 is
compared as float32, so its NaNs tie with, and come back as, the quiet NaN of their sign).

On CPU, float32 and bfloat16 scores go through an exact C++ kernel (`csrc/topk_select.cc`,
built by `make build` into `build/libtopk_select.so`) registered through the XLA FFI; XLA's
own CPU TopK is several times slower than the score product it follows. The kernel uses AVX2
where the processor has it (checked at run time) and portable code elsewhere. Other backends,
other dtypes, or a missing library use `jax.lax.top_k`. `BACKEND` and `ISA` say which is active.
"""
import ctypes
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / 'build' / 'libtopk_select.so'
_TARGET = 'topk_select'
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


def _register() -> tuple[str, str | None]:
  """Registers the kernel for CPU if the library is built; returns the active backend and ISA."""
  log = logging.getLogger(__name__)
  if not LIBRARY.exists():
    log.warning('top-k selection: lax.top_k (%s not built; run `make build`)', LIBRARY)
    return 'lax', None
  try:
    library = ctypes.cdll.LoadLibrary(str(LIBRARY))
  except OSError as error:  # e.g. built on another machine; selection still works without it.
    log.warning('top-k selection: lax.top_k (cannot load %s: %s)', LIBRARY, error)
    return 'lax', None
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.TopkSelect), platform='cpu')
  library.TopkSelectIsa.restype = ctypes.c_char_p
  isa = library.TopkSelectIsa().decode()
  log.info('top-k selection: FFI kernel %s (%s) on CPU', LIBRARY, isa)
  return 'ffi', isa


# 'ffi' or 'lax'; with 'ffi', the kernel's instruction set on this machine: 'avx2' or 'portable'.
BACKEND, ISA = _register()


def _ffi_top_k(scores: jax.Array, k: int, vectorized: bool = True) -> tuple[jax.Array, jax.Array]:
  """The kernel's selection; `vectorized=False` forces its portable code (for tests)."""
  shape = scores.shape[:-1] + (k,)
  return jax.ffi.ffi_call(
      _TARGET,
      (jax.ShapeDtypeStruct(shape, scores.dtype), jax.ShapeDtypeStruct(shape, jnp.int32)),
      vmap_method='broadcast_all')(scores, vectorized=vectorized)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _exact_top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  return jax.lax.platform_dependent(
      scores, cpu=lambda s: _ffi_top_k(s, k), default=lambda s: tuple(jax.lax.top_k(s, k)))


@_exact_top_k.defjvp
def _exact_top_k_jvp(k, primals, tangents):
  # As lax.top_k: the values' tangent is the input tangent gathered at the selected indices.
  (scores,), (tangent,) = primals, tangents
  values, indices = _exact_top_k(scores, k)
  value_tangent = jnp.take_along_axis(tangent, indices, axis=-1)
  return (values, indices), (value_tangent, np.zeros(indices.shape, jax.dtypes.float0))


def top_k(scores: jax.Array, k: int, *, approximate: bool = False,
          recall_target: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Returns the `k` largest entries of `scores [..., n]` and their indices, `[..., k]` each.

  Args:
    scores: array `[..., n]`, n >= k.
    k: number of entries to select, 0 <= k <= n.
    approximate: use `jax.lax.approx_max_k`, which trades exactness for speed on TPU (exact
      on CPU and GPU); its recall is `recall_target`.
    recall_target: expected fraction of the true top k found when `approximate`.

  Returns:
    `(values [..., k], indices int32 [..., k])`, values in descending order.
  """
  scores = jnp.asarray(scores)
  if scores.ndim == 0:
    raise ValueError('top_k: scores must have at least one axis, got a scalar')
  if not 0 <= k <= scores.shape[-1]:
    raise ValueError(
        f'top_k: k must be in [0, {scores.shape[-1]}] (the last axis of scores), got {k}')
  if approximate:
    return jax.lax.approx_max_k(scores, k, recall_target=recall_target)
  if BACKEND == 'ffi' and scores.dtype in _KERNEL_DTYPES:
    return _exact_top_k(scores, k)
  return jax.lax.top_k(scores, k)
