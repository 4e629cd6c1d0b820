"""Tests of lra.data: registry, pipelines (ListOps, retrieval, Pathfinder, TFDS tasks)."""
import json
import logging
import os
import subprocess
import sys
import time

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from lra.data import TASK_NAMES, TaskInfo, get_task, listops, task_info
from lra.data.pipeline import Split, Task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTOPS_HEADER = 'Source\tTarget\n'
LISTOPS_ROWS = ['( ( ( ( [MAX 2 ) 9 ) 4 ) ] )\t9', '( ( ( [SM 3 ) 8 ) ] )\t1',
                '( ( ( [MIN ( ( ( [MED 1 ) 5 ) ] ) ) 7 ) ] )\t3', '6\t6',
                '( ( ( ( [MED 0 ) 2 ) 4 ) ] )\t2']


def write(path, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def listops_dir(root, train_rows=LISTOPS_ROWS * 4, header=True):
  head = LISTOPS_HEADER if header else ''
  for name, rows in (('train', train_rows), ('val', LISTOPS_ROWS), ('test', LISTOPS_ROWS[:3])):
    write(os.path.join(root, 'listops-1000', f'basic_{name}.tsv'), head + '\n'.join(rows) + '\n')
  return str(root)


def batches(dataset, n=None):
  iterator = iter(dataset)
  return list(iterator) if n is None else [next(iterator) for _ in range(n)]


def ids(*tokens):
  return [listops.TOKENS.index(t) + 1 for t in tokens]


# ---------------------------------------------------------------- registry

def test_task_info_defaults():
  assert TASK_NAMES == ('listops', 'text', 'retrieval', 'image', 'pathfinder32', 'pathfinder64',
                        'pathfinder128', 'pathfinder256', 'pathx', 'lm')
  assert task_info('listops') == TaskInfo('listops', 16, 10, 2000, False)
  assert task_info('text') == TaskInfo('text', 257, 2, 1000, False)
  assert task_info('retrieval') == TaskInfo('retrieval', 257, 2, 4000, True)
  assert task_info('image') == TaskInfo('image', 256, 10, 1024, False)
  assert task_info('pathfinder64', difficulty='easy') == TaskInfo('pathfinder64', 256, 2, 4096)
  assert task_info('pathx').max_length == 128 * 128
  assert task_info('text', max_length=4000).max_length == 4000


@pytest.mark.parametrize('call, match', [
    (lambda: task_info('cifar'), 'listops, text, retrieval, image, pathfinder32'),
    (lambda: task_info('listops', difficulty='hard'), "Unknown task_options.*'difficulty'"),
    (lambda: task_info('pathfinder32', difficulty='medium'), "'easy', 'intermediate', 'hard'"),
    (lambda: task_info('pathfinder32', foo=1), r"\['foo'\].*\['difficulty'\]"),
    (lambda: task_info('text', max_length=0), 'max_length must be positive'),
])
def test_task_info_rejects_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_get_task_rejects_missing_data_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    get_task('listops', str(tmp_path / 'nowhere'), batch_size=2)


# ---------------------------------------------------------------- ListOps

def test_listops_batches(tmp_path):
  task = get_task('listops', listops_dir(tmp_path), batch_size=3, eval_batch_size=2)
  assert task.info == task_info('listops')
  batch = batches(task.train(), 1)[0]
  assert batch['inputs'].shape == (3, 2000) and batch['inputs'].dtype == np.int32
  assert batch['targets'].shape == (3,) and batch['targets'].dtype == np.int32
  validation = batches(task.validation())
  assert [len(b['targets']) for b in validation] == [2, 2, 1]
  first = validation[0]['inputs'][0]
  np.testing.assert_array_equal(first[:6], ids('[MAX', '2', '9', '4', ']') + [0])
  assert not first[5:].any()
  assert [b['targets'].tolist() for b in validation] == [[9, 1], [3, 6], [2]]
  assert sum(len(b['targets']) for b in batches(task.test())) == 3


def test_listops_without_header_and_truncation(tmp_path):
  task = get_task('listops', listops_dir(tmp_path, header=False), batch_size=2, max_length=3)
  inputs = np.concatenate([b['inputs'] for b in batches(task.validation())])
  np.testing.assert_array_equal(inputs[0], ids('[MAX', '2', '9'))
  np.testing.assert_array_equal(inputs[3], ids('6') + [0, 0])
  assert inputs.shape == (5, 3)


def test_listops_cuts_are_logged_once_per_split_or_refused(tmp_path, caplog):
  root = listops_dir(tmp_path)  # rows of 5, 4, 7, 1 and 5 tokens; train is them 4 times
  with caplog.at_level(logging.WARNING):
    get_task('listops', root, batch_size=2, max_length=4)
  cuts = [r.getMessage() for r in caplog.records if 'max_length=4' in r.getMessage()]
  assert [m.split(':')[0] for m in cuts] == ['listops train', 'listops validation', 'listops test']
  assert ('12 of 20 input sequences are longer than max_length=4 and are cut to it (longest 7 '
          'tokens, 1.7 tokens dropped on average)') in cuts[0]
  assert '2 of 3 input sequences' in cuts[2] and '2.0 tokens dropped' in cuts[2]
  with pytest.raises(ValueError, match=r'listops train: example 0 \(0-based, in the split\'s '
                                       r'order\) has 5 tokens, more than max_length=4.*to 7'):
    get_task('listops', root, batch_size=2, max_length=4, truncate=False)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    get_task('listops', root, batch_size=2, max_length=7, truncate=False)
  assert not caplog.records


def test_listops_accepts_folder_containing_lra_release(tmp_path):
  listops_dir(tmp_path / 'lra_release')
  task = get_task('listops', str(tmp_path), batch_size=2)
  assert sum(len(b['targets']) for b in batches(task.validation())) == 5


def test_train_shuffle_is_seeded_and_reshuffles_each_epoch(tmp_path):
  rows = [f'( ( [SM {i % 10} ) ] )\t{i % 10}' for i in range(10)]
  root = listops_dir(tmp_path, train_rows=rows)
  make = lambda seed: get_task('listops', root, batch_size=5, max_length=4, seed=seed).train()
  first = [b['inputs'][:, 1].tolist() for b in batches(make(0), 6)]
  assert first == [b['inputs'][:, 1].tolist() for b in batches(make(0), 6)]
  assert first != [b['inputs'][:, 1].tolist() for b in batches(make(1), 6)]
  epochs = [sorted(first[i] + first[i + 1]) for i in (0, 2, 4)]
  assert all(epoch == sorted(ids(*map(str, range(10)))) for epoch in epochs)
  assert first[0] + first[1] != first[2] + first[3]  # a new order each epoch


def assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual, strict=True):
    assert want.keys() == got.keys()
    for name in want:
      np.testing.assert_array_equal(want[name], got[name])


def test_train_state_restores_the_same_stream(tmp_path):
  task = get_task('listops', listops_dir(tmp_path), batch_size=3, seed=7)
  iterator = iter(task.train())
  full = [next(iterator) for _ in range(12)]
  resumed = iter(task.train())
  resumed.set_state(json.loads(json.dumps(batches_state(task, 9))))  # as a checkpoint holds it
  assert_batches_equal(full[9:], [next(resumed) for _ in range(3)])


def batches_state(task, consumed):
  """The train iterator's state after `consumed` batches, reached by reading them."""
  iterator = iter(task.train())
  for _ in range(consumed):
    next(iterator)
  return iterator.get_state()


def counting_task(decoded, num_records, **kwargs):
  """A Task over records 0..num_records-1 (inputs [4] all = the record) in every split; `decoded`
  collects the records decoded."""

  def decode(record):
    decoded.append(record)
    return {'inputs': np.full(4, record, np.int32), 'targets': np.int32(record % 2)}

  split = Split(range(num_records), decode, None)
  return Task(task_info('listops', max_length=4),
              dict.fromkeys(('train', 'validation', 'test'), split), **kwargs)


def test_each_process_reads_only_its_share_of_every_batch():
  whole = counting_task([], 10, batch_size=4, seed=5)
  decoded = [[], []]
  shares = [counting_task(decoded[i], 10, batch_size=4, seed=5,
                          shard=grain.sharding.ShardOptions(i, 2)) for i in range(2)]
  joined = lambda streams: [{name: np.concatenate([b[name] for b in parts]) for name in parts[0]}
                            for parts in zip(*streams, strict=True)]
  # Train: the shares (2 rows each), in process order, are the batches of one process.
  assert_batches_equal(batches(whole.train(), 7), joined([batches(t.train(), 7) for t in shares]))
  # Eval: 10 records in batches of 4; the last batch has 2 records, all in process 0's share.
  # Fresh tasks, so that records the train iterators still decode ahead (prefetch) are not logged.
  decoded = [[], []]
  shares = [counting_task(decoded[i], 10, batch_size=4, seed=5,
                          shard=grain.sharding.ShardOptions(i, 2)) for i in range(2)]
  validation = [batches(t.validation()) for t in shares]
  assert [len(b['targets']) for b in validation[0]] == [2, 2, 2]
  assert [len(b['targets']) for b in validation[1]] == [2, 2, 0]
  assert validation[1][2]['inputs'].shape == (0, 4)
  assert_batches_equal(batches(whole.validation()), joined(validation))
  assert sorted(decoded[0]) == [0, 1, 4, 5, 8, 9] and sorted(decoded[1]) == [2, 3, 6, 7]
  with pytest.raises(ValueError, match='batch_size 5 does not divide among 2 processes'):
    counting_task([], 10, batch_size=5, shard=grain.sharding.ShardOptions(1, 2))


def test_resume_late_in_a_long_stream_decodes_only_what_it_returns(capsys):
  # Record 30,000,000 of the stream of a 20-record split (1.5 million epochs), batch 8: the
  # restored iterator reads batch 3,750,000 without touching any record before it.
  decoded = []
  task = counting_task(decoded, 20, batch_size=8, seed=1)
  position = 30_000_000 // 8
  before = iter(task.train())
  before.set_state({'next_index': position - 1})
  expected = [next(before) for _ in range(2)][1]
  decoded.clear()
  start = time.perf_counter()
  resumed = iter(task.train())
  resumed.set_state({'next_index': position})
  batch = next(resumed)
  seconds = time.perf_counter() - start
  assert_batches_equal([expected], [batch])
  assert resumed.get_state() == {'next_index': position + 1}
  # The returned batch, and at most the 4 batches prefetched after it, are decoded.
  assert 8 <= len(decoded) <= 8 * 5, len(decoded)
  with capsys.disabled():
    print(f'\nresume at record 30,000,000: {seconds:.3f} s to the first batch')


def test_listops_missing_file_names_path_and_generator(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    get_task('listops', str(tmp_path), batch_size=2)
  message = str(error.value)
  assert os.path.join(str(tmp_path), 'listops-1000', 'basic_train.tsv') in message
  assert 'python -m lra.data.listops_gen' in message and 'lra_release.gz' in message


@pytest.mark.parametrize('row, match', [
    ('( [MAX 2 ] )\t3\textra', 'line 3: expected 2 tab-separated columns'),
    ('( [MAX 2 ] )\tnine', "line 3: Target must be an integer in \\[0, 10\\), got 'nine'"),
    ('( [MAX 2 ] )\t10', 'line 3: Target must be'),
    ('( [MAX 23 ] )\t2', "line 3: malformed Source: unknown token '23'"),
    ('( [MAX a ] )\t2', "line 3: malformed Source: unknown token 'a'"),
    ('] ] ] 3\t3', 'line 3: malformed Source: ] at token 1 closes no operator'),
    ('( ( [MAX 2 ) 9 )\t9', r'line 3: malformed Source: \[MAX at token 1 is never closed'),
    ('( [MAX 2 ] ) 3\t3', 'line 3: malformed Source: token 4 follows the end of the expression'),
    ('( [MIN 1 ( [SM ] ) ] )\t1', r'line 3: malformed Source: \[SM at token 3 has no arguments'),
    ('( )\t1', 'line 3: malformed Source: empty expression'),
])
def test_listops_malformed_rows(tmp_path, row, match):
  root = listops_dir(tmp_path, train_rows=LISTOPS_ROWS[:1] + [row])
  with pytest.raises(ValueError, match=match) as error:
    get_task('listops', root, batch_size=2)
  assert os.path.join('listops-1000', 'basic_train.tsv') in str(error.value)


@pytest.mark.parametrize('source, match', [
    ('] ] ] 3', '] at token 1 closes no operator'),
    ('[MAX 2 9', r'\[MAX at token 1 is never closed by \]'),
    ('[MIN 1 [MAX 2 ]', r'\[MIN at token 1 is never closed'),
    ('[MAX 2 ] ]', 'token 4 follows the end of the expression at token 3'),
    ('6 7', 'token 2 follows the end of the expression at token 1'),
    ('[MAX ] 3', r'\[MAX at token 1 has no arguments'),
    ('[SM 1 [MED ] ]', r'\[MED at token 3 has no arguments'),
    (']', '] at token 1 closes no operator'),
    ('', 'empty expression'),
    ('[MAXa 1 ]', r"unknown token '\[MAXa'"),
    ('[MAX 2\u00a03 ]', r"unknown token '2\\xa03'"),  # not a separator
])
def test_listops_encode_rejects_malformed_expressions(source, match):
  with pytest.raises(ValueError, match=match):
    listops.encode(source)


@pytest.mark.parametrize('source, tokens', [
    ('7', ['7']),
    ('[SM 4 ]', ['[SM', '4', ']']),
    ('( ( ( [MIN 1 ) ( ( [MAX 2 ) 3 ) ] ) ) ] )', ['[MIN', '1', '[MAX', '2', '3', ']', ']']),
    ('[MED [SM 1 ] [MIN 2 3 ] 4 ]', ['[MED', '[SM', '1', ']', '[MIN', '2', '3', ']', '4', ']']),
])
def test_listops_encode_accepts_well_formed_expressions(source, tokens):
  encoded = listops.encode(source)
  assert encoded.dtype == np.uint8 and encoded.tolist() == ids(*tokens)


def test_listops_names_line_and_byte_that_are_not_utf8(tmp_path):
  path = os.path.join(listops_dir(tmp_path), 'listops-1000', 'basic_train.tsv')
  start = os.path.getsize(path)
  with open(path, 'ab') as f:
    f.write(b'( [MAX 2 \xff ] )\t2\n')
  with pytest.raises(ValueError, match=f'basic_train.tsv, line 22: not UTF-8 text: invalid start '
                                       f'byte at byte {start + 9} of the file'):
    get_task('listops', str(tmp_path), batch_size=2)


def test_listops_skips_a_byte_order_mark(tmp_path):
  path = os.path.join(listops_dir(tmp_path), 'listops-1000', 'basic_train.tsv')
  plain = listops.read_tsv(path)
  with open(path, 'rb') as f:
    text = f.read()
  with open(path, 'wb') as f:
    f.write('\ufeff'.encode() + text)
  for got, expected in zip(listops.read_tsv(path), plain, strict=True):
    np.testing.assert_array_equal(got, expected)
  with open(path, 'wb') as f:
    f.write('\ufeff'.encode() + text + b'( [MAX \xff ] )\t2\n')
  with pytest.raises(ValueError, match=f'line 22: .* at byte {3 + len(text) + 7} of the file'):
    listops.read_tsv(path)


def test_listops_empty_split_is_an_error(tmp_path):
  root = listops_dir(tmp_path)
  write(os.path.join(root, 'listops-1000', 'basic_test.tsv'), LISTOPS_HEADER)
  with pytest.raises(ValueError, match='basic_test.tsv contains no examples'):
    get_task('listops', root, batch_size=2)


@pytest.mark.slow
def test_vocabulary_and_train_stream_are_the_same_in_a_new_process(tmp_path):
  expression = '( [MIN 0 ( ( ( [MED 1 ) 2 ) ] ) ( [SM 3 4 5 6 7 8 ( [MAX 9 ] ) ] ) ] )'
  expected = [1, 6, 3, 7, 8, 5, 4, 9, 10, 11, 12, 13, 14, 2, 15, 5, 5, 5]
  assert listops.encode(expression).tolist() == expected
  root = listops_dir(tmp_path)
  stream = lambda task: [b['inputs'][:, 0].tolist() for b in batches(task.train(), 4)]
  script = ('from lra.data import get_task, listops\n'
            f'print(listops.encode({expression!r}).tolist())\n'
            f'task = get_task("listops", {root!r}, batch_size=3, seed=3)\n'
            'print([b["inputs"][:, 0].tolist() for b, _ in zip(task.train(), range(4))])')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, check=True, env={**os.environ, 'PYTHONHASHSEED': '12345'})
  here = stream(get_task('listops', root, batch_size=3, seed=3))
  assert result.stdout.split('\n')[:2] == [str(expected), str(here)]


# ---------------------------------------------------------------- retrieval

def retrieval_dir(root, train_rows):
  rows = ['1\t7\t8\tab\tc', '0.0\tx\ty\tdocument two\t\u00e9']
  for name, split_rows in (('train', train_rows), ('eval', rows), ('test', rows[:1])):
    write(os.path.join(root, 'tsv_data', f'new_aan_pairs.{name}.tsv'),
          '\n'.join(split_rows) + '\n')
  return str(root)


def test_retrieval_batches(tmp_path):
  root = retrieval_dir(tmp_path, ['1\ta\tb\tx\ty'] * 5)
  task = get_task('retrieval', root, batch_size=2, max_length=5)
  assert task.info.dual
  train = batches(task.train(), 1)[0]
  assert set(train) == {'inputs1', 'inputs2', 'targets'}
  assert train['inputs1'].shape == (2, 5) and train['inputs1'].dtype == np.int32
  validation = batches(task.validation())
  assert len(validation) == 1
  batch = validation[0]
  np.testing.assert_array_equal(batch['inputs1'], [[ord('a') + 1, ord('b') + 1, 0, 0, 0],
                                                   [ord(c) + 1 for c in 'docum']])
  np.testing.assert_array_equal(batch['inputs2'], [[ord('c') + 1, 0, 0, 0, 0],
                                                   [0xC3 + 1, 0xA9 + 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch['targets'], [1, 0])
  assert sum(len(b['targets']) for b in batches(task.test())) == 1


def test_retrieval_cuts_are_counted_per_document(tmp_path, caplog):
  root = retrieval_dir(tmp_path, ['1\ta\tb\tx\ty'] * 5)
  with caplog.at_level(logging.WARNING):
    get_task('retrieval', root, batch_size=2, max_length=5)
  # Only validation has a document longer than 5 bytes: 'document two' (12).
  assert [r.getMessage().split(':')[0] for r in caplog.records] == ['retrieval validation']
  assert '1 of 4 input sequences' in caplog.text and '7.0 tokens dropped' in caplog.text
  with pytest.raises(ValueError, match='retrieval validation: example 1 .* has 12 tokens'):
    get_task('retrieval', root, batch_size=2, max_length=5, truncate=False)


@pytest.mark.parametrize('row, match', [
    ('1\ta\tb\tx', 'line 2: expected 5 tab-separated columns'),
    ('2\ta\tb\tx\ty', "line 2: label must be 0 or 1, got b'2'"),
    ('yes\ta\tb\tx\ty', 'line 2: label must be 0 or 1'),
])
def test_retrieval_malformed_rows(tmp_path, row, match):
  root = retrieval_dir(tmp_path, ['1\ta\tb\tx\ty', row])
  with pytest.raises(ValueError, match=match) as error:
    get_task('retrieval', root, batch_size=2)
  assert 'new_aan_pairs.train.tsv' in str(error.value)


def test_retrieval_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='tsv_data/new_aan_pairs.train.tsv'):
    get_task('retrieval', str(tmp_path), batch_size=2)


# ---------------------------------------------------------------- Pathfinder

def pathfinder_dir(root, size=4, folder='curv_contour_length_14', num_images=20):
  """Release-layout folder; image i has every pixel = i, label i % 2; sample_3 is empty."""
  base = os.path.join(root, f'pathfinder{size}', folder)
  for k in range(2):  # two metadata files; '10' sorts after '1' numerically only
    name = ('1', '10')[k]
    lines = []
    for i in range(k * num_images // 2, (k + 1) * num_images // 2):
      image_dir = os.path.join(base, 'imgs', name)
      os.makedirs(image_dir, exist_ok=True)
      path = os.path.join(image_dir, f'sample_{i}.png')
      if i == 3:
        open(path, 'wb').close()
      else:
        Image.fromarray(np.full((size, size), i, np.uint8)).save(path)
      lines.append(f'imgs/{name} sample_{i}.png {i} {i % 2} 1 14\n')
    write(os.path.join(base, 'metadata', f'{name}.npy'), ''.join(lines))
  return str(root)


def test_pathfinder_splits_pixels_and_skipped_images(tmp_path, caplog):
  pathfinder_dir(tmp_path / 'lra_release', size=32, num_images=21)
  with caplog.at_level(logging.WARNING):
    task = get_task('pathfinder32', str(tmp_path), batch_size=4, eval_batch_size=3,
                    max_length=16)
  assert 'skipped 1 missing or empty image files' in caplog.text
  assert ('pathfinder32 train: 16 of 16 input sequences are longer than max_length=16 and are cut '
          'to it (longest 1024 tokens, 1008.0 tokens dropped on average)') in caplog.text
  values = {name: [int(x) for b in batches(getattr(task, name)()) for x in b['inputs'][:, 0]]
            for name in ('validation', 'test')}
  # 20 readable images (sample_3 empty) in metadata order 0..20: 16 train, 2 val, 2 test.
  assert values == {'validation': [17, 18], 'test': [19, 20]}
  batch = batches(task.validation())[0]
  np.testing.assert_array_equal(batch['inputs'], np.full((2, 16), [[17], [18]]))
  np.testing.assert_array_equal(batch['targets'], [1, 0])
  train = batches(task.train(), 4)
  seen = sorted(int(x) for b in train for x in b['inputs'][:, 0])
  assert seen == [i for i in range(17) if i != 3]
  assert all(b['inputs'].dtype == np.int32 and b['inputs'].shape == (4, 16) for b in train)


def test_pathfinder_task_paths_and_corrupt_image(tmp_path):
  pathfinder_dir(tmp_path, size=32, folder='curv_baseline', num_images=12)
  task = get_task('pathfinder32', str(tmp_path), batch_size=2, difficulty='easy')
  assert task.info.max_length == 1024
  # 11 readable images: 8 train, 1 validation, 2 test (samples 10 and 11).
  assert [b['inputs'].shape for b in batches(task.test())] == [(2, 1024)]
  # A non-empty file that is not a PNG is an error naming it, when a batch reaches it.
  path = write(os.path.join(tmp_path, 'pathfinder32', 'curv_baseline', 'imgs', '10',
                            'sample_11.png'), 'not a png')
  task = get_task('pathfinder32', str(tmp_path), batch_size=2, difficulty='easy')
  with pytest.raises(ValueError, match=f'Pathfinder image {path} cannot be decoded'):
    batches(task.test())
  with pytest.raises(FileNotFoundError, match='pathfinder128/curv_contour_length_14/metadata'):
    get_task('pathx', str(tmp_path), batch_size=2)


@pytest.mark.parametrize('side', [64, 16])
def test_pathfinder_image_of_the_wrong_size_is_an_error(tmp_path, side):
  # E.g. a pathfinder64 image in the pathfinder32 folder: not cut to its first rows, an error.
  pathfinder_dir(tmp_path, size=32, num_images=12)
  path = os.path.join(tmp_path, 'pathfinder32', 'curv_contour_length_14', 'imgs', '10',
                      'sample_11.png')
  Image.fromarray(np.full((side, side), 11, np.uint8)).save(path)
  task = get_task('pathfinder32', str(tmp_path), batch_size=2)
  with pytest.raises(ValueError, match=f'Pathfinder image {path} is {side}x{side} pixels, not '
                                       '32x32'):
    batches(task.test())


def test_pathfinder_malformed_metadata(tmp_path):
  pathfinder_dir(tmp_path, size=32, num_images=10)
  write(os.path.join(tmp_path, 'pathfinder32', 'curv_contour_length_14', 'metadata', '1.npy'),
        'imgs/1 sample_0.png 0 1\nimgs/1 sample_1.png 1\n')
  with pytest.raises(ValueError, match=r'metadata/1.npy, line 2: expected'):
    get_task('pathfinder32', str(tmp_path), batch_size=2)


# ---------------------------------------------------------------- TFDS tasks

def test_text_from_mock_tfds(tmp_path, caplog):
  with tfds.testing.mock_data(num_examples=6), caplog.at_level(logging.WARNING):
    task = get_task('text', str(tmp_path), batch_size=4, eval_batch_size=4, max_length=64)
    train = batches(task.train(), 2)
    validation = batches(task.validation())
    texts = [x['text'].encode() for x in tfds.data_source('imdb_reviews', split='test')]
    get_task('text', str(tmp_path), batch_size=4, max_length=12)
    with pytest.raises(ValueError, match=r'text train: example \d+ .* more than max_length=12'):
      get_task('text', str(tmp_path), batch_size=4, max_length=12, truncate=False)
  # Validation's cuts, counted when the task is built, are its reviews over 12 bytes.
  cut = [len(text) - 12 for text in texts if len(text) > 12]
  assert (f'text validation: {len(cut)} of 6 input sequences are longer than max_length=12 and '
          f'are cut to it (longest {max(map(len, texts))} tokens, {np.mean(cut):.1f} tokens '
          'dropped') in caplog.text
  assert task.info == task_info('text', max_length=64)
  expected = np.zeros(64, np.int32)
  expected[:len(texts[0][:64])] = np.frombuffer(texts[0][:64], np.uint8) + 1
  np.testing.assert_array_equal(validation[0]['inputs'][0], expected)
  for batch in train + validation:
    assert batch['inputs'].dtype == np.int32 and batch['inputs'].shape[1] == 64
    assert set(np.unique(batch['targets'])) <= {0, 1}
    assert batch['inputs'].min() >= 0 and batch['inputs'].max() <= 256
    # Bytes come first, then only padding.
    for row in batch['inputs']:
      length = int((row > 0).sum())
      assert row[:length].all() and not row[length:].any()
  assert [len(b['targets']) for b in validation] == [4, 2]


def test_image_from_mock_tfds(tmp_path):
  with tfds.testing.mock_data(num_examples=5):
    task = get_task('image', str(tmp_path), batch_size=2, eval_batch_size=3)
    batch = batches(task.train(), 1)[0]
    test = batches(task.test())
  assert batch['inputs'].shape == (2, 1024) and batch['inputs'].dtype == np.int32
  assert batch['inputs'].max() <= 255 and batch['inputs'].min() >= 0
  assert set(np.unique(batch['targets'])) <= set(range(10))
  assert sum(len(b['targets']) for b in test) == 5


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
  os.makedirs(tmp_path / 'tfds')
  command = f'python -m lra.data.prepare_tfds --data_dir={tmp_path} --datasets=cifar10'
  with pytest.raises(FileNotFoundError, match=command):
    get_task('image', str(tmp_path), batch_size=2)


def test_every_task_has_one_split_builder():
  from lra.data import registry
  assert tuple(registry.BUILDERS) == TASK_NAMES
