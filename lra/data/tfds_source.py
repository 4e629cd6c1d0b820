"""Preparing (with network) and loading (never downloading) TFDS datasets: IMDB, CIFAR-10.

Prepared data is in ArrayRecord files, which `tfds.data_source` reads with random access and
without TensorFlow; preparing runs the TFDS builders, which need TensorFlow.
"""
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

FILE_FORMAT = 'array_record'


def tfds_dir(data_dir: str) -> str:
  """TFDS data_dir used for `data_dir`: its `tfds/` sub-folder if present, else `data_dir`."""
  nested = os.path.join(data_dir, 'tfds')
  return nested if os.path.isdir(nested) else data_dir


def prepare(name: str, data_dir: str) -> str:
  """Downloads TFDS dataset `name` and prepares it as ArrayRecord in `<data_dir>/tfds`, where
  `load` finds it.

  Calls the builder through the Python API: the `tfds build` command line needs apache-beam,
  which the pinned stack does not install. Needs network and TensorFlow. The downloaded
  archives are kept in `<data_dir>/tfds/downloads` (not needed afterwards).

  Returns:
    The TFDS data_dir written, `<data_dir>/tfds`.
  """
  directory = os.path.join(data_dir, 'tfds')
  tfds.builder(name, data_dir=directory).download_and_prepare(file_format=FILE_FORMAT)
  return directory


def load(name: str, split: str, data_dir: str) -> Sequence[dict[str, Any]]:
  """Random-access examples of `name`'s `split` from `tfds_dir(data_dir)` in file order (numpy
  values, no TensorFlow); never downloads.

  Raises:
    FileNotFoundError: the dataset was not prepared there, or was prepared in another file format
      (TFRecord, the TFDS default, has no random access), with the command that prepares it.
  """
  directory = tfds_dir(data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=directory, download=False)
  except (AssertionError, NotImplementedError, tfds.core.DatasetNotFoundError) as e:
    builder = tfds.builder(name, data_dir=directory)
    problem = (f'{builder.data_dir} holds {name!r} as {builder.info.file_format.value}, which '
               'has no random access; move it away and prepare it again' if builder.is_prepared()
               else f'TFDS dataset {name!r} is not prepared in {directory}')
    raise FileNotFoundError(
        f'{problem}: on a machine with network and TensorFlow, run `python -m '
        f'lra.data.prepare_tfds --data_dir={data_dir} --datasets={name}` (it writes '
        f'{os.path.join(data_dir, "tfds")}, as {FILE_FORMAT}), or copy a prepared {name}/ folder '
        f'into {directory}.') from e
