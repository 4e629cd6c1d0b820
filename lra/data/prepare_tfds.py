r"""Downloads and prepares the TFDS datasets of the Text and Image tasks; needs network.

  python -m lra.data.prepare_tfds --data_dir=<data_dir> [--datasets=imdb_reviews,cifar10]

writes `<data_dir>/tfds/{imdb_reviews,cifar10}/`, which `lra.data.get_task('text'|'image',
data_dir)` reads without network (copy the folder to machines without it). This replaces
`tfds build`, whose command line needs apache-beam, not in the pinned stack.
"""
from collections.abc import Sequence

from absl import app, flags

from lra.data import image, text, tfds_source

DATASETS = (text.TFDS_NAME, image.TFDS_NAME)

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'The LRA data folder (the one given to '
                                'training as --config.data_dir); TFDS data goes into its tfds/.')
_DATASETS = flags.DEFINE_list('datasets', list(DATASETS),
                              f'TFDS datasets to prepare, from {", ".join(DATASETS)}.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _DATA_DIR.value:
    raise app.UsageError('--data_dir is required')
  unknown = [name for name in _DATASETS.value if name not in DATASETS]
  if unknown or not _DATASETS.value:
    raise app.UsageError(f'--datasets must name some of {", ".join(DATASETS)}, got '
                         f'{_DATASETS.value}')
  for name in _DATASETS.value:
    print(f'{name}: prepared in {tfds_source.prepare(name, _DATA_DIR.value)}', flush=True)


if __name__ == '__main__':
  app.run(main)
