"""Registry of LRA tasks: `task_info` (static, no I/O) and `get_task` (builds the pipelines).

`data_dir` is the unpacked `lra_release` folder of the LRA archive (the folder holding
`listops-1000/`, `tsv_data/`, `pathfinder32/`, ...); its parent folder is accepted too. TFDS tasks
(text, image) read prepared TFDS data from `<data_dir>/tfds` if that folder exists, else from
`data_dir` itself.
"""
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

from lra.data import image, listops, pathfinder, retrieval, text
from lra.data.info import TaskInfo
from lra.data.pipeline import Split, Task

# (data_dir, max_length, **task_options) -> {'train': ..., 'validation': ..., 'test': ...}
SplitBuilder = Callable[..., dict[str, Split]]


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One task: its `TaskInfo` at LRA's length, how to build its splits, the options it takes."""

  info: TaskInfo
  build_splits: SplitBuilder
  options: tuple[str, ...] = ()


def release_dir(data_dir: str) -> str:
  """The `lra_release` folder for `data_dir`: `data_dir/lra_release` if it exists, else itself."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'data_dir {data_dir!r} is not a folder')
  # The archive may unpack to lra_release/lra_release/, so descend while nested.
  while os.path.isdir(os.path.join(data_dir, 'lra_release')):
    data_dir = os.path.join(data_dir, 'lra_release')
  return data_dir


def _in_release(build_splits: Callable[[str, int], dict[str, Split]]) -> SplitBuilder:
  """A builder reading from the `lra_release` folder of `data_dir`."""
  return lambda data_dir, max_length: build_splits(release_dir(data_dir), max_length)


def _pathfinder(size: int, data_dir: str, max_length: int, difficulty: str = 'hard'
                ) -> dict[str, Split]:
  return pathfinder.build_splits(release_dir(data_dir), size, difficulty, max_length)


def _pathfinder_entry(name: str, size: int, options: tuple[str, ...]) -> _Entry:
  info = TaskInfo(name, pathfinder.VOCAB_SIZE, pathfinder.NUM_CLASSES, size * size)
  return _Entry(info, functools.partial(_pathfinder, size), options)


TASKS: dict[str, _Entry] = {
    'listops': _Entry(TaskInfo('listops', listops.VOCAB_SIZE, listops.NUM_CLASSES,
                               listops.MAX_LENGTH), _in_release(listops.build_splits)),
    'text': _Entry(TaskInfo('text', text.VOCAB_SIZE, text.NUM_CLASSES, text.MAX_LENGTH),
                   text.build_splits),
    'retrieval': _Entry(TaskInfo('retrieval', text.VOCAB_SIZE, retrieval.NUM_CLASSES,
                                 retrieval.MAX_LENGTH, dual=True),
                        _in_release(retrieval.build_splits)),
    'image': _Entry(TaskInfo('image', image.VOCAB_SIZE, image.NUM_CLASSES, image.MAX_LENGTH),
                    image.build_splits),
    **{f'pathfinder{size}': _pathfinder_entry(f'pathfinder{size}', size, ('difficulty',))
       for size in pathfinder.SIZES},
    # Path-X is Pathfinder128 at the hard difficulty.
    'pathx': _pathfinder_entry('pathx', 128, ()),
}
TASK_NAMES = tuple(TASKS)


def _entry(name: str, max_length: int | None, task_options: dict[str, Any]) -> _Entry:
  if name not in TASKS:
    raise ValueError(f'Unknown task {name!r}; valid names: {", ".join(TASK_NAMES)}')
  entry = TASKS[name]
  unknown = sorted(set(task_options) - set(entry.options))
  if unknown:
    raise ValueError(f'Unknown task_options {unknown} for task {name!r}; valid options: '
                     f'{list(entry.options) or "none"}')
  difficulty = task_options.get('difficulty', 'hard')
  if difficulty not in pathfinder.DIFFICULTY_FOLDERS:
    raise ValueError(f'difficulty must be one of {list(pathfinder.DIFFICULTY_FOLDERS)}, '
                     f'got {difficulty!r}')
  if max_length is not None and max_length <= 0:
    raise ValueError(f'max_length must be positive, got {max_length}')
  return entry


def task_info(name: str, *, max_length: int | None = None, **task_options: Any) -> TaskInfo:
  """Static description of task `name` (no I/O).

  Args:
    name: one of `TASK_NAMES`.
    max_length: tokens per sequence (per document for retrieval); default LRA's length.
    **task_options: `difficulty` ('easy'|'intermediate'|'hard', default 'hard') for pathfinderN.

  Returns:
    The task's `TaskInfo`.
  """
  info = _entry(name, max_length, task_options).info
  return info if max_length is None else dataclasses.replace(info, max_length=max_length)


def get_task(name: str, data_dir: str, *, batch_size: int, eval_batch_size: int | None = None,
             max_length: int | None = None, seed: int = 0, **task_options: Any) -> Task:
  """Builds the input pipelines of task `name`.

  Args:
    name: one of `TASK_NAMES`.
    data_dir: the unpacked `lra_release` folder (or its parent); see module docstring.
    batch_size: train batch size.
    eval_batch_size: validation/test batch size; default `batch_size`.
    max_length: tokens per sequence (longer ones truncated, shorter zero-padded).
    seed: train shuffling seed.
    **task_options: see `task_info`.

  Returns:
    A `Task` whose datasets yield dicts of int32 numpy-able arrays.

  Raises:
    ValueError: unknown name/option, malformed data or empty splits.
    FileNotFoundError: missing data, with the expected path and how to get it.
  """
  info = task_info(name, max_length=max_length, **task_options)
  splits = TASKS[name].build_splits(data_dir, info.max_length, **task_options)
  return Task(info, splits, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
