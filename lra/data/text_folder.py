"""Language modelling on a folder of UTF-8 text files, byte by byte (token id = byte + 1).

The files under the folder that match a glob pattern are read in sorted path order, checked to
be UTF-8 and joined into one byte stream, whose first 90% is the train part, the next 5%
validation and the last 5% test (so held-out text is text the model never saw, not a shuffle of
its neighbours). The whole stream is held in memory.

Examples are windows of `max_length` + 1 bytes, recorded by their start offset. Train windows start
at every offset of the train part, shuffled with the seed, each epoch anew (grain's index
shuffle, so any corpus size costs no memory); validation and test windows are consecutive and do
not overlap.
- causal_lm: inputs are a window's first `max_length` bytes, targets the byte after each.
- masked_lm: inputs are the first `max_length` bytes with `MASK_RATE` of the positions (at least
  one) replaced by `info.LM_MASK_ID`; targets are the bytes themselves, scored (`target_weights`
  1) at the replaced positions only. The positions are drawn from a generator seeded with the
  window's offset, so a window is always masked the same way (in evaluation, and on resume).
"""
import os
import pathlib
from collections.abc import Callable

import numpy as np

from lra.data.info import LM_MASK_ID
from lra.data.pipeline import Split

# Fractions of the byte stream in the validation and test parts (train is the rest, first).
HELD_OUT_FRACTION = 0.05
MASK_RATE = 0.15


def read_folder(folder: str, pattern: str = '**/*.txt',
                pattern_flag: str = '--config.task_options.pattern') -> np.ndarray:
  """The bytes uint8 `[n]` of the files under `folder` matching `pattern`, joined in path order.

  `pattern_flag` is the command-line flag that sets `pattern`, named when no file matches: the
  config field's for train.py; a script with a flag of its own passes that.

  Raises:
    FileNotFoundError: `folder` is not a folder.
    ValueError: no file matches, a file is not UTF-8 (naming it and the byte offset), or all the
      files are empty.
  """
  if not isinstance(pattern, str) or not pattern:
    raise ValueError(f'pattern must be a non-empty glob such as "**/*.txt", got {pattern!r}')
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'text folder {folder!r} does not exist or is not a folder; pass '
                            'the folder of UTF-8 text files as data_dir')
  paths = sorted(path for path in pathlib.Path(folder).glob(pattern) if path.is_file())
  if not paths:
    raise ValueError(f'no file under {folder!r} matches {pattern!r}; choose the files with '
                     f'{pattern_flag} (e.g. {pattern_flag}="**/*.md")')
  texts = []
  for path in paths:
    raw = path.read_bytes()
    try:
      raw.decode('utf-8')
    except UnicodeDecodeError as error:
      raise ValueError(f'{path} is not UTF-8 text: {error.reason} at byte {error.start}; remove '
                       'it or narrow the pattern') from None
    texts.append(raw)
  corpus = np.frombuffer(b''.join(texts), np.uint8)
  if corpus.size == 0:
    raise ValueError(f'the {len(paths)} files under {folder!r} matching {pattern!r} are empty')
  return corpus


def split_bounds(num_bytes: int) -> dict[str, tuple[int, int]]:
  """Byte ranges `(start, stop)` of the train, validation and test parts of a stream."""
  held_out = int(num_bytes * HELD_OUT_FRACTION)
  validation = num_bytes - 2 * held_out
  return {'train': (0, validation), 'validation': (validation, validation + held_out),
          'test': (validation + held_out, num_bytes)}


def build_splits(data_dir: str, max_length: int, objective: str = 'causal_lm',
                 pattern: str = '**/*.txt') -> dict[str, Split]:
  """The splits of the text under `data_dir` (see the module docstring).

  Raises:
    ValueError: as `read_folder`, or a part too short for one window of `max_length` + 1 bytes.
  """
  corpus = read_folder(data_dir, pattern)
  bounds = split_bounds(corpus.size)
  for name, (start, stop) in bounds.items():
    if stop - start < max_length + 1:
      raise ValueError(f'the text under {data_dir!r} matching {pattern!r} has {corpus.size} '
                       f'bytes, so its {name} part ({stop - start} bytes, '
                       f'{HELD_OUT_FRACTION:.0%} of the text for validation and test) is shorter '
                       f'than one window of max_length + 1 = {max_length + 1} bytes')
  ids = corpus.astype(np.int32) + 1
  decode = _decoder(ids, max_length, objective)
  start, stop = bounds['train']
  splits = {'train': Split(range(start, stop - max_length), decode, None)}
  for name in ('validation', 'test'):
    start, stop = bounds[name]
    windows = (stop - start - 1) // max_length
    splits[name] = Split(range(start, start + windows * max_length, max_length), decode, None)
  return splits


def _decoder(ids: np.ndarray, max_length: int, objective: str
             ) -> Callable[[int], dict[str, np.ndarray]]:
  """Maps a window's offset into `ids` (int32 `[n]`) to its example dict (int32 `[max_length]`
  arrays)."""

  def decode(offset: int) -> dict[str, np.ndarray]:
    window = ids[offset:offset + max_length + 1]
    inputs = window[:max_length]
    if objective == 'causal_lm':
      return {'inputs': inputs, 'targets': window[1:],
              'target_weights': np.ones(max_length, np.int32)}
    draw = np.random.default_rng(offset).random(max_length)
    chosen = draw < MASK_RATE
    chosen[np.argmin(draw)] = True
    return {'inputs': np.where(chosen, np.int32(LM_MASK_ID), inputs), 'targets': inputs,
            'target_weights': chosen.astype(np.int32)}

  return decode
