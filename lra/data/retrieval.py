"""Retrieval: AAN document pairs, `tsv_data/new_aan_pairs.{train,eval,test}.tsv` of the release.

Rows have no header and 5 tab-separated columns: label (0/1, may be written as a float), id1, id2,
text1, text2. Texts are byte-encoded as in `lra.data.text`. The files (GBs) are streamed; they are
validated once in Python at construction so bad rows fail early with their line number.
"""
import os

import tensorflow as tf

from lra.data.pipeline import Split, missing_release_file
from lra.data.text import encode_bytes

DIRNAME = 'tsv_data'
FILES = {'train': 'new_aan_pairs.train.tsv', 'validation': 'new_aan_pairs.eval.tsv',
         'test': 'new_aan_pairs.test.tsv'}
NUM_COLUMNS = 5
TRAIN_SHUFFLE_BUFFER = 2048  # LRA's; records are whole lines (two long documents).


def check_tsv(path: str) -> int:
  """Validates a pairs TSV file and returns its number of rows.

  Raises:
    ValueError: naming file and line of a row without 5 columns or with a label not 0/1, or
      if the file has no rows.
  """
  num_rows = 0
  with open(path, 'rb') as f:
    for line_number, line in enumerate(f, start=1):
      line = line.rstrip(b'\r\n')
      num_columns = line.count(b'\t') + 1
      if num_columns != NUM_COLUMNS:
        raise ValueError(f'{path}, line {line_number}: expected {NUM_COLUMNS} tab-separated '
                         f'columns (label, id1, id2, text1, text2), got {num_columns}')
      label = line[:line.index(b'\t')]
      try:
        valid = float(label) in (0.0, 1.0)
      except ValueError:
        valid = False
      if not valid:
        raise ValueError(f'{path}, line {line_number}: label must be 0 or 1, got {label!r}')
      num_rows += 1
  if not num_rows:
    raise ValueError(f'{path} contains no examples')
  return num_rows


def build_splits(root: str, max_length: int) -> dict[str, Split]:
  """Splits of AAN retrieval read from `<root>/tsv_data/`; see module docstring."""

  def decode(line: tf.Tensor) -> dict[str, tf.Tensor]:
    columns = tf.strings.split(line, '\t')
    return {'inputs1': encode_bytes(columns[3], max_length),
            'inputs2': encode_bytes(columns[4], max_length),
            'targets': tf.cast(tf.strings.to_number(columns[0]), tf.int32)}

  splits = {}
  for name, filename in FILES.items():
    path = os.path.join(root, DIRNAME, filename)
    if not os.path.isfile(path):
      raise missing_release_file('AAN retrieval file', path)
    check_tsv(path)
    splits[name] = Split(tf.data.TextLineDataset(path), decode,
                         shuffle_buffer=TRAIN_SHUFFLE_BUFFER)
  return splits
