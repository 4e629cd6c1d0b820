"""`python -m lra.data.prepare_tfds` runs the real IMDB and CIFAR-10 builders on fake archives.

Only the download is replaced (by small local files in the published formats); the builders, the
preparation and the reading back through `get_task` are the ones the documented command uses.
Preparing needs TensorFlow (the TFDS builders import it; it is pinned in requirements-dev.txt);
reading the prepared ArrayRecord files does not, which a subprocess checks.
"""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import app, flags
from absl.testing import flagsaver

from lra.data import get_task, image, prepare_tfds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMDB_URL = 'http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
REVIEWS = {'train': {'pos': ['Great film.', 'Loved it \u2764'], 'neg': ['Dull.']},
           'test': {'pos': ['A classic.'], 'neg': ['Awful acting.', 'Too long']}}


def fake_imdb(path: str) -> str:
  """aclImdb_v1.tar.gz layout: aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt, train/unsup."""
  with tarfile.open(path, 'w:gz') as archive:
    files = {f'aclImdb/{split}/{label}/{i}_5.txt': text
             for split, labels in REVIEWS.items() for label, texts in labels.items()
             for i, text in enumerate(texts)}
    files['aclImdb/train/unsup/0_0.txt'] = 'Unlabelled.'
    for name, text in files.items():
      data = text.encode('utf-8')
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return path


def fake_cifar10(root: str, rng: np.random.Generator) -> tuple[str, dict[str, np.ndarray]]:
  """cifar-10-batches-bin/: records of label byte + 3072 bytes (R, G, B planes of 32 x 32)."""
  folder = os.path.join(root, 'cifar-10-batches-bin')
  os.makedirs(folder)
  with open(os.path.join(folder, 'batches.meta.txt'), 'w') as f:
    f.write('\n'.join(f'class{i}' for i in range(10)) + '\n')
  images = {}
  for k, name in enumerate([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']):
    records = []
    for label in (k, k + 4):  # two images per file, 10 train, 2 test
      planes = rng.integers(0, 256, (3, 32, 32), np.uint8)
      images.setdefault('test' if name == 'test_batch' else 'train', []).append((label, planes))
      records.append(bytes([label]) + planes.tobytes())
    with open(os.path.join(folder, f'{name}.bin'), 'wb') as f:
      f.write(b''.join(records))
  return root, images


def run_main(*args: str) -> None:
  with flagsaver.flagsaver():
    prepare_tfds.main(flags.FLAGS(['prepare_tfds', *args]))


def byte_ids(text: str, length: int) -> list[int]:
  ids = np.zeros(length, int)
  data = np.frombuffer(text.encode('utf-8')[:length], np.uint8)
  ids[:len(data)] = data + 1
  return ids.tolist()


def sorted_rows(dataset) -> list[tuple[int, list[int]]]:
  return sorted((int(t), x.tolist()) for b in dataset
                for x, t in zip(b['inputs'], b['targets'], strict=True))


@pytest.mark.slow
def test_prepare_then_get_task_reads_the_examples(tmp_path):
  downloads = tmp_path / 'downloads'
  os.makedirs(downloads)
  cifar_root, images = fake_cifar10(str(downloads), np.random.default_rng(0))
  files = {IMDB_URL: fake_imdb(str(downloads / 'imdb.tar.gz')), CIFAR10_URL: cifar_root}
  fetch = lambda self, url: files[url]
  data_dir = str(tmp_path / 'lra_release')
  with mock.patch.object(tfds.download.DownloadManager, 'download', fetch), \
       mock.patch.object(tfds.download.DownloadManager, 'download_and_extract', fetch):
    run_main(f'--data_dir={data_dir}')
  assert sorted(os.listdir(os.path.join(data_dir, 'tfds'))) == ['cifar10', 'downloads',
                                                                'imdb_reviews']
  # Reading the prepared data imports no TensorFlow (checked in a process that runs meanwhile).
  script = ('import sys\n'
            'from lra.data import get_task\n'
            'for name in ("text", "image"):\n'
            f'  print(name, len(list(get_task(name, {data_dir!r}, batch_size=2).test())))\n'
            'print("tensorflow" in sys.modules)\n')
  reader = subprocess.Popen([sys.executable, '-c', script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

  text = get_task('text', data_dir, batch_size=2, max_length=16)
  label_ids = {'neg': 0, 'pos': 1}
  expected = sorted((label_ids[label], byte_ids(review, 16))
                    for label, reviews in REVIEWS['test'].items() for review in reviews)
  assert sorted_rows(text.test()) == expected

  cifar = get_task('image', data_dir, batch_size=2)
  # The conversion itself is checked against TensorFlow below.
  gray = lambda planes: image.grayscale(planes.transpose(1, 2, 0)).ravel()
  expected = {split: sorted((label, gray(planes).tolist()) for label, planes in examples)
              for split, examples in images.items()}
  assert sorted_rows(cifar.test()) == expected['test']
  validation = sorted_rows(cifar.validation())  # train[90%:] of 10 images
  assert len(validation) == 1 and validation[0] in expected['train']

  stdout, stderr = reader.communicate(timeout=120)
  assert stdout.split() == ['text', '2', 'image', '1', 'False'], stderr[-2000:]


def all_colors() -> np.ndarray:
  """uint8 [4096, 4096, 3]: every RGB color once."""
  c = np.arange(1 << 24, dtype=np.uint32)
  return np.stack([c >> 16, (c >> 8) & 255, c & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)


def exact_levels(rgb: np.ndarray) -> np.ndarray:
  """float64 [...]: the grayscale level before truncation, as real arithmetic gives it."""
  weights = image._GRAY_WEIGHTS.astype(np.float64)  # the float32 weights, exactly
  return rgb.astype(np.float64) @ weights / 255 * 255.5


# float32 evaluation in any order (matrix product, FMA or not) is within ~4e-5 of the exact level
# (seen: 3.4e-5 at most over all colors); colors whose level lies nearer than this to an integer
# may truncate to either side. 3,355 of the 2^24 colors are that near.
BOUNDARY = 1e-4


def test_grayscale_is_the_exact_level_away_from_boundaries():
  rgb = all_colors()
  exact = exact_levels(rgb)
  near = np.abs(exact - np.round(exact)) < BOUNDARY
  assert near.sum() == 3355
  gray = image.grayscale(rgb)
  ours = gray.astype(np.int64)
  np.testing.assert_array_equal(ours[~near], np.floor(exact[~near]))
  assert np.abs(ours[near] - np.floor(exact[near] + 0.5)).max() <= 1
  # Elementwise IEEE float32 has one answer on every machine, boundary colors included: the bytes
  # the models train on are these everywhere (a matrix product or float64 would change them).
  assert hashlib.sha256(gray.tobytes()).hexdigest() == (
      '824a76d81dad2c5a2cf1fa0b2c0a5afe7d871ec2970e4fa2809b53ddbecdca93')


@pytest.mark.slow  # imports TensorFlow: seconds per process
def test_grayscale_equals_tensorflow_on_every_color_away_from_boundaries():
  # TensorFlow's float32 matrix product rounds by the CPU's vector code (AVX-512 and FMA move the
  # last bit), so it agrees exactly only away from level boundaries, and within one level there.
  rgb = all_colors()
  exact = exact_levels(rgb)
  near = np.abs(exact - np.round(exact)) < BOUNDARY
  ours = image.grayscale(rgb).astype(np.int64)
  import tensorflow as tf  # here, not at collection: importing it takes seconds per worker
  theirs = tf.image.rgb_to_grayscale(rgb).numpy()[..., 0].astype(np.int64)
  np.testing.assert_array_equal(ours[~near], theirs[~near])
  assert np.abs(ours[near] - theirs[near]).max() <= 1


@pytest.mark.parametrize('args, match', [
    ([], '--data_dir is required'),
    (['--data_dir=/tmp/x', '--datasets=mnist'], "some of imdb_reviews, cifar10, got \\['mnist'\\]"),
    (['--data_dir=/tmp/x', '--datasets='], 'some of imdb_reviews, cifar10, got \\[\\]'),
    (['--data_dir=/tmp/x', 'extra'], 'Unexpected arguments'),
])
def test_command_line_rejects_bad_arguments(args, match):
  with pytest.raises(app.UsageError, match=match):
    run_main(*args)
