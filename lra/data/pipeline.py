"""`Task`: batched grain streams (train/validation/test) over the examples of a task.

Every task module describes each split as a `Split`: random-access records in a fixed order (row
indices, file paths, line offsets, a `tfds.data_source`) plus a `decode` function that turns one
record into an example dict of int32 numpy arrays. Batches are built from record indices: the
train stream shuffles the indices of each epoch with a seeded permutation (grain's index shuffle,
a new one per epoch), so batch `k` is a pure function of `(seed, k)`. That makes the stream's
state one number, which a checkpoint stores and a resume restores in constant time, and it lets
each process decode only its own share of every global batch.
"""
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from lra.data.info import TaskInfo

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]
# Batches decoded ahead of the consumer, by as many threads: enough to hide decoding (PNG, long
# text) behind a train step, small enough that Path-X batches (64 x 16384 int32) stay a few MiB.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)
NO_SHARDING = grain.sharding.NoSharding()


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a task.

  Attributes:
    records: random-access records in a fixed order (`len` and `[i]`).
    decode: maps one record to an example dict: 'inputs' (or 'inputs1'/'inputs2') int32 [L] and
      'targets' int32 [] (language models: 'targets' and 'target_weights' int32 [L]).
    lengths: tokens of each record's input sequence before `fit_length`, int [n] ([n, 2] for the
      two inputs of a dual task), known when the split is built so that `check_lengths` reports
      or refuses cuts before any batch is read; None when `decode` builds every input at exactly
      max_length tokens (language-model windows), so nothing is ever cut.
  """

  records: Sequence[Any]
  decode: Callable[[Any], Example]
  lengths: np.ndarray | None


def missing_release_file(what: str, path: str, hint: str = '') -> FileNotFoundError:
  """The error for a missing file or folder of the LRA release archive, saying how to get it."""
  return FileNotFoundError(
      f'{what} not found: {path}. Download and unpack the LRA release '
      '(https://storage.googleapis.com/long-range-arena/lra_release.gz) and pass its '
      f'lra_release folder as data_dir{hint}.')


def check_lengths(task: str, split: str, lengths: np.ndarray, max_length: int,
                  truncate: bool) -> None:
  """Logs how many input sequences of a split `fit_length` will cut, and by how much (one line).

  A cut ListOps row is an expression cut mid-tree and a cut review loses its end, so training on
  them is a different task; the log says so once per split, and `truncate=False` refuses instead.

  Args:
    task: the task's name, for the messages.
    split: the split's name, for the messages.
    lengths: `Split.lengths`, int [n] or [n, inputs].
    max_length: tokens per input sequence after `fit_length`.
    truncate: whether sequences longer than `max_length` may be cut (else an error).

  Raises:
    ValueError: `truncate` is False and a sequence is longer than `max_length`, naming the split,
      its first such example (0-based, in the split's order) and that example's length.
  """
  lengths = np.asarray(lengths)
  cut = lengths > max_length
  if not cut.any():
    return
  num_cut, longest = np.count_nonzero(cut), int(lengths.max())
  if not truncate:
    example = int(np.argmax(cut.reshape(len(cut), -1).any(axis=1)))
    raise ValueError(
        f'{task} {split}: example {example} (0-based, in the split\'s order) has '
        f'{int(lengths[example].max())} tokens, more than max_length={max_length} ({num_cut} of '
        f'the split\'s {lengths.size} input sequences are longer, the longest {longest} tokens); '
        f'raise max_length to {longest} to keep them whole, or set truncate=True '
        '(--config.truncate=True) to cut them')
  logging.warning(
      '%s %s: %d of %d input sequences are longer than max_length=%d and are cut to it (longest '
      '%d tokens, %.1f tokens dropped on average); truncate=False (--config.truncate=False) makes '
      'this an error', task, split, num_cut, lengths.size, max_length, longest,
      (lengths[cut] - max_length).mean())


def fit_length(tokens: np.ndarray, max_length: int) -> np.ndarray:
  """Truncates or zero-pads a token vector [n] to int32 [max_length] (0 = padding); the cuts of a
  split are reported by `check_lengths` when it is built."""
  fitted = np.zeros(max_length, np.int32)
  tokens = tokens[:max_length]
  fitted[:len(tokens)] = tokens
  return fitted


class Task:
  """Batched input streams of one LRA task; see `lra.data.get_task`.

  With `shard` (e.g. `grain.sharding.ShardByJaxProcess()`), every stream yields only process
  `shard.shard_index`'s share of each global batch: rows `[i * s, (i + 1) * s)` of it, where
  `s = ceil(batch size / shard.shard_count)`. The shares of all processes, in process order, are
  the batch a single process reads.
  """

  def __init__(self, info: TaskInfo, splits: Mapping[str, Split], *, batch_size: int,
               eval_batch_size: int | None = None, seed: int = 0,
               shard: grain.sharding.ShardOptions = NO_SHARDING):
    if batch_size <= 0:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    if eval_batch_size is not None and eval_batch_size <= 0:
      raise ValueError(f'eval_batch_size must be positive, got {eval_batch_size}')
    if batch_size % shard.shard_count:
      raise ValueError(f'batch_size {batch_size} does not divide among {shard.shard_count} '
                       'processes')
    missing = {'train', 'validation', 'test'} - set(splits)
    if missing:
      raise ValueError(f'splits must contain train, validation and test; missing {sorted(missing)}')
    self.info = info
    self._splits = dict(splits)
    self._batch_size = batch_size
    self._eval_batch_size = eval_batch_size or batch_size
    # Unrelated permutations for nearby seeds: grain permutes epoch e with seed + e, so seeds 0
    # and 1 would otherwise share all but one epoch order.
    self._seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    self._shard = shard

  def train(self) -> grain.IterDataset:
    """Infinite stream of shuffled batches, reshuffled each epoch.

    Batch `k` depends only on the seed and `k`. `iter()` of the result is a grain
    `DatasetIterator` whose `get_state()` / `set_state()` save and restore the position in
    constant time (`lra.checkpointing` stores it with the model).

    Returns:
      Dataset of dicts of int32 arrays: inputs [B, L] (or inputs1/inputs2), targets [B], B being
      this process's share of `batch_size`.
    """
    split = self._splits['train']
    indices = grain.MapDataset.range(len(split.records)).shuffle(seed=self._seed).repeat()
    return self._batches(split, indices, self._batch_size, drop_remainder=True)

  def validation(self) -> grain.IterDataset:
    """One pass over the validation split in fixed order; the last batch may be smaller."""
    return self._eval('validation')

  def test(self) -> grain.IterDataset:
    """One pass over the test split in fixed order; the last batch may be smaller."""
    return self._eval('test')

  def _eval(self, name: str) -> grain.IterDataset:
    split = self._splits[name]
    indices = grain.MapDataset.range(len(split.records))
    return self._batches(split, indices, self._eval_batch_size, drop_remainder=False)

  def _batches(self, split: Split, indices: grain.MapDataset, batch_size: int, *,
               drop_remainder: bool) -> grain.IterDataset:
    """Decodes this process's share of each batch of `batch_size` record indices."""
    share = -(-batch_size // self._shard.shard_count)
    start = self._shard.shard_index * share

    def load(batch: np.ndarray) -> Batch:
      return self._stack([split.decode(split.records[int(i)]) for i in batch[start:start + share]])

    batches = indices.batch(batch_size, drop_remainder=drop_remainder)
    return batches.map(load).to_iter_dataset(_READ_OPTIONS)

  def _stack(self, examples: list[Example]) -> Batch:
    if examples:
      return {name: np.stack([e[name] for e in examples]) for name in examples[0]}
    # A share past the end of the last eval batch: no rows, the arrays of a full one.
    length = (self.info.max_length,)
    names = ('inputs1', 'inputs2') if self.info.dual else ('inputs',)
    shapes = {**dict.fromkeys(names, length), 'targets': ()}
    if self.info.objective != 'classification':  # a target per position, some scored
      shapes.update(targets=length, target_weights=length)
    return {name: np.zeros((0, *shape), np.int32) for name, shape in shapes.items()}
