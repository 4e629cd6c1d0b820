"""Package metadata: `pip install .` gets every package, the pinned stack (nothing unused) and the
CPU selection kernel."""
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import warnings

import pytest
from setuptools.config.pyprojecttoml import read_configuration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pinned but not imported by the project: why each is needed.
INDIRECT = {'jaxlib': 'jax loads it', 'importlib-resources': 'tensorflow-datasets imports it to '
            'prepare a dataset without declaring it', 'array-record': 'tfds.data_source reads the '
            'prepared ArrayRecord files with it'}
# Imported where installed: benchmarks compare against torch; benchmarks.ptxas finds ptxas in
# the nvidia-cuda-nvcc wheel of jax's CUDA extra.
OPTIONAL = {'torch', 'nvidia'}


def normalize(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def pins(filename: str) -> dict[str, str]:
  """Distribution name -> pinned version, from a requirements file."""
  with open(os.path.join(REPO, filename)) as f:
    lines = [line.split('#')[0].strip() for line in f]
  requirements = [line for line in lines if line]
  assert all(re.fullmatch(r'[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*', r) for r in requirements), (
      requirements)
  return {normalize(r.split('==')[0]): r.split('==')[1] for r in requirements}


def configuration() -> dict:
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # setuptools calls [tool.setuptools] support beta
    return read_configuration(os.path.join(REPO, 'pyproject.toml'))


def imported_modules(*roots: str) -> set[str]:
  """Top-level names of the absolute imports in the .py files under `roots` (file or folder)."""
  names = set()
  for root in roots:
    path = os.path.join(REPO, root)
    files = [path] if root.endswith('.py') else [
        os.path.join(folder, f) for folder, _, fs in os.walk(path) for f in fs if f.endswith('.py')]
    for file in files:
      with open(file) as f:
        for node in ast.walk(ast.parse(f.read())):
          if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
          elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module.split('.')[0])
  return names


def test_dependencies_are_the_requirement_files():
  config = configuration()['project']
  runtime, dev = pins('requirements.txt'), pins('requirements-dev.txt')
  assert {normalize(r.split('==')[0]): r.split('==')[1] for r in config['dependencies']} == runtime
  extras = config.get('optional-dependencies') or config['optional_dependencies']
  assert {normalize(r.split('==')[0]): r.split('==')[1] for r in extras['dev']} == dev
  assert not set(runtime) & set(dev)
  assert 'pytest' in dev and 'pytest' not in runtime


def build_requirements() -> list[str]:
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['build-system']['requires']


def test_build_requires_jax_at_the_runtime_pins():
  """setup.py compiles the selection kernel against jax's FFI headers: the jax it runs with."""
  runtime = pins('requirements.txt')
  build = {normalize(r.split('==')[0]): r.split('==')[1] for r in build_requirements() if '==' in r}
  assert build == {name: runtime[name] for name in ('jax', 'jaxlib')}


@pytest.mark.slow
def test_installed_package_selects_with_its_own_kernel(tmp_path):
  """`pip install .` of the checkout's files (git's view: no build products) into a fresh venv
  compiles the kernel into the installed `topk`, which registers it and runs it on CPU.

  The venv sees this environment's packages through a .pth file (jax, and pip and setuptools to
  build without isolation), so nothing is downloaded.
  """
  files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
  source = tmp_path / 'source'
  for name in files.split('\0'):
    if os.path.isfile(os.path.join(REPO, name)):  # not deleted ones, nor a linked .venv
      (source / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(os.path.join(REPO, name), source / name)
  assert not list(source.rglob('*.so'))
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_path("platlib"))'],
                        capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(site, 'outer.pth'), 'w') as f:
    f.write(sysconfig.get_path('platlib') + '\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'} | {'JAX_PLATFORMS': 'cpu'}
  install = subprocess.run(
      [python, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--no-index',
       '--ignore-installed', str(source)], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert install.returncode == 0, install.stdout + install.stderr
  check = """
import json, jax, numpy as np
from topk import select
scores = np.random.default_rng(0).standard_normal((4, 256), np.float32)
program = jax.jit(lambda s: select.top_k(s, 8)).lower(scores).as_text()
equal = all(np.array_equal(a, b) for a, b in zip(select.top_k(scores, 8), jax.lax.top_k(scores, 8)))
print(json.dumps({'library': str(select.LIBRARY), 'exists': select.LIBRARY.exists(),
                  'cpu': select.DEFAULT_METHODS['cpu'], 'isa': select.ISA,
                  'custom_call': 'topk_select' in program, 'equal': bool(equal)}))
"""
  result = subprocess.run([python, '-c', check], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.splitlines()[-1])
  assert report['library'] == os.path.join(os.path.realpath(site), 'topk', 'libtopk_select.so')
  assert report['exists'] and report['cpu'] == 'ffi' and report['isa'] in ('avx2', 'portable')
  assert report['custom_call'] and report['equal'], report


def test_every_package_is_installed():
  packages = set()
  for folder, subfolders, files in os.walk(REPO):
    subfolders[:] = [s for s in subfolders if not s.startswith('.') and s != 'build']
    if '__init__.py' in files:
      packages.add(os.path.relpath(folder, REPO).replace(os.sep, '.'))
  assert set(configuration()['tool']['setuptools']['packages']) == packages
  assert {'topk', 'lra', 'lra.data', 'configs', 'benchmarks'} <= packages


def test_pins_match_imports():
  """Each third-party import comes from a pinned distribution (setup.py's from a build
  requirement); each runtime pin is used."""
  scripts = [f for f in os.listdir(REPO) if f.endswith('.py') and f != 'setup.py']  # train.py, ...
  first_party = {name.split('.')[0] for name in configuration()['tool']['setuptools']['packages']}
  first_party |= {f.removesuffix('.py') for f in scripts}
  first_party.add('conftest')  # tests/conftest.py: `from conftest import ...`
  distributions = importlib.metadata.packages_distributions()
  runtime, dev = pins('requirements.txt'), pins('requirements-dev.txt')

  def third_party(names: set[str]) -> dict[str, set[str]]:
    names -= set(sys.stdlib_module_names) | first_party | OPTIONAL
    return {name: {normalize(d) for d in distributions.get(name, [])} for name in names}

  code = third_party(imported_modules('lra', 'topk', 'configs', 'benchmarks', 'studies', *scripts))
  # The test files import helpers from each other (conftest), which are first-party too.
  tests = third_party(imported_modules('tests')
                      - {f.removesuffix('.py') for f in os.listdir(os.path.join(REPO, 'tests'))})
  assert {name: dists for name, dists in code.items() if not dists & set(runtime)} == {}
  assert {name: dists for name, dists in tests.items() if not dists & (set(runtime) | set(dev))
          } == {}
  build = {normalize(re.split('[=<>!~ ]', r)[0]) for r in build_requirements()}
  assert {name: dists for name, dists in third_party(imported_modules('setup.py')).items()
          if not dists & build} == {}
  used = set().union(*code.values(), *tests.values())
  assert sorted(set(runtime) - used - set(INDIRECT)) == []
