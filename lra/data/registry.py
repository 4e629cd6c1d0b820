"""Registry of LRA tasks: `task_info` (static, no I/O) and `get_task` (builds the pipelines).

`data_dir` is the unpacked `lra_release` folder of the LRA archive (the folder holding
`listops-1000/`, `tsv_data/`, `pathfinder32/`, ...); its parent folder is accepted too. TFDS tasks
(text, image) read prepared TFDS data from `<data_dir>/tfds` if that folder exists, else from
`data_dir` itself.
"""
import dataclasses
import os
import re
from typing import Any

from lra.data import image, listops, pathfinder, retrieval, text
from lra.data.info import TaskInfo
from lra.data.pipeline import Task


@dataclasses.dataclass(frozen=True)
class _Spec:
  vocab_size: int
  num_classes: int
  max_length: int
  dual: bool = False
  options: tuple[str, ...] = ()


_PATHFINDER_OPTIONS = ('difficulty',)
_SPECS = {
    'listops': _Spec(listops.VOCAB_SIZE, listops.NUM_CLASSES, listops.MAX_LENGTH),
    'text': _Spec(text.VOCAB_SIZE, text.NUM_CLASSES, text.MAX_LENGTH),
    'retrieval': _Spec(text.VOCAB_SIZE, retrieval.NUM_CLASSES, retrieval.MAX_LENGTH, dual=True),
    'image': _Spec(image.VOCAB_SIZE, image.NUM_CLASSES, image.MAX_LENGTH),
    **{f'pathfinder{n}': _Spec(pathfinder.VOCAB_SIZE, pathfinder.NUM_CLASSES, n * n,
                               options=_PATHFINDER_OPTIONS) for n in pathfinder.SIZES},
    # Path-X is Pathfinder128 at the hard difficulty (lra.md §1, issue #11).
    'pathx': _Spec(pathfinder.VOCAB_SIZE, pathfinder.NUM_CLASSES, 128 * 128),
}
TASK_NAMES = tuple(_SPECS)


def _spec(name: str, max_length: int | None, task_options: dict[str, Any]) -> _Spec:
  if name not in _SPECS:
    raise ValueError(f'Unknown task {name!r}; valid names: {", ".join(TASK_NAMES)}')
  spec = _SPECS[name]
  unknown = sorted(set(task_options) - set(spec.options))
  if unknown:
    raise ValueError(f'Unknown task_options {unknown} for task {name!r}; valid options: '
                     f'{list(spec.options) or "none"}')
  difficulty = task_options.get('difficulty', 'hard')
  if difficulty not in pathfinder.DIFFICULTY_FOLDERS:
    raise ValueError(f'difficulty must be one of {list(pathfinder.DIFFICULTY_FOLDERS)}, '
                     f'got {difficulty!r}')
  if max_length is not None and max_length <= 0:
    raise ValueError(f'max_length must be positive, got {max_length}')
  return spec


def task_info(name: str, *, max_length: int | None = None, **task_options: Any) -> TaskInfo:
  """Static description of task `name` (no I/O).

  Args:
    name: one of `TASK_NAMES`.
    max_length: tokens per sequence (per document for retrieval); default LRA's length.
    **task_options: `difficulty` ('easy'|'intermediate'|'hard', default 'hard') for pathfinderN.

  Returns:
    The task's `TaskInfo`.
  """
  spec = _spec(name, max_length, task_options)
  return TaskInfo(name=name, vocab_size=spec.vocab_size, num_classes=spec.num_classes,
                  max_length=max_length or spec.max_length, dual=spec.dual)


def release_dir(data_dir: str) -> str:
  """The `lra_release` folder for `data_dir`: `data_dir/lra_release` if it exists, else itself."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'data_dir {data_dir!r} is not a folder')
  # The archive may unpack to lra_release/lra_release/ (issue #12), so descend while nested.
  while os.path.isdir(os.path.join(data_dir, 'lra_release')):
    data_dir = os.path.join(data_dir, 'lra_release')
  return data_dir


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
  length = info.max_length
  if name == 'text':
    splits = text.build_splits(data_dir, length)
  elif name == 'image':
    splits = image.build_splits(data_dir, length)
  elif name == 'listops':
    splits = listops.build_splits(release_dir(data_dir), length)
  elif name == 'retrieval':
    splits = retrieval.build_splits(release_dir(data_dir), length)
  else:
    size = 128 if name == 'pathx' else int(re.fullmatch(r'pathfinder(\d+)', name).group(1))
    splits = pathfinder.build_splits(release_dir(data_dir), size,
                                     task_options.get('difficulty', 'hard'), length)
  return Task(info, splits, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
