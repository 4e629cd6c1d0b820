"""Registry of LRA tasks: `get_task` builds the pipelines (static `task_info`: lra.data.info).

`data_dir` is the unpacked `lra_release` folder of the LRA archive (the folder holding
`listops-1000/`, `tsv_data/`, `pathfinder32/`, ...); its parent folder is accepted too. TFDS tasks
(text, image) read prepared TFDS data from `<data_dir>/tfds` if that folder exists, else from
`data_dir` itself.
"""
import functools
import os
from collections.abc import Callable
from typing import Any

import grain

from lra.data import image, listops, pathfinder, retrieval, text, text_folder
from lra.data.info import task_info
from lra.data.pipeline import NO_SHARDING, Split, Task, check_lengths

# (data_dir, max_length, **task_options) -> {'train': Split, 'validation': ..., 'test': ...}
SplitBuilder = Callable[..., dict[str, Split]]


def release_dir(data_dir: str) -> str:
  """The `lra_release` folder for `data_dir`: `data_dir/lra_release` if it exists, else itself."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'data_dir {data_dir!r} is not a folder')
  # The archive may unpack to lra_release/lra_release/, so descend while nested.
  while os.path.isdir(os.path.join(data_dir, 'lra_release')):
    data_dir = os.path.join(data_dir, 'lra_release')
  return data_dir


def _in_release(build_splits: Callable[[str, int], dict[str, Split]]) -> SplitBuilder:
  """A builder that reads from the `lra_release` folder of `data_dir`."""
  return lambda data_dir, max_length: build_splits(release_dir(data_dir), max_length)


def _pathfinder(size: int, data_dir: str, max_length: int, difficulty: str = 'hard'
                ) -> dict[str, Split]:
  return pathfinder.build_splits(release_dir(data_dir), size, difficulty, max_length)


# One split builder per task of `lra.data.info.TASK_NAMES`, in that order.
BUILDERS: dict[str, SplitBuilder] = {
    'listops': _in_release(listops.build_splits),
    'text': text.build_splits,
    'retrieval': _in_release(retrieval.build_splits),
    'image': image.build_splits,
    **{f'pathfinder{size}': functools.partial(_pathfinder, size) for size in pathfinder.SIZES},
    'pathx': functools.partial(_pathfinder, 128),  # Pathfinder128 at the hard difficulty
    'lm': text_folder.build_splits,  # data_dir is the folder of text files
}


def get_task(name: str, data_dir: str, *, batch_size: int, eval_batch_size: int | None = None,
             max_length: int | None = None, truncate: bool = True, seed: int = 0,
             shard: grain.sharding.ShardOptions = NO_SHARDING, **task_options: Any) -> Task:
  """Builds the input pipelines of task `name`.

  Args:
    name: one of `TASK_NAMES`.
    data_dir: the unpacked `lra_release` folder (or its parent); see module docstring.
    batch_size: train batch size.
    eval_batch_size: validation/test batch size; default `batch_size`.
    max_length: tokens per sequence (shorter ones zero-padded, longer ones see `truncate`).
    truncate: whether sequences longer than `max_length` are cut to it, with one warning per
      split saying how many and by how much; if False, a longer sequence is an error
      (`pipeline.check_lengths`). Either way this is known before any batch is read.
    seed: train shuffling seed.
    shard: which share of every batch this process reads (`grain.sharding.ShardByJaxProcess()`
      in a multi-process run); default all of it.
    **task_options: see `task_info`.

  Returns:
    A `Task` whose grain datasets yield dicts of int32 numpy arrays.

  Raises:
    ValueError: unknown name/option, malformed data, empty splits, or a sequence longer than
      `max_length` when `truncate` is False.
    FileNotFoundError: missing data, with the expected path and how to get it.
  """
  info = task_info(name, max_length=max_length, **task_options)
  splits = BUILDERS[name](data_dir, info.max_length, **task_options)
  for split_name, split in splits.items():
    if split.lengths is not None:
      check_lengths(name, split_name, split.lengths, info.max_length, truncate)
  return Task(info, splits, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
              shard=shard)
