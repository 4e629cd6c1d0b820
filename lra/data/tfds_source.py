"""Loading prepared TFDS datasets (IMDB, CIFAR-10) without ever downloading."""
import os

import tensorflow as tf
import tensorflow_datasets as tfds


def tfds_dir(data_dir: str) -> str:
  """TFDS data_dir used for `data_dir`: its `tfds/` sub-folder if present, else `data_dir`."""
  nested = os.path.join(data_dir, 'tfds')
  return nested if os.path.isdir(nested) else data_dir


def load(name: str, split: str, data_dir: str) -> tf.data.Dataset:
  """`tfds.load(name, split)` from `tfds_dir(data_dir)` in file order; never downloads.

  Raises:
    FileNotFoundError: the dataset was not prepared there, with the command that prepares it.
  """
  directory = tfds_dir(data_dir)
  try:
    return tfds.load(name, split=split, data_dir=directory, download=False, shuffle_files=False)
  except (AssertionError, tfds.core.DatasetNotFoundError) as e:
    raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in {directory}. On a machine with network, run '
        f'`tfds build {name} --data_dir={directory}` (or copy a prepared {name}/ folder there).'
    ) from e
