"""Tests of lra.models: forward passes, shared parameter trees and attention equivalences."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import topk
from configs import image, listops, pathfinder, pathx, retrieval, text
from lra.data import task_info
from lra.models import TransformerConfig, build_model, sinusoidal_table

_RNGS = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}


# Compilation dominates these tiny models (tests/conftest.py).
pytestmark = pytest.mark.usefixtures('fast_compilation')


def _setup(module, arg: str, **overrides):
  """Smoke config of `module` (with dotted-key overrides), its TaskInfo and model."""
  config = module.get_config(arg)
  for key, value in overrides.items():
    group, name = key.split('.')
    config[group][name] = value
  info = task_info(config.task, max_length=config.max_length, **config.task_options)
  return config, info, build_model(config, info)


def _batch(info, batch_size: int = 2, seed: int = 0, num_pad: int = 5) -> dict[str, jax.Array]:
  """Random tokens with `num_pad` trailing padding ids in every row."""
  keys = jax.random.split(jax.random.key(seed), 2)
  def tokens(key):
    ids = jax.random.randint(key, (batch_size, info.max_length), 1, info.vocab_size)
    return ids.at[:, info.max_length - num_pad:].set(0)
  if info.dual:
    return {'inputs1': tokens(keys[0]), 'inputs2': tokens(keys[1]),
            'targets': jnp.zeros(batch_size, jnp.int32)}
  return {'inputs': tokens(keys[0]), 'targets': jnp.zeros(batch_size, jnp.int32)}


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@functools.cache
def _vanilla(module):
  """(info, batch, variables, eval logits) of `module`'s vanilla smoke model, computed once."""
  _, info, model = _setup(module, 'vanilla,smoke')
  batch = _batch(info, num_pad=20)
  logits, variables = model.init_with_output(_RNGS, batch, train=False)
  return info, batch, variables, logits


_TASKS = {'listops': (listops, ''), 'text': (text, ''), 'retrieval': (retrieval, ''),
          'image': (image, ''), 'pathfinder32': (pathfinder, ''),
          'pathfinder64': (pathfinder, '64'), 'pathx': (pathx, '')}


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize('module, arg', _TASKS.values(), ids=_TASKS)
def test_smoke_forward(module, arg):
  _, info, model = _setup(module, arg + ',topk,smoke')
  batch = _batch(info)
  # One trace: initialise and run a training-mode (dropout) forward pass together.
  logits, _ = model.init_with_output(_RNGS, batch, train=True)
  assert logits.shape == (2, info.num_classes)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_dropout_only_in_training():
  info, batch, variables, logits = _vanilla(listops)
  _, _, model = _setup(listops, 'vanilla,smoke')
  dropped = model.apply(variables, batch, train=True, rngs={'dropout': jax.random.key(2)})
  assert dropped.shape == (2, info.num_classes)
  assert not np.allclose(dropped, logits), 'train=True should apply dropout'


def test_full_size_parameter_counts_match_reference():
  # The original models' counts (3 significant digits); shapes only, no compute.
  expected = {('listops', listops, ''): 8.95e6, ('text', text, ''): 3.49e6,
              ('retrieval', retrieval, ''): 1.09e6, ('image', image, ''): 2.48e5,
              ('pf32', pathfinder, '32'): 2.65e4, ('pf64', pathfinder, '64'): 1.53e5,
              ('pathx', pathx, ''): 5.38e5, ('pf256', pathfinder, '256'): 2.12e6}
  for (name, module, arg), count in expected.items():
    _, info, model = _setup(module, arg)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype),
                         _batch(info, num_pad=0))
    params = jax.eval_shape(lambda b, m=model: m.init(_RNGS, b, train=False), batch)
    total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert float(f'{total:.3g}') == count, name


def test_rejects_too_long_input():
  _, info, model = _setup(listops, 'smoke')
  with pytest.raises(ValueError, match='max_len'):
    model.init(_RNGS, {'inputs': jnp.ones((1, info.max_length + 1), jnp.int32)}, train=False)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bool_])
def test_rejects_non_integer_ids(dtype):
  # Float ids would be truncated (e.g. pixels scaled to [0, 1) all become padding id 0).
  _, info, model = _setup(listops, 'smoke')
  with pytest.raises(ValueError, match='integer token ids'):
    model.init(_RNGS, {'inputs': jnp.ones((1, info.max_length), dtype)}, train=False)


# ----------------------------------------------------------------------------- equivalence
# A vanilla-initialised tree runs unchanged under every attention and FFN kind.


@pytest.mark.parametrize('module', [listops, retrieval], ids=['single', 'dual'])
def test_parameter_tree_identical_across_kinds(module):
  trees = []
  for kind, ffn in (('vanilla', 'dense'), ('chunked', 'dense'), ('topk', 'dense'),
                    ('vanilla', 'topk')):
    _, info, model = _setup(module, f'{kind},smoke', **{'ffn.kind': ffn})
    batch = _batch(info)
    trees.append(jax.eval_shape(lambda b, m=model: m.init(_RNGS, b, train=False), batch))
  for tree in trees[1:]:
    assert _shapes(tree) == _shapes(trees[0])


_FULL_SELECTIONS = {
    'topk': (listops, {'attention.kind': 'topk', 'attention.k': 65}),
    'topk_dual': (retrieval, {'attention.kind': 'topk', 'attention.k': 64}),
    'chunked': (listops, {'attention.kind': 'chunked', 'attention.query_chunk_size': 7}),
    'topk_ffn': (listops, {'ffn.kind': 'topk', 'ffn.k': 64}),
    # MEAN pooling reads padded positions too, so these check padded-query rows as well.
    'chunked_mean': (pathfinder, {'attention.kind': 'chunked', 'attention.query_chunk_size': 16}),
    'topk_mean': (pathfinder, {'attention.kind': 'topk', 'attention.k': 64}),
    'topk_ffn_mean': (pathfinder, {'ffn.kind': 'topk', 'ffn.k': 200, 'ffn.query_chunk_size': 5}),
}


@pytest.mark.parametrize('module, overrides', _FULL_SELECTIONS.values(), ids=_FULL_SELECTIONS)
def test_full_selection_matches_vanilla(module, overrides):
  # Smoke length is 64 (+1 CLS) and smoke mlp_dim is 64, so these k keep everything.
  _, batch, variables, logits = _vanilla(module)
  _, _, other = _setup(module, 'vanilla,smoke', **overrides)
  np.testing.assert_allclose(other.apply(variables, batch, train=False), logits, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('overrides', [{'attention.kind': 'topk', 'attention.k': 2},
                                       {'ffn.kind': 'topk', 'ffn.k': 2}], ids=['attention', 'ffn'])
def test_small_k_changes_logits(overrides):
  _, batch, variables, logits = _vanilla(listops)
  _, _, other = _setup(listops, 'vanilla,smoke', **overrides)
  assert not np.allclose(other.apply(variables, batch, train=False), logits, atol=1e-4)


# ----------------------------------------------------------------------------- masks
# The smoke batches end in 20 padding tokens; CLS logits must ignore them when masked.


@pytest.mark.parametrize('kind', ['vanilla', 'topk'])
def test_trailing_padding_does_not_change_cls_logits(kind):
  _, batch, variables, _ = _vanilla(listops)
  _, _, model = _setup(listops, f'{kind},smoke')
  shorter = {'inputs': batch['inputs'][:, :50]}
  np.testing.assert_allclose(model.apply(variables, shorter, train=False),
                             model.apply(variables, batch, train=False), rtol=1e-5, atol=1e-5)


def test_mask_padding_false_lets_padding_attend():
  _, batch, variables, logits = _vanilla(listops)
  _, _, model = _setup(listops, 'vanilla,smoke', **{'model.mask_padding': False})
  assert not np.allclose(model.apply(variables, batch, train=False), logits, atol=1e-4)


# ----------------------------------------------------------------------------- config edge


def test_nli_interaction_widens_head():
  _, info, model = _setup(retrieval, 'smoke', **{'model.interaction': 'nli'})
  params = jax.eval_shape(lambda: model.init(_RNGS, _batch(info), train=False))['params']
  assert params['mlp']['kernel'].shape == (4 * 32, 64)
  assert params['mlp2']['kernel'].shape == (64, 32)


def test_build_model_holds_the_specs():
  _, _, model = _setup(listops, 'topk,k=16,smoke', **{'ffn.kind': 'topk', 'ffn.k': 32})
  assert model.config.attention == topk.AttentionSpec(
      'topk', k=16, query_chunk_size=16, kernel='softmax', selection='exact', recall_target=0.95)
  assert model.config.ffn == topk.FeedForwardSpec('topk', k=32, query_chunk_size=16)


def test_build_model_rejects_unknown_keys():
  config = listops.get_config('smoke')
  info = task_info('listops', max_length=config.max_length)
  for group in ('model', 'attention', 'ffn'):
    bad = config.copy_and_resolve_references()
    bad.unlock()
    bad[group].bogus = 1
    with pytest.raises(ValueError, match=f'config.{group}: unknown keys'):
      build_model(bad, info)


@pytest.mark.parametrize('bad', [
    {'num_heads': 3}, {'classifier_pool': 'MAX'}, {'dropout_rate': 1.0}, {'dtype': 'float16'},
    {'interaction': 'dot'}, {'emb_dim': 0}, {'attention': 'topk'}])
def test_transformer_config_rejects_bad_values(bad):
  with pytest.raises((ValueError, TypeError)):
    TransformerConfig(vocab_size=10, num_classes=2, max_len=8, **bad)


def test_sinusoidal_table():
  table = sinusoidal_table(5, 6)
  assert table.shape == (1, 5, 6)
  np.testing.assert_allclose(table[0, :, 0], np.sin(np.arange(5)), rtol=1e-6)
  np.testing.assert_allclose(table[0, :, 1], np.cos(np.arange(5)), rtol=1e-6)
  np.testing.assert_allclose(table[0, 3, 4], np.sin(3 / 10000 ** (4 / 6)), rtol=1e-6)
