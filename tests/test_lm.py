"""Tests of the language-model path: text folders, causal and masked LMs on the one trainer. The
studies on language models (studies.lm) are tested in tests/test_lm_study.py."""
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import lm_config
from flax.training import train_state

from configs import lm
from lra import build, data, evaluate, models, progress, steps, train
from lra.data import text_folder
from lra.data.info import LM_MASK_ID

# Compilation dominates these tiny models (tests/conftest.py).
pytestmark = pytest.mark.usefixtures('fast_compilation')


def _write(folder, files: dict[str, bytes]) -> str:
  os.makedirs(folder, exist_ok=True)
  for name, content in files.items():
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(content)
  return str(folder)


# ----------------------------------------------------------------------------- text folders


def test_read_folder_joins_matching_files_in_path_order(tmp_path):
  folder = _write(tmp_path, {'b.txt': 'é\n'.encode(), 'a.txt': b'x', 'sub/c.txt': b'yz',
                             'skip.bin': b'\xff'})
  corpus = text_folder.read_folder(folder)
  assert bytes(corpus) == b'x' + 'é\n'.encode() + b'yz'
  assert bytes(text_folder.read_folder(folder, '*.txt')) == b'x' + 'é\n'.encode()


def test_read_folder_names_a_file_that_is_not_utf8(tmp_path):
  folder = _write(tmp_path, {'good.txt': b'fine', 'bad.txt': b'ok \xc3\x28 no'})
  with pytest.raises(ValueError, match=r'bad\.txt is not UTF-8 text: .* at byte 3'):
    text_folder.read_folder(folder)


@pytest.mark.parametrize('files, message', [
    ({}, r"no file under .* matches '\*\*/\*\.txt'"),
    ({'notes.md': b'text'}, r"no file under .* matches '\*\*/\*\.txt'"),
    ({'a.txt': b'', 'b.txt': b''}, r'the 2 files under .* are empty'),
])
def test_read_folder_refuses_an_empty_corpus(tmp_path, files, message):
  with pytest.raises(ValueError, match=message):
    text_folder.read_folder(_write(tmp_path / 'text', files))


def test_read_folder_refuses_a_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist or is not a folder'):
    text_folder.read_folder(str(tmp_path / 'missing'))


def test_corpus_too_short_for_a_window(tmp_path):
  folder = _write(tmp_path, {'a.txt': b'a' * 500})
  with pytest.raises(ValueError, match=r'validation part \(25 bytes.* max_length \+ 1 = 33'):
    text_folder.build_splits(folder, 32)


def test_task_info_of_lm():
  info = data.task_info('lm', max_length=32, objective='masked_lm')
  assert (info.vocab_size, info.num_classes, info.objective) == (258, 258, 'masked_lm')
  assert data.task_info('lm').objective == 'causal_lm'
  with pytest.raises(ValueError, match='objective must be one of'):
    data.task_info('lm', objective='classification')


def test_causal_and_masked_examples(tmp_path):
  text = bytes(range(32, 127)) * 20
  folder = _write(tmp_path, {'a.txt': text})
  ids = np.frombuffer(text, np.uint8).astype(np.int32) + 1
  bounds = text_folder.split_bounds(len(text))
  causal = text_folder.build_splits(folder, 16, 'causal_lm')
  validation = [causal['validation'].decode(offset) for offset in causal['validation'].records]
  start = bounds['validation'][0]
  assert len(validation) == (bounds['validation'][1] - start - 1) // 16
  for i, example in enumerate(validation):  # consecutive windows, targets shifted by one
    np.testing.assert_array_equal(example['inputs'], ids[start + 16 * i:start + 16 * i + 16])
    np.testing.assert_array_equal(example['targets'], ids[start + 16 * i + 1:start + 16 * i + 17])
    assert example['target_weights'].sum() == 16
    assert all(example[name].dtype == np.int32 for name in example)
  masked = text_folder.build_splits(folder, 16, 'masked_lm')['train']
  # A window at every offset whose 17 bytes lie in the train part.
  assert list(masked.records) == list(range(bounds['train'][1] - 16))
  for offset in masked.records[::7]:
    example = masked.decode(offset)
    window, chosen = ids[offset:offset + 16], example['target_weights'] > 0
    assert chosen.any()
    np.testing.assert_array_equal(example['targets'], window)
    np.testing.assert_array_equal(example['inputs'], np.where(chosen, LM_MASK_ID, window))
    np.testing.assert_array_equal(masked.decode(offset)['inputs'], example['inputs'])
  rates = np.mean([masked.decode(offset)['target_weights'] for offset in masked.records])
  assert abs(rates - text_folder.MASK_RATE) < 0.03


def test_lm_batches_through_the_task(tmp_path):
  # 4,000 bytes: validation holds 200, i.e. 12 windows of 16 = 3 batches of 4, 2 processes.
  folder = _write(tmp_path, {'a.txt': bytes(range(32, 72)) * 100})
  make = lambda i: data.get_task('lm', folder, batch_size=4, max_length=16, seed=3,
                                 objective='masked_lm', shard=grain.sharding.ShardOptions(i, 2))
  whole = data.get_task('lm', folder, batch_size=4, max_length=16, seed=3, objective='masked_lm')
  train_batch = next(iter(whole.train()))
  assert {name: a.shape for name, a in train_batch.items()} == dict.fromkeys(
      ('inputs', 'targets', 'target_weights'), (4, 16))
  shares = [list(make(i).validation()) for i in range(2)]
  joined = [np.concatenate([a['inputs'], b['inputs']]) for a, b in zip(*shares, strict=True)]
  np.testing.assert_array_equal(np.concatenate(joined),
                                np.concatenate([b['inputs'] for b in whole.validation()]))
  # In batches of 10, the last holds windows 10 and 11, both in process 0's share of 5 rows.
  short = data.get_task('lm', folder, batch_size=4, eval_batch_size=10, max_length=16,
                        shard=grain.sharding.ShardOptions(1, 2))
  last = list(short.validation())[-1]
  assert {name: a.shape for name, a in last.items()} == dict.fromkeys(
      ('inputs', 'targets', 'target_weights'), (0, 16))


# ----------------------------------------------------------------------------- models, training


def test_lm_config_args_and_the_objective_check():
  # That importing configs.lm starts no JAX is checked in test_configs.py; that a bad
  # config.attention.kernel fails build.build, in test_configs.py for every config.
  config = lm.get_config('masked,topk,kernel=relu,k=4,smoke')
  assert (config.task_options.objective, config.attention.kernel, config.attention.k) == (
      'masked_lm', 'relu', 4)
  assert isinstance(build.build(lm_config('causal')).model, models.LanguageModel)
  with pytest.raises(ValueError, match='objective must be one of'):
    build.build(lm_config('causal', **{'task_options.objective': 'classification'}))



@pytest.mark.parametrize('kind', ['vanilla', 'chunked', 'topk'])
def test_causal_lm_never_sees_the_future(kind):
  # Query chunks of 5 do not divide 16 positions; top-k keeps 3 keys.
  config = lm_config(f'causal,{kind},smoke,k=3,query_chunk_size=5', max_length=16)
  info = data.task_info('lm', max_length=16, **config.task_options)
  model = models.build_model(config, info)
  inputs = jax.random.randint(jax.random.key(0), (2, 16), 1, 257)
  params = model.init(jax.random.key(1), {'inputs': inputs}, train=False)['params']
  logits = model.apply({'params': params}, {'inputs': inputs}, train=False)
  for position in (1, 9, 15):
    changed = inputs.at[:, position].set(inputs[:, position] % 256 + 1)
    other = model.apply({'params': params}, {'inputs': changed}, train=False)
    np.testing.assert_array_equal(other[:, :position], logits[:, :position])
    assert not np.allclose(other[:, position], logits[:, position])


def test_masked_lm_sees_both_sides():
  config = lm_config('masked,smoke', max_length=16)
  info = data.task_info('lm', max_length=16, **config.task_options)
  model = models.build_model(config, info)
  inputs = jax.random.randint(jax.random.key(0), (1, 16), 1, 257)
  params = model.init(jax.random.key(1), {'inputs': inputs}, train=False)['params']
  logits = model.apply({'params': params}, {'inputs': inputs}, train=False)
  other = model.apply({'params': params}, {'inputs': inputs.at[:, 9].set(LM_MASK_ID)},
                      train=False)
  assert not np.allclose(other[:, 0], logits[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['causal', 'masked'])
def test_lm_loss_decreases_on_a_small_real_corpus(objective):
  config = lm_config(f'{objective},smoke', num_train_steps=40)
  task, trainer = build.setup(config)
  state = trainer.init_state()
  losses = []
  batches = iter(task.train())
  for _ in range(40):
    state, metrics = trainer.step(state, next(batches))
    losses.append(float(metrics['loss']))
  # log(258) = 5.55 nats at random; byte frequencies alone bring it far below.
  assert np.mean(losses[:3]) > 5.0 and np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.5
  results = trainer.evaluate(state.params, task.validation())
  assert results['loss'] < 4.5 and 0.0 < results['accuracy'] < 1.0


def test_eval_step_counts_scored_tokens_of_real_examples():
  logits = jnp.zeros((3, 4, 5)).at[..., 2].set(1.0)
  batch = {'targets': jnp.full((3, 4), 2), 'target_weights': jnp.array(
      [[1, 0, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]), 'weights': jnp.array([1.0, 1.0, 0.0])}
  sums = steps.eval_step(None, batch, apply_fn=lambda *args, **kwargs: logits)
  assert (float(sums['count']), float(sums['correct'])) == (6.0, 6.0)


def test_logged_train_metrics_are_means_over_scored_tokens():
  # Masked-LM batches scoring 1, 2 and 1 tokens: the logged means weight each token once, not
  # each batch (per batch, accuracy would be (1 + 0 + 1) / 3).
  logits = jnp.log(jnp.array([1.0, 3.0, 1e-9]))  # predicts class 1 with probability 3/4
  state = train_state.TrainState.create(
      apply_fn=lambda variables, batch, **kwargs: jnp.broadcast_to(
          logits, batch['targets'].shape + (3,)),
      params={'unused': jnp.zeros(())}, tx=optax.sgd(0.0))
  step_fn = jax.jit(lambda state, batch: steps.train_step(
      state, batch, dropout_key=jax.random.key(0), schedule=optax.constant_schedule(0.5)))
  metrics = progress.TrainMetrics({})
  batches = [([[1, 1]], [[1, 0]]), ([[0, 0]], [[1, 1]]), ([[1, 0]], [[1, 0]])]
  for step, (targets, weights) in enumerate(batches, 1):
    state, step_metrics = step_fn(
        state, {'targets': jnp.array(targets), 'target_weights': jnp.array(weights)})
    metrics.add(step, step_metrics)
  metrics.fetch(keep_last=False)
  summary = metrics.summary()
  # Scored: one right (class 1), two wrong (class 0) and one right: 2 of 4 tokens right.
  losses = [-np.log(0.75), -np.log(0.25), -np.log(0.25), -np.log(0.75)]
  assert summary['accuracy'] == pytest.approx(0.5)
  assert summary['loss'] == pytest.approx(np.mean(losses), rel=1e-5)
  assert summary['learning_rate'] == pytest.approx(0.5)


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory):
  """A causal smoke LM trained for 6 steps: (config, workdir, results)."""
  workdir = str(tmp_path_factory.mktemp('lm') / 'causal_softmax')
  config = lm_config('causal,smoke', num_train_steps=6)
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_evaluate_with_every_hidden_unit_and_key_kept_equals_the_dense_model(lm_run):
  config, workdir, results = lm_run
  # top-k over all 64 hidden units and all 64 keys is the dense model.
  swapped = lm_config('causal,topk,smoke,k=64', num_train_steps=6, **{'ffn.kind': 'topk',
                                                                     'ffn.k': 64})
  evaluated = evaluate.evaluate(swapped, workdir)
  assert evaluated['tag'].startswith('topk_k64_ffntopk_k64_')
  for split in ('validation', 'test'):
    assert evaluated[split]['loss'] == pytest.approx(results['best'][split]['loss'], rel=1e-5)
    assert evaluated[split]['accuracy'] == pytest.approx(results['best'][split]['accuracy'],
                                                         abs=1e-6)
