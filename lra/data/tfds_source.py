"""Preparing (with network) and loading (never downloading) TFDS datasets: IMDB, CIFAR-10."""
import os

import tensorflow as tf
import tensorflow_datasets as tfds


def tfds_dir(data_dir: str) -> str:
  """TFDS data_dir used for `data_dir`: its `tfds/` sub-folder if present, else `data_dir`."""
  nested = os.path.join(data_dir, 'tfds')
  return nested if os.path.isdir(nested) else data_dir


def prepare(name: str, data_dir: str) -> str:
  """Downloads TFDS dataset `name` and prepares it in `<data_dir>/tfds`, where `load` finds it.

  Calls the builder through the Python API: the `tfds build` command line needs apache-beam,
  which the pinned stack does not install. Needs network. The downloaded archives are kept in
  `<data_dir>/tfds/downloads` (not needed afterwards).

  Returns:
    The TFDS data_dir written, `<data_dir>/tfds`.
  """
  directory = os.path.join(data_dir, 'tfds')
  tfds.builder(name, data_dir=directory).download_and_prepare()
  return directory


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
        f'`python -m lra.data.prepare_tfds --data_dir={data_dir} --datasets={name}` (it writes '
        f'{os.path.join(data_dir, "tfds")}), or copy a prepared {name}/ folder into {directory}.'
    ) from e
