"""`Task`: batched tf.data streams (train/validation/test) over the per-example records of a task.

Every task module describes each split as a `Split`: a dataset of cheap records in a fixed order
(row indices, file paths, raw text lines) plus a `decode` function that turns one record into an
example dict of int32 tensors. Shuffling happens on the records, so a full-dataset shuffle costs
memory for indices or paths only, and skipping batches on resume skips records without decoding.
"""
import dataclasses
from collections.abc import Callable, Mapping

import tensorflow as tf

from lra.data.info import TaskInfo

# The input pipeline runs on the host; keep TensorFlow off the accelerators JAX uses.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices; nothing left to hide.
  pass

Example = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a task.

  Attributes:
    records: unbatched dataset of per-example records, in a fixed order.
    decode: maps one record to an example dict: 'inputs' (or 'inputs1'/'inputs2') int32 [L] and
      'targets' int32 [].
    shuffle_buffer: train shuffle buffer, in records (the split size gives a full shuffle).
    skip_errors: drop records whose decoding fails (e.g. corrupt image files) with a warning.
  """

  records: tf.data.Dataset
  decode: Callable[..., Example]
  shuffle_buffer: int
  skip_errors: bool = False


def missing_release_file(what: str, path: str, hint: str = '') -> FileNotFoundError:
  """The error for a missing file or folder of the LRA release archive, saying how to get it."""
  return FileNotFoundError(
      f'{what} not found: {path}. Download and unpack the LRA release '
      '(https://storage.googleapis.com/long-range-arena/lra_release.gz) and pass its '
      f'lra_release folder as data_dir{hint}.')


def fit_length(tokens: tf.Tensor, max_length: int) -> tf.Tensor:
  """Truncates or zero-pads a token vector [n] to int32 [max_length] (0 = padding)."""
  tokens = tf.cast(tokens[:max_length], tf.int32)
  padded = tf.pad(tokens, [[0, max_length - tf.shape(tokens)[0]]])
  return tf.ensure_shape(padded, [max_length])


class Task:
  """Batched input streams of one LRA task; see `lra.data.get_task`."""

  def __init__(self, info: TaskInfo, splits: Mapping[str, Split], *, batch_size: int,
               eval_batch_size: int | None = None, seed: int = 0):
    if batch_size <= 0:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    if eval_batch_size is not None and eval_batch_size <= 0:
      raise ValueError(f'eval_batch_size must be positive, got {eval_batch_size}')
    missing = {'train', 'validation', 'test'} - set(splits)
    if missing:
      raise ValueError(f'splits must contain train, validation and test; missing {sorted(missing)}')
    self.info = info
    self._splits = dict(splits)
    self._batch_size = batch_size
    self._eval_batch_size = eval_batch_size or batch_size
    self._seed = seed

  def train(self, skip_batches: int = 0) -> tf.data.Dataset:
    """Infinite stream of shuffled batches, reshuffled each epoch, first `skip_batches` skipped.

    The stream depends only on the seed, so `train(n)` continues exactly where a run that
    consumed `n` batches of `train()` stopped (unless records fail to decode).

    Args:
      skip_batches: number of leading batches to skip (for resuming).

    Returns:
      Dataset of dicts of int32 arrays: inputs [B, L] (or inputs1/inputs2), targets [B].
    """
    if skip_batches < 0:
      raise ValueError(f'skip_batches must be >= 0, got {skip_batches}')
    split = self._splits['train']
    records = split.records.shuffle(split.shuffle_buffer, seed=self._seed,
                                    reshuffle_each_iteration=True).repeat()
    # Batches are consecutive groups of batch_size records of an infinite stream, so skipping
    # whole batches equals skipping records, which avoids decoding them.
    records = records.skip(skip_batches * self._batch_size)
    return self._decode(split, records).batch(
        self._batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def validation(self) -> tf.data.Dataset:
    """One pass over the validation split in fixed order; the last batch may be smaller."""
    return self._eval('validation')

  def test(self) -> tf.data.Dataset:
    """One pass over the test split in fixed order; the last batch may be smaller."""
    return self._eval('test')

  def _eval(self, name: str) -> tf.data.Dataset:
    split = self._splits[name]
    return self._decode(split, split.records).batch(
        self._eval_batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)

  def _decode(self, split: Split, records: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    examples = records.map(split.decode, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True).with_options(options)
    return examples.ignore_errors(log_warning=True) if split.skip_errors else examples
