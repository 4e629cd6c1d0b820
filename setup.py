"""Builds the CPU top-k selection kernel into the `topk` package (metadata: pyproject.toml).

`csrc/topk_select.cc` is a plain shared library that `topk.select` loads with ctypes and registers
through the XLA FFI, not a Python extension module, so `build_ext` compiles it with exactly the
flags below instead of Python's own, into `topk/libtopk_select.so` (no ABI suffix). `pip install .`
builds it into the wheel; `make build` runs `setup.py build_ext --inplace`, which writes it into the
checkout's `topk/`: either way `topk.select` finds it next to itself. jax provides the FFI headers,
so it is a build requirement (pyproject.toml, at the pins of requirements.txt).

No -march=native: the library must run on any x86-64-v2 machine, not just the build host; its AVX2
code is compiled per function and chosen at run time.
"""
import os
import platform
import shlex

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = ['-O3', *(['-march=x86-64-v2'] if platform.machine() == 'x86_64' else []), '-fPIC',
         '-shared', '-std=c++17', '-pthread']


class BuildSharedLibrary(build_ext):
  """Compiles each extension's sources into one shared library with `FLAGS` and jax's headers.

  The compiler is `$CXX` (default `c++`) without Python's CFLAGS (debug info, warnings).
  """

  def get_ext_filename(self, fullname: str) -> str:
    return os.path.join(*fullname.split('.')) + '.so'

  def build_extension(self, ext: Extension) -> None:
    import jax.ffi  # Only building needs jax (a build requirement); importing it takes seconds.

    output = self.get_ext_fullpath(ext.name)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    compiler = shlex.split(os.environ.get('CXX', 'c++'))
    self.spawn([*compiler, *FLAGS, '-isystem', jax.ffi.include_dir(), '-o', output, *ext.sources])


setup(ext_modules=[Extension('topk.libtopk_select', ['csrc/topk_select.cc'])],
      cmdclass={'build_ext': BuildSharedLibrary})
