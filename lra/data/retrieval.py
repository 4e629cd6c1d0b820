"""Retrieval: AAN document pairs, `tsv_data/new_aan_pairs.{train,eval,test}.tsv` of the release.

Rows have no header and 5 tab-separated columns: label (0/1, may be written as a float), id1, id2,
text1, text2. Texts are byte-encoded as in `lra.data.text`. The files (GBs) stay on disk: they are
validated once in Python at construction, so bad rows fail early with their line number, and the
byte offset of every row is kept so that a row is read with one seek, and the length of both
texts so that cuts are counted up front.
"""
import os

import numpy as np

from lra.data.pipeline import Split, missing_release_file
from lra.data.text import encode_bytes

DIRNAME = 'tsv_data'
FILES = {'train': 'new_aan_pairs.train.tsv', 'validation': 'new_aan_pairs.eval.tsv',
         'test': 'new_aan_pairs.test.tsv'}
NUM_COLUMNS = 5


def check_tsv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates a pairs TSV file.

  Returns:
    (offsets int64 [rows + 1], the byte offset of each row and then the file size; lengths int64
    [rows, 2], the bytes, and so tokens, of text1 and text2 in each row).

  Raises:
    ValueError: naming file and line of a row without 5 columns or with a label not 0/1, or
      if the file has no rows.
  """
  offsets, lengths = [0], []
  with open(path, 'rb') as f:
    for line_number, line in enumerate(f, start=1):
      offsets.append(offsets[-1] + len(line))
      columns = line.rstrip(b'\r\n').split(b'\t')
      if len(columns) != NUM_COLUMNS:
        raise ValueError(f'{path}, line {line_number}: expected {NUM_COLUMNS} tab-separated '
                         f'columns (label, id1, id2, text1, text2), got {len(columns)}')
      lengths.append((len(columns[3]), len(columns[4])))
      label = columns[0]
      try:
        valid = float(label) in (0.0, 1.0)
      except ValueError:
        valid = False
      if not valid:
        raise ValueError(f'{path}, line {line_number}: label must be 0 or 1, got {label!r}')
  if len(offsets) == 1:
    raise ValueError(f'{path} contains no examples')
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


class Rows:
  """The rows of a text file as random-access records (bytes, line break removed)."""

  def __init__(self, path: str, offsets: np.ndarray):
    self._path = path
    self._offsets = offsets

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> bytes:
    with open(self._path, 'rb') as f:
      f.seek(self._offsets[index])
      return f.read(self._offsets[index + 1] - self._offsets[index]).rstrip(b'\r\n')


def build_splits(root: str, max_length: int) -> dict[str, Split]:
  """Splits of AAN retrieval read from `<root>/tsv_data/`; see module docstring."""

  def decode(row: bytes) -> dict[str, np.ndarray]:
    columns = row.split(b'\t')
    return {'inputs1': encode_bytes(columns[3], max_length),
            'inputs2': encode_bytes(columns[4], max_length),
            'targets': np.int32(float(columns[0]))}

  splits = {}
  for name, filename in FILES.items():
    path = os.path.join(root, DIRNAME, filename)
    if not os.path.isfile(path):
      raise missing_release_file('AAN retrieval file', path)
    offsets, lengths = check_tsv(path)
    splits[name] = Split(Rows(path, offsets), decode, lengths)
  return splits
