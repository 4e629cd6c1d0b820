"""ListOps: `listops-1000/basic_{train,val,test}.tsv` of the LRA release, with a fixed vocabulary.

Each row is `Source<TAB>Target`, e.g. `( ( ( ( [MAX 2 ) 9 ) 4 ) ] )<TAB>9`, one per line (LF or
CRLF line ends) of UTF-8 text; a `Source<TAB>Target` header line is optional. Parentheses only
encode the generator's binary nesting and are dropped, as in LRA. Unlike LRA, whose token ids
followed Python set order and so changed between processes, the ids here are fixed by `TOKENS`.
"""
import codecs
import os
import re

import numpy as np

from lra.data.info import LISTOPS_TOKENS as TOKENS
from lra.data.info import task_info
from lra.data.pipeline import Split, fit_length, missing_release_file

NUM_CLASSES = task_info('listops').num_classes
DIRNAME = 'listops-1000'
FILES = {'train': 'basic_train.tsv', 'validation': 'basic_val.tsv', 'test': 'basic_test.tsv'}

# Parsing maps every operator to one letter so that each token is one byte, and then tokenises a
# row with numpy (ListOps train has ~10^8 tokens): bytes between separators must be single tokens.
_OPERATOR_BYTES = {b'[MIN': b'a', b'[MAX': b'b', b'[MED': b'c', b'[SM': b'd'}
_ID_OF_BYTE = np.full(256, -1, np.int16)
_ID_OF_BYTE[[_OPERATOR_BYTES.get(t.encode(), t.encode())[0] for t in TOKENS]] = np.arange(
    1, len(TOKENS) + 1)
# Nesting depth step of each token id: +1 for an operator (which opens), -1 for `]`.
_DEPTH_STEP = np.array([0] + [t.startswith('[') - (t == ']') for t in TOKENS], np.int8)
_SEPARATORS = b'() \t\n\r\x0b\x0c'
_IS_SEPARATOR = np.zeros(256, bool)
_IS_SEPARATOR[list(_SEPARATORS)] = True


def encode(source: str) -> np.ndarray:
  """Token ids uint8 [n] of one ListOps expression, after checking that it is well formed.

  Well formed: a digit, or an operator followed by one or more arguments (digits or nested
  expressions) and `]`, with nothing after it (parentheses are dropped first). Checked with
  whole-array numpy operations, like the tokenisation, since ListOps train has ~10^8 tokens.

  Raises:
    ValueError: an unknown token or a malformed expression, saying what and where (1-based token
      positions, parentheses not counted).
  """
  data = source.encode('utf-8')
  if any(letter in data for letter in _OPERATOR_BYTES.values()):
    raise ValueError(_unknown_token(source))
  for operator, letter in _OPERATOR_BYTES.items():
    data = data.replace(operator, letter)
  data = np.frombuffer(data, np.uint8)
  separator = np.concatenate([[True], _IS_SEPARATOR[data]])
  num_tokens = np.count_nonzero(separator[:-1] & ~separator[1:])
  ids = _ID_OF_BYTE[data[~separator[1:]]]
  if len(ids) != num_tokens or (ids < 0).any():
    raise ValueError(_unknown_token(source))
  if not num_tokens:
    raise ValueError('empty expression')
  step = _DEPTH_STEP[ids]
  depth = np.cumsum(step, dtype=np.int32)
  # Well formed iff no operator is directly followed by `]` and the depth, after each token,
  # stays positive until the last token brings it to 0. Positions are found on errors only.
  empty = np.diff(step) == -2  # an operator (+1) directly followed by `]` (-1)
  if depth[-1] == 0 and depth[:-1].min(initial=1) > 0 and not empty.any():
    return ids.astype(np.uint8)
  if empty.any():
    operator = np.argmax(empty)
    raise ValueError(f'{TOKENS[ids[operator] - 1]} at token {operator + 1} has no arguments')
  if depth.min() > 0:
    raise ValueError(f'{TOKENS[ids[0] - 1]} at token 1 is never closed by ]')
  end = np.argmax(depth <= 0)  # where the first complete top-level expression ends
  if depth[end] < 0:
    raise ValueError(f'] at token {end + 1} closes no operator')
  raise ValueError(f'token {end + 2} follows the end of the expression at token {end + 1}')


def _unknown_token(source: str) -> str:
  tokens = re.split(b'[%s]+' % re.escape(_SEPARATORS), source.encode('utf-8'))
  unknown = next(t for t in (token.decode('utf-8') for token in tokens) if t and t not in TOKENS)
  return f'unknown token {unknown!r}; the tokens are {" ".join(TOKENS)} and parentheses'


def read_tsv(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads one ListOps TSV file, keeping every expression whole (`fit_length` cuts when an example
  is decoded, after `check_lengths` has counted the cuts).

  Args:
    path: UTF-8 TSV file with `Source` and `Target` columns and an optional header line; a
      leading byte order mark is skipped.

  Returns:
    (tokens uint8 [total], offsets int64 [n + 1], targets int32 [n]); example i has token ids
    tokens[offsets[i]:offsets[i + 1]].

  Raises:
    ValueError: a line that is not UTF-8 (naming it and the byte offset in the file), a malformed
      row (naming its line), or no examples.
  """
  sequences, targets = [], []
  with open(path, 'rb') as f:
    # A leading byte order mark, as Windows editors write, marks the encoding and is no text.
    offset = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
    f.seek(offset)
    # Read as bytes, so that an error can name the byte offset in the file.
    for line_number, raw in enumerate(f, start=1):
      try:
        line = raw.decode('utf-8').rstrip('\r\n')
      except UnicodeDecodeError as error:
        raise ValueError(f'{path}, line {line_number}: not UTF-8 text: {error.reason} at byte '
                         f'{offset + error.start} of the file') from None
      offset += len(raw)
      if line_number == 1 and line.split('\t') == ['Source', 'Target']:
        continue
      if not line.strip():
        continue
      columns = line.split('\t')
      if len(columns) != 2:
        raise ValueError(f'{path}, line {line_number}: expected 2 tab-separated columns '
                         f'(Source, Target), got {len(columns)}')
      target = _parse_label(columns[1], path, line_number)
      try:
        ids = encode(columns[0])
      except ValueError as e:
        raise ValueError(f'{path}, line {line_number}: malformed Source: {e}') from None
      sequences.append(ids)
      targets.append(target)
  if not targets:
    raise ValueError(f'{path} contains no examples')
  offsets = np.zeros(len(sequences) + 1, np.int64)
  np.cumsum([len(s) for s in sequences], out=offsets[1:])
  return np.concatenate(sequences), offsets, np.asarray(targets, np.int32)


def _parse_label(text: str, path: str, line_number: int) -> int:
  try:
    target = int(text)
  except ValueError:
    target = -1
  if not 0 <= target < NUM_CLASSES:
    raise ValueError(f'{path}, line {line_number}: Target must be an integer in '
                     f'[0, {NUM_CLASSES}), got {text!r}')
  return target


def build_splits(root: str, max_length: int) -> dict[str, Split]:
  """Splits of ListOps read from `<root>/listops-1000/`; see module docstring."""
  splits = {}
  for name, filename in FILES.items():
    path = os.path.join(root, DIRNAME, filename)
    if not os.path.isfile(path):
      raise missing_release_file(
          'ListOps file', path,
          f', or generate a data set with `python -m lra.data.listops_gen --output_dir={root}`')
    splits[name] = _split(*read_tsv(path), max_length)
  return splits


def _split(tokens: np.ndarray, offsets: np.ndarray, targets: np.ndarray,
           max_length: int) -> Split:

  def decode(index: int) -> dict[str, np.ndarray]:
    return {'inputs': fit_length(tokens[offsets[index]:offsets[index + 1]], max_length),
            'targets': targets[index]}

  return Split(range(len(targets)), decode, np.diff(offsets))
