"""Fixtures and helpers shared by several test modules (helpers: `from conftest import ...`)."""
import glob
import hashlib
import importlib
import json
import os
import platform
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from lra.data import listops_gen
from topk import inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A real corpus present wherever Python is: the standard library's json package (5 files).
STDLIB_CORPUS = os.path.dirname(json.__file__)


def _compilation_cache_dir() -> str:
  """Where the tests keep XLA's compiled programs between runs (compilation is most of their
  time): `.cache/jax/` in the checkout, one folder per CPU instruction set (XLA compiles for the
  host's; a checkout on a shared disk may be tested on other CPUs). The pytest-xdist workers
  share it: jax writes an entry in place, and a worker that reads one half-written warns and
  compiles instead."""
  try:
    with open('/proc/cpuinfo') as f:
      features = next((line for line in f if line.startswith('flags')), '')
  except OSError:
    features = ''
  cpu = hashlib.sha256(f'{platform.machine()} {features}'.encode()).hexdigest()[:12]
  return os.path.join(REPO, '.cache', 'jax', cpu)


# Every compiled program is cached, however small or quick: the tests compile thousands.
jax.config.update('jax_compilation_cache_dir', _compilation_cache_dir())
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def lm_config(arg: str = 'causal,smoke', **overrides) -> ml_collections.ConfigDict:
  """configs/lm.py with `arg` on STDLIB_CORPUS, and `overrides` as `--config.<field>` values."""
  import config_cli  # a script-level module: imported where needed, not by every test file
  pairs = [('data_dir', STDLIB_CORPUS), ('task_options.pattern', '*.py'),
           *((key, str(value)) for key, value in overrides.items())]
  return config_cli.get_config(os.path.join(REPO, 'configs', 'lm.py') + ':' + arg, pairs)


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


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory) -> dict[str, str]:
  """Shares compiled steps between the runs of one test module and its subprocesses (returns
  their environment variables): most runs compile the same smoke model, and compiling dominates."""
  options = {'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('jax_cache')),
             'jax_persistent_cache_min_compile_time_secs': 0.0}
  previous = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  yield {name.upper(): str(value) for name, value in options.items()}
  for name, value in previous.items():
    jax.config.update(name, value)


def smoke_config(module: str, data_dir: str, arg: str = 'smoke', **overrides
                 ) -> ml_collections.ConfigDict:
  config = importlib.import_module(f'configs.{module}').get_config(arg)
  config.data_dir = data_dir
  for name, value in overrides.items():
    parent = config
    *path, leaf = name.split('.')
    for part in path:
      parent = parent[part]
    parent[leaf] = value
  return config


@pytest.fixture(scope='module')
def listops_run(listops_data, tmp_path_factory, compilation_cache):
  """4 uninterrupted steps; validation after steps 2 and 4 on the whole split."""
  from lra import train
  config = smoke_config('listops', listops_data, num_eval_steps=-1)
  workdir = str(tmp_path_factory.mktemp('listops_run'))
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope='module')
def profiled_run(listops_data, tmp_path_factory, compilation_cache):
  """The listops_run config checkpointed every step (checkpoints 3 and 4 kept), steps 2-3
  profiled."""
  from lra import train
  config = smoke_config('listops', listops_data, num_eval_steps=-1, checkpoint_every=1,
                        profile_steps=2)
  workdir = str(tmp_path_factory.mktemp('profiled_run'))
  return config, workdir, train.train_and_evaluate(config, workdir)


def read_scalars(log_dir: str) -> dict[tuple[int, str], float]:
  """The scalars of the TensorBoard event files in `log_dir` (TFRecord framing: length, its CRC,
  the Event proto, its CRC), by (step, tag), as TensorBoard shows them: files are read oldest
  first and a `SessionLog.START` event of step s hides the earlier events of steps >= s. Asserts
  that no (step, tag) is shown twice."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(log_dir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars = {key: value for key, value in scalars.items() if key[0] < event.step}
      for value in event.summary.value:
        assert (event.step, value.tag) not in scalars, f'{value.tag} shown twice at {event.step}'
        scalars[(event.step, value.tag)] = value.simple_value
  return scalars


def reference_topk(q: jax.Array, k: jax.Array, v: jax.Array, k_keep: int,
                   mask: jax.Array | None = None, bias: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Top-k attention the plain dense way: `(out [B, Lq, H, Dv], kept bool [B, H, Lq, Lk])`.

  Dense scores of `q, k [B, L, H, D]`, all but the top `k_keep` of the masked scores (masked
  entries at `inputs.NEG`, as `topk_attention` masks them) set to -inf, then softmax.
  """
  s = jnp.einsum('bqhd,bkhd->bhqk', q / np.sqrt(q.shape[-1]), k)
  if bias is not None:
    s = s + bias
  if mask is not None:
    s = jnp.where(mask, s, inputs.NEG)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(s), k_keep)
  kept = jnp.any(jax.nn.one_hot(idx, s.shape[-1], dtype=bool), axis=-2)
  w = jax.nn.softmax(jnp.where(kept, s, -jnp.inf), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', w, v), kept


def masked_case(dtype: Any, q_len: int = 40, kv_len: int = 200, heads: int = 2, depth: int = 16,
                integer: bool = False) -> tuple[tuple[jax.Array, ...], dict[str, Any]]:
  """`(q, k, v)` `[2, L, heads, depth]` and masking arguments that cover every kind: a full
  mask, causal, key padding (5 valid keys in the second sequence: fewer than k), query padding,
  and a bias that is -inf on one (query, key) pair. Drawn with numpy (no compilation)."""
  rng = np.random.default_rng(0)
  draw = lambda *shape: rng.integers(-1, 2, shape) if integer else rng.standard_normal(shape)
  q = jnp.asarray(draw(2, q_len, heads, depth), dtype)
  k, v = (jnp.asarray(draw(2, kv_len, heads, depth), dtype) for _ in range(2))
  bias = rng.standard_normal((1, heads, q_len, kv_len)).astype(np.float32)
  bias[0, 0, 30, 3] = -np.inf
  masks = dict(
      is_causal=True,
      mask=jnp.asarray(rng.uniform(size=(1, 1, q_len, kv_len)) < 0.9),
      bias=jnp.asarray(np.round(bias) if integer else bias),
      key_padding_mask=jnp.arange(kv_len) < jnp.array([[kv_len], [5]]),
      query_padding_mask=jnp.arange(q_len) < jnp.array([[q_len], [33]]))
  return (q, k, v), masks


def value_and_grads(fn, args: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """`fn(*args)` reduced by a fixed random projection, and its gradients to every argument."""
  out = jax.eval_shape(fn, *args)
  proj = jnp.asarray(np.random.default_rng(9).standard_normal(out.shape), jnp.float32)
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * proj)
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)


def assert_close(got: Any, want: Any, tolerance: float) -> None:
  """Every leaf of `got` equals `want`'s within `tolerance` (relative and absolute)."""
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance, atol=tolerance),
      got, want)
