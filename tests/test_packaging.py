"""Package metadata: `pip install .` gets every package and the pinned stack, nothing unused."""
import ast
import importlib.metadata
import os
import re
import sys
import warnings

from setuptools.config.pyprojecttoml import read_configuration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pinned but not imported by the project: why each is needed.
INDIRECT = {'jaxlib': 'jax loads it', 'importlib-resources': 'tensorflow-datasets imports it to '
            'prepare a dataset without declaring it', 'array-record': 'tfds.data_source reads the '
            'prepared ArrayRecord files with it'}
OPTIONAL = {'torch'}  # benchmarks compare against it when it is installed


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


def test_every_package_is_installed():
  packages = set()
  for folder, subfolders, files in os.walk(REPO):
    subfolders[:] = [s for s in subfolders if not s.startswith('.') and s != 'build']
    if '__init__.py' in files:
      packages.add(os.path.relpath(folder, REPO).replace(os.sep, '.'))
  assert set(configuration()['tool']['setuptools']['packages']) == packages
  assert {'topk', 'lra', 'lra.data', 'configs', 'benchmarks'} <= packages


def test_pins_match_imports():
  """Each third-party import comes from a pinned distribution; each runtime pin is used."""
  scripts = [f for f in os.listdir(REPO) if f.endswith('.py')]  # train.py, sweep.py, demo.py
  first_party = {name.split('.')[0] for name in configuration()['tool']['setuptools']['packages']}
  first_party |= {f.removesuffix('.py') for f in scripts}
  distributions = importlib.metadata.packages_distributions()
  runtime, dev = pins('requirements.txt'), pins('requirements-dev.txt')

  def third_party(names: set[str]) -> dict[str, set[str]]:
    names -= set(sys.stdlib_module_names) | first_party | OPTIONAL
    return {name: {normalize(d) for d in distributions.get(name, [])} for name in names}

  code = third_party(imported_modules('lra', 'topk', 'configs', 'benchmarks', 'studies', *scripts))
  tests = third_party(imported_modules('tests'))
  assert {name: dists for name, dists in code.items() if not dists & set(runtime)} == {}
  assert {name: dists for name, dists in tests.items() if not dists & (set(runtime) | set(dev))
          } == {}
  used = set().union(*code.values(), *tests.values())
  assert sorted(set(runtime) - used - set(INDIRECT)) == []
