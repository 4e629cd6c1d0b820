"""Pathfinder: the release's pre-generated PNGs, read directly (no TFDS Beam build).

Layout: `<root>/pathfinder<N>/<curv folder>/metadata/<k>.npy` and `.../imgs/<k>/sample_<i>.png`.
Despite the extension, each metadata file is plain text with one line per image:
`<image sub-folder> <file name> <index> <label> ...`. Images are listed in metadata-file order
(numeric <k>, then line order); the first 80% are train, the next 10% validation, the rest test.
Missing and empty image files are skipped (and counted in a warning) before splitting; a listed
image that Pillow cannot decode, or that is not `N`x`N` pixels, is an error naming the file, raised
when a batch reaches it.
"""
import os

import numpy as np
from absl import logging
from PIL import Image

from lra.data.info import PATHFINDER_FOLDERS as DIFFICULTY_FOLDERS
from lra.data.info import PATHFINDER_SIZES as SIZES
from lra.data.pipeline import Split, fit_length, missing_release_file

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def read_metadata(folder: str) -> tuple[list[str], list[int]]:
  """Image paths and labels listed by `<folder>/metadata/*.npy`, skipping missing/empty images.

  Raises:
    FileNotFoundError: no metadata folder or no metadata files.
    ValueError: a metadata line with fewer than 4 fields or a label not 0/1 (file and line), or
      no readable image at all.
  """
  metadata_dir = os.path.join(folder, 'metadata')
  if not os.path.isdir(metadata_dir):
    raise missing_release_file('Pathfinder metadata folder', metadata_dir)
  names = [n for n in os.listdir(metadata_dir) if n.endswith('.npy')]
  if not names:
    raise FileNotFoundError(f'No metadata/*.npy files in {metadata_dir}')
  # Numeric order (2.npy before 10.npy), as the release names them; other names after, sorted.
  names.sort(key=lambda n: (0, int(n[:-4]), n) if n[:-4].isdigit() else (1, 0, n))
  paths, labels, skipped = [], [], []
  for name in names:
    metadata_path = os.path.join(metadata_dir, name)
    with open(metadata_path, encoding='utf-8') as f:
      for line_number, line in enumerate(f, start=1):
        fields = line.split()
        if not fields:
          continue
        if len(fields) < 4 or fields[3] not in ('0', '1'):
          raise ValueError(f'{metadata_path}, line {line_number}: expected "<image folder> "'
                           f'"<file name> <index> <label 0|1> ...", got {line.strip()!r}')
        path = os.path.join(folder, fields[0], fields[1])
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
          skipped.append(path)
          continue
        paths.append(path)
        labels.append(int(fields[3]))
  if skipped:
    logging.warning('Pathfinder: skipped %d missing or empty image files in %s, e.g. %s',
                    len(skipped), folder, skipped[0])
  if not paths:
    raise ValueError(f'No readable Pathfinder images listed in {metadata_dir}')
  return paths, labels


def build_splits(root: str, size: int, difficulty: str, max_length: int) -> dict[str, Split]:
  """Splits of Pathfinder `size`x`size` at `difficulty`; see module docstring."""
  if size not in SIZES:
    raise ValueError(f'size must be one of {SIZES}, got {size}')
  if difficulty not in DIFFICULTY_FOLDERS:
    raise ValueError(f'difficulty must be one of {sorted(DIFFICULTY_FOLDERS)}, got {difficulty!r}')
  paths, labels = read_metadata(
      os.path.join(root, f'pathfinder{size}', DIFFICULTY_FOLDERS[difficulty]))
  num_train = int(len(paths) * SPLIT_FRACTIONS[0])
  num_validation = int(len(paths) * SPLIT_FRACTIONS[1])
  bounds = {'train': (0, num_train), 'validation': (num_train, num_train + num_validation),
            'test': (num_train + num_validation, len(paths))}

  def decode(record: tuple[str, int]) -> dict[str, np.ndarray]:
    path, label = record
    try:
      with Image.open(path) as image:
        pixels = np.asarray(image.convert('L'))
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for a broken file
      raise ValueError(f'Pathfinder image {path} cannot be decoded ({e}); replace it with a valid '
                       'PNG') from e
    if pixels.shape != (size, size):  # else fit_length would silently cut or pad it
      height, width = pixels.shape
      raise ValueError(f'Pathfinder image {path} is {width}x{height} pixels, not {size}x{size}; '
                       f'replace it with a pathfinder{size} image')
    return {'inputs': fit_length(pixels.ravel(), max_length), 'targets': np.int32(label)}

  splits = {}
  for name, (start, stop) in bounds.items():
    if start == stop:
      raise ValueError(f'Pathfinder {name} split is empty: {len(paths)} images are too few')
    splits[name] = Split(list(zip(paths[start:stop], labels[start:stop], strict=True)), decode,
                         np.full(stop - start, size * size))
  return splits
