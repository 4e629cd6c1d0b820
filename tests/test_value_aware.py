"""Tests of the value-aware study: its solvers (sparse approximations of attention outputs), and
the capture, per-layer analysis and reporting on a random-init smoke model."""
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import config_cli
import topk
from studies import approximations, capture
from studies import solvers as va
from studies.value_aware import report
from studies.value_aware.__main__ import main
from topk import kernels

pytestmark = pytest.mark.usefixtures('fast_compilation')  # compilation dominates (conftest.py)


def _problem(seed: int, batch: int, n_q: int, n: int, d: int, d_v: int, scale: float = 2.0):
  """Random queries/keys/values (float32) and their exact softmax outputs."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, n_q, d)) * scale, jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, n, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, n, d_v)), jnp.float32)
  return q, k, v


# One problem shape for the greedy solver's tests, so that its compilations are shared.
_SHAPE = {'batch': 2, 'n_q': 12, 'n': 8, 'd': 4, 'd_v': 4}


def _errors(target, output):
  """Per-query L2 distances in float64."""
  return np.linalg.norm(np.asarray(output, np.float64) - np.asarray(target, np.float64), axis=-1)


def _support(approx: va.SparseApproximation) -> list[set[int]]:
  indices = np.asarray(approx.indices).reshape(-1, approx.indices.shape[-1])
  coefficients = np.asarray(approx.coefficients).reshape(indices.shape)
  return [set(i[c > 0].tolist()) for i, c in zip(indices, coefficients, strict=True)]


@pytest.mark.parametrize('r, kernel', [(1, 'softmax'), (2, 'relu'), (3, 'elu1')])
def test_value_aware_never_worse_than_renormalised_top_r(r, kernel):
  q, k, v = _problem(seed=r, **_SHAPE)
  weights = va.attention_weights(q, k, kernel=kernel)
  o = va.exact_output(q, k, v, kernel=kernel)
  oblivious = _errors(o, va.top_r_approximation(weights, v, r).output)
  exact = _errors(o, va.value_aware_exact(v, o, r).output)
  greedy = _errors(o, va.value_aware_greedy(v, o, r, weights=weights).output)
  np.testing.assert_array_less(exact, oblivious + 1e-5)
  np.testing.assert_array_less(greedy, oblivious + 1e-5)
  np.testing.assert_array_less(exact, greedy + 1e-5)


def test_raw_top_r_lies_outside_the_hull_and_can_be_closer():
  # The un-renormalised top-r output sums to less than one, so it is not a convex combination
  # and value-aware is not guaranteed to beat it: two opposite values with equal weights.
  v = jnp.array([[[1.0, 0.0], [-1.0, 0.0]]])
  o = jnp.zeros((1, 1, 2))
  weights = jnp.full((1, 1, 2), 0.5)
  raw = va.top_r_approximation(weights, v, 1, renormalise=False)
  exact = va.value_aware_exact(v, o, 1)
  np.testing.assert_allclose(_errors(o, raw.output), [[0.5]], atol=1e-6)
  np.testing.assert_allclose(_errors(o, exact.output), [[1.0]], atol=1e-12)


@pytest.mark.parametrize('r, d_v', [(4, 3), (5, 4)])
def test_caratheodory_r_at_least_dv_plus_one_is_exact(r, d_v):
  q, k, v = _problem(seed=d_v, batch=2, n_q=5, n=8, d=4, d_v=d_v)
  o = va.exact_output(q, k, v)
  approx = va.value_aware_exact(v, o, r)
  relative = _errors(o, approx.output) / np.linalg.norm(np.asarray(o, np.float64), axis=-1)
  np.testing.assert_array_less(relative, 1e-8)
  np.testing.assert_allclose(approx.coefficients.sum(-1), 1.0, atol=1e-12)
  assert (approx.coefficients >= 0).all()


def test_r_one_is_nearest_value():
  q, k, v = _problem(seed=7, **_SHAPE)
  o = va.exact_output(q, k, v)
  weights = va.attention_weights(q, k)
  distances = np.linalg.norm(np.asarray(v)[:, None] - np.asarray(o)[:, :, None], axis=-1)
  nearest = np.take_along_axis(np.asarray(v)[:, None], distances.argmin(-1)[..., None, None],
                               axis=-2)[..., 0, :]
  np.testing.assert_allclose(va.value_aware_exact(v, o, 1).output, nearest, atol=1e-6)
  np.testing.assert_allclose(va.value_aware_greedy(v, o, 1, weights=weights).output, nearest,
                             atol=1e-6)


def test_greedy_matches_exact_on_small_problems():
  # Random problems where support selection is hard (n = 8 values in d_v = 4, r = 2 and 3).
  # Measured: 93/96 queries within 1e-3 relative error of the exact optimum; assert >= 85%.
  close = []
  for seed, r in [(0, 2), (1, 3), (2, 2), (3, 3)]:
    q, k, v = _problem(seed=seed + 10, **_SHAPE)
    weights = va.attention_weights(q, k)
    o = va.exact_output(q, k, v)
    norm = np.linalg.norm(np.asarray(o, np.float64), axis=-1)
    exact = _errors(o, va.value_aware_exact(v, o, r).output) / norm
    greedy = _errors(o, va.value_aware_greedy(v, o, r, weights=weights).output) / norm
    close.append((greedy - exact < 1e-3).ravel())
  rate = np.concatenate(close).mean()
  assert rate >= 0.85


def test_orthogonal_equal_norm_values_top_r_support_is_optimal():
  rng = np.random.default_rng(3)
  n = 6
  basis = np.linalg.qr(rng.normal(size=(n, n)))[0] * 2.5       # orthogonal rows, norm 2.5
  v = jnp.asarray(basis[None], jnp.float32)
  q = jnp.asarray(rng.normal(size=(1, 10, 4)) * 2, jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, n, 4)), jnp.float32)
  weights = va.attention_weights(q, k)
  o = va.exact_output(q, k, v)
  for r in (1, 2, 3):
    top = va.top_r_approximation(weights, v, r)
    assert _support(va.value_aware_exact(v, o, r)) == _support(top)
    # The optimal weights on that support are p shifted up equally, not p renormalised.
    p_kept = np.take_along_axis(np.asarray(weights), np.asarray(top.indices), -1)
    shift = (1 - p_kept.sum(-1, keepdims=True)) / r
    exact = va.value_aware_exact(v, o, r)
    order = np.argsort(np.asarray(top.indices), -1)
    exact_order = np.argsort(exact.indices, -1)
    np.testing.assert_allclose(np.take_along_axis(exact.coefficients, exact_order, -1),
                               np.take_along_axis(p_kept + shift, order, -1), atol=1e-5)


def test_masked_keys_are_never_chosen():
  q, k, v = _problem(seed=5, **_SHAPE)
  rng = np.random.default_rng(5)
  mask = rng.random((2, 12, 8)) < 0.5
  mask[..., 0] = True
  mask[0, 0] = False
  mask[0, 0, 3] = True                                           # a row with one legal key
  mask = jnp.asarray(mask)
  weights = va.attention_weights(q, k, mask)
  assert bool(jnp.all(jnp.where(mask, True, weights == 0)))
  o = va.exact_output(q, k, v, mask)
  r = 3
  approxes = [va.top_r_approximation(weights, v, r), va.value_aware_exact(v, o, r, mask),
              va.value_aware_greedy(v, o, r, mask, weights=weights, query_chunk_size=5)]
  legal = [set(np.flatnonzero(row).tolist()) for row in np.asarray(mask).reshape(-1, 8)]
  for approx in approxes:
    for support, allowed in zip(_support(approx), legal, strict=True):
      assert support and support <= allowed, (support, allowed)
  np.testing.assert_allclose(approxes[1].output[0, 0], np.asarray(v)[0, 3], atol=1e-6)
  chunked = approxes[2]
  gathered = np.take_along_axis(np.asarray(v)[:, None], np.asarray(chunked.indices)[..., None],
                                axis=-2)
  np.testing.assert_allclose(chunked.output, np.einsum('bqr,bqrv->bqv', chunked.coefficients,
                                                       gathered), atol=1e-5)


@pytest.mark.parametrize('num_starts, num_sweeps', [(1, 2), (3, 2), (4, 2), (4, 0)])
def test_greedy_stays_on_the_simplex_with_fewer_legal_keys_than_starts(num_starts, num_sweeps):
  # Two legal keys, r = 1: the optimum is one whole value (error 1). A start at a masked value
  # began with an empty support, whose zero output (error 0 here) is no convex combination.
  v = jnp.array([[[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0], [-5.0, 5.0]]])
  o = jnp.zeros((1, 1, 2))
  mask = jnp.array([[[True, True, False, False]]])
  weights = jnp.array([[[0.5, 0.5, 0.0, 0.0]]])
  greedy = va.value_aware_greedy(v, o, 1, mask, weights=weights, num_starts=num_starts,
                                 num_sweeps=num_sweeps)
  np.testing.assert_allclose(greedy.coefficients.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(_errors(o, greedy.output), _errors(o, va.value_aware_exact(
      v, o, 1, mask).output), atol=1e-6)


@pytest.mark.parametrize('kernel', ['softmax', 'relu'])
def test_kernels_match_topk_kernels_and_topk_attention(kernel):
  q, k, v = _problem(seed=11, batch=2, n_q=5, n=7, d=4, d_v=3)
  scores = jnp.einsum('bqd,bkd->bqk', q, k) / 2.0
  weights = va.attention_weights(q, k, kernel=kernel)
  np.testing.assert_allclose(weights, kernels.get_kernel(kernel)(scores), atol=1e-6)
  # Renormalised top-r = top-k attention with k = r (flax layout: [batch, length, heads, d]).
  heads = lambda x: x[:, :, None, :]
  expected = topk.topk_attention(heads(q), heads(k), heads(v), k=3, kernel=kernel)[:, :, 0]
  np.testing.assert_allclose(va.top_r_approximation(weights, v, 3).output, expected,
                             atol=1e-5)
  np.testing.assert_allclose(va.top_r_approximation(weights, v, 7).output,
                             va.exact_output(q, k, v, kernel=kernel), atol=1e-5)


def test_metrics():
  o = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(va.relative_error(o, o * 0.5), [0.5, 0.0], atol=1e-6)
  uniform = jnp.full((2, 8), 1 / 8)
  np.testing.assert_allclose(va.top_r_mass(uniform, 2), [0.25, 0.25], atol=1e-6)
  np.testing.assert_allclose(va.top_r_mass(uniform, 20), [1.0, 1.0], atol=1e-6)


def test_bad_inputs_raise():
  q, k, v = _problem(seed=0, batch=1, n_q=2, n=4, d=3, d_v=2)
  o = va.exact_output(q, k, v)
  weights = va.attention_weights(q, k)
  for r in (0, -1, 1.5):
    with pytest.raises(ValueError, match='r must be'):
      va.value_aware_exact(v, o, r)
    with pytest.raises(ValueError, match='r must be'):
      va.value_aware_greedy(v, o, r)
    with pytest.raises(ValueError, match='r must be'):
      va.top_r_approximation(weights, v, r)
  with pytest.raises(ValueError, match='last'):
    va.value_aware_greedy(v, o[..., :1], 2)
  with pytest.raises(ValueError, match='mask'):
    va.value_aware_exact(v, o, 2, jnp.ones((1, 2, 3), bool))
  with pytest.raises(ValueError, match='query'):
    va.attention_weights(q, k[..., :2])
  with pytest.raises(ValueError, match='length n'):
    va.exact_output(q, k, v[:, :3])
  with pytest.raises(ValueError, match='disagree'):
    va.top_r_approximation(weights, v[:, :3], 2)
  with pytest.raises(ValueError):
    va.attention_weights(q, k, kernel='cosine')


@pytest.fixture(scope='module')
def smoke():
  """A random-init relu smoke model on synthetic tokens, and the inputs of its first batch."""
  config = config_cli.get_config('configs/listops.py:vanilla,smoke')
  run = capture.random_run(config, 'relu', num_batches=1, synthetic=True)
  batch = next(run.batches())
  return run, {name: value for name, value in batch.items() if name != 'targets'}


def test_capture_sees_each_layer_and_exact_recomputes_the_model(smoke):
  run, inputs = smoke
  recomputed = []

  def check(call, x):
    exact = jnp.swapaxes(approximations.approximate(call, 'relu', 'exact', 0), -3, -2)
    recomputed.append((call.layer, call.query.shape, call.mask.shape,
                       float(jnp.max(jnp.abs(exact - x)))))
    return x

  with nn.intercept_methods(capture._intercepting(check)):
    run.model.apply({'params': run.params}, inputs, train=False)
  assert len(recomputed) == 2                              # smoke model: 2 layers
  assert recomputed[0][0] == 'encoder/encoderblock_0/attention'
  assert recomputed[0][1][1] == 2                          # [B, heads, L, head_dim]
  length = recomputed[0][1][2]
  assert recomputed[0][2] == (recomputed[0][1][0], 1, length, length)  # query and key padding
  for *_, difference in recomputed:
    assert difference < 1e-5


def test_layer_errors_rank_value_aware_first(smoke):
  run, inputs = smoke
  calls = capture.capture_attention(run.model, run.params, inputs)
  rows = approximations.layer_errors(calls[1], 'relu', [2], max_queries=64)
  table = {row['method']: row for row in rows}
  assert set(table) == {'oblivious', 'oblivious_raw', 'value_aware'}
  assert table['value_aware']['queries'] == 64
  assert table['value_aware']['rel_error'] <= table['oblivious']['rel_error'] + 1e-5
  assert 2 / 64 <= table['oblivious']['top_r_mass'] <= 1.0


def test_replacing_a_layer_by_a_lossless_approximation_keeps_predictions(smoke):
  run, _ = smoke
  model, targets = capture.predictions(run, None)
  assert model.shape == targets.shape
  # r >= n keeps every key, so the replaced layer computes exactly what the model did.
  big_r = approximations.replacement('relu', 'oblivious', 10_000,
                                     'encoder/encoderblock_0/attention')
  np.testing.assert_array_equal(capture.predictions(run, big_r)[0], model)


def test_markdown_and_plots_cover_every_run_layer_and_r(tmp_path):
  errors = [{'run': 'a', 'kernel': 'relu', 'layer': 'l0', 'r': r, 'method': m,
             'rel_error': 0.1, 'top_r_mass': 0.5, 'queries': 4}
            for r in (1, 2) for m in ('oblivious', 'oblivious_raw', 'value_aware')]
  accuracies = [{'run': 'a', 'kernel': 'relu', 'layer': layer, 'r': r, 'method': m,
                 'accuracy': 0.5, 'agreement': 1.0}
                for layer, r, m in [('none', 0, 'model'), ('all', 0, 'exact'),
                                    ('l0', 1, 'oblivious'), ('l0', 1, 'value_aware')]]
  table = report.markdown(errors, accuracies)
  assert table.count('| a | relu | l0 |') == 3
  report.plot(errors, accuracies, str(tmp_path))
  for name in ('errors.png', 'accuracy.png'):
    assert os.path.getsize(tmp_path / name) > 0


@pytest.mark.parametrize('args, message', [
    (['--random_init'], '--random_init needs --config'),
    (['--random_init', '--config', 'configs/nope.py'], "config file 'configs/nope.py' does not"),
    (['--workdir', 'w', '--r', '1,0'], "--r must list integers >= 1, got '1,0'"),
    (['--workdir', 'w', '--num_batches', '0'], '--num_batches must be >= 1'),
    ([], 'give either --workdir'),
])
def test_command_line_rejects_bad_arguments(args, message, capsys):
  with pytest.raises(SystemExit):
    main(args)
  assert message in capsys.readouterr().err
