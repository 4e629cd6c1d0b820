"""Fixtures and helpers shared by several test modules (helpers: `from conftest import ...`)."""
import json
import os

import jax
import pytest

from lra.data import listops_gen


@pytest.fixture(scope='module')
def fast_compilation():
  """XLA without most optimizations for one module (compilation dominates tiny models); the
  setting is restored afterwards for the other modules."""
  saved = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', saved)


def _reject_constant(name: str) -> None:
  raise ValueError(f'metrics.jsonl holds {name}, which is not JSON')


def read_metrics(workdir: str) -> dict[tuple[int, str], dict[str, float]]:
  """The records of metrics.jsonl by (step, split); asserts strict JSON and no duplicates."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line, parse_constant=_reject_constant) for line in f]
  records = {(line.pop('step'), line.pop('split')): line for line in lines}
  assert len(records) == len(lines), 'duplicate (step, split) records'
  return records


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


# 21 validation and 13 test examples: the last eval batch of 8 is partial.
@pytest.fixture(scope='module')
def listops_data(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp('listops_data'))
  listops_gen.write_splits(root, seed=0, num_train=64, num_valid=21, num_test=13, min_length=3,
                           max_length=40)
  return root
