"""Tests of topk.spec: attention and feed-forward specs, their validation and what they build."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import topk
from configs import common, listops
from lra.data import task_info
from lra.models import build_model
from topk import select


def _qkv(seed=0, shape=(2, 9, 2, 4)):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))


@pytest.mark.parametrize('fields, message', [
    (dict(kind='flash'), r"valid kinds: \['chunked', 'topk', 'vanilla'\]"),
    (dict(kind='topk'), 'needs the option k'),
    (dict(kind='topk', k=0), 'k must be an integer >= 1'),
    (dict(kind='topk', k=2.5), 'k must be an integer >= 1'),
    (dict(kind='topk', k=True), 'k must be an integer >= 1'),
    (dict(k=-1), 'k must be an integer >= 1'),  # checked for every kind: a bad value is bad
    (dict(query_chunk_size=0), 'query_chunk_size must be'),
    (dict(kernel='cosine'), 'Unknown attention kernel'),
    (dict(selection='fast'), r"valid selections: \['approximate', 'exact'\]"),
    (dict(recall_target=0.0), r'recall_target must be a number in \(0, 1\]'),
    (dict(recall_target=1.5), 'recall_target'),
    (dict(recall_target=True), 'recall_target'),
    (dict(fused='no'), 'fused must be True or False'),
    (dict(fused=1), 'fused must be True or False'),
    (dict(method='radix'), 'method must be one of'),
    (dict(selection='approximate', method='lax'), 'exact selection only'),
    (dict(fused_options={'platforms': ('cpu',)}), 'fused_options must be a'),
])
def test_attention_spec_rejects(fields, message):
  with pytest.raises(ValueError, match=message):
    topk.AttentionSpec(**fields)


@pytest.mark.parametrize('fields, message', [
    (dict(kind='sparse'), r"Unknown feed-forward kind 'sparse'; valid kinds: \['dense', 'topk'\]"),
    (dict(kind='topk'), 'needs the option k'),
    (dict(kind='topk', k=0), 'k must be an integer >= 1'),
    (dict(query_chunk_size=-3), 'query_chunk_size must be'),
])
def test_feed_forward_spec_rejects(fields, message):
  with pytest.raises(ValueError, match=message):
    topk.FeedForwardSpec(**fields)


def test_config_attention_kinds_are_the_registry_keys():
  # configs/ cannot import topk (it starts JAX), so it names the kinds itself.
  assert sorted(common.ATTENTION_KINDS) == sorted(topk.ATTENTION_FNS)


@pytest.mark.parametrize('kind, bound', [
    ('vanilla', {'kernel': 'relu'}),
    ('chunked', {'query_chunk_size': 3, 'kernel': 'relu'}),
    ('topk', {'k': 5, 'query_chunk_size': 3, 'kernel': 'relu', 'selection': 'approximate',
              'recall_target': 0.9, 'method': None, 'fused': False,
              'fused_options': topk.FusedOptions(platforms=())}),
])
def test_make_attention_fn_binds_the_fields_its_kind_takes(kind, bound):
  spec = topk.AttentionSpec(kind, k=5, query_chunk_size=3, kernel='relu',
                            selection='approximate', recall_target=0.9, fused=False,
                            fused_options=topk.FusedOptions(platforms=()))
  fn = topk.make_attention_fn(spec)
  assert fn.func is topk.ATTENTION_FNS[kind].fn
  assert fn.keywords == bound


def test_make_attention_fn_by_name_builds_the_spec():
  fn = topk.make_attention_fn('topk', k=4, query_chunk_size=3, is_causal=True)
  assert fn.keywords == {**topk.AttentionSpec('topk', k=4, query_chunk_size=3).options(),
                         'is_causal': True}
  q, k, v = _qkv()
  np.testing.assert_allclose(fn(q, k, v), topk.topk_attention(q, k, v, k=4, query_chunk_size=3,
                                                              is_causal=True))
  with pytest.raises(TypeError, match='only with a kind name'):
    topk.make_attention_fn(topk.AttentionSpec(), kernel='relu')
  with pytest.raises(ValueError, match=r"Unknown options \['selection'\]"):
    topk.make_attention_fn('chunked', selection='exact')
  with pytest.raises(ValueError, match=r"valid kinds: \['chunked', 'topk', 'vanilla'\]"):
    topk.make_attention_fn('flash')


@pytest.mark.parametrize('selection, primitive_present', [('approximate', True),
                                                          ('exact', False)])
def test_selection_reaches_the_selector(selection, primitive_present):
  # approx_max_k is exact on CPU, so look for its primitive in the traced program.
  fn = topk.make_attention_fn(topk.AttentionSpec('topk', k=3, selection=selection))
  jaxpr = str(jax.make_jaxpr(fn)(*_qkv()))
  assert ('approx_top_k' in jaxpr) == primitive_present


def test_config_selection_reaches_select_top_k(monkeypatch):
  calls = []

  def spy(scores, k, *options):
    calls.append(options)
    return jax.lax.top_k(scores, k)

  monkeypatch.setattr(select, 'unchecked_top_k', spy)
  config = listops.get_config('topk,smoke')
  config.attention.selection = 'approximate'
  config.attention.recall_target = 0.8
  info = task_info('listops', max_length=config.max_length)
  model = build_model(config, info)
  jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                 {'inputs': jnp.ones((1, info.max_length), jnp.int32)})
  assert calls and all(c == ('approximate', 0.8, None) for c in calls)


@pytest.mark.parametrize('spec, module', [
    (topk.FeedForwardSpec(), topk.DenseFeedForward),
    (topk.FeedForwardSpec('topk', k=7, query_chunk_size=3), topk.TopKFeedForward),
])
def test_make_feed_forward(spec, module):
  layer = topk.make_feed_forward(spec, mlp_dim=10, out_dim=6, dropout_rate=0.1, name='mlp')
  assert type(layer) is module
  assert (layer.mlp_dim, layer.out_dim, layer.dropout_rate, layer.name) == (10, 6, 0.1, 'mlp')
  if module is topk.TopKFeedForward:
    assert (layer.k, layer.query_chunk_size) == (7, 3)


@pytest.mark.parametrize('make, spec, message', [
    (topk.make_attention_fn, None, r"takes an AttentionSpec or a kind name \['chunked', 'topk', "
                                   r"'vanilla'\], got None \(NoneType\)"),
    (topk.make_attention_fn, {'kind': 'topk'}, r'got .*\(dict\).*AttentionSpec\(\*\*fields'),
    (topk.make_feed_forward, 'topk', r"takes a FeedForwardSpec, got 'topk' \(str\)"),
    (topk.make_feed_forward, {'kind': 'dense'}, r'FeedForwardSpec\(\*\*fields\)'),
])
def test_make_functions_reject_what_is_not_a_spec(make, spec, message):
  with pytest.raises(TypeError, match=message):
    make(spec)
