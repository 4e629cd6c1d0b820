"""Image: CIFAR-10 from TFDS as grayscale pixel tokens (LRA "Image")."""
import tensorflow as tf

from lra.data import tfds_source
from lra.data.pipeline import Split, fit_length

TFDS_NAME = 'cifar10'
# 45K / 5K / 10K as LRA.
TFDS_SPLITS = {'train': 'train[:90%]', 'validation': 'train[90%:]', 'test': 'test'}
TRAIN_SHUFFLE_BUFFER = 10_000


def build_splits(data_dir: str, max_length: int) -> dict[str, Split]:
  """Splits of `cifar10` prepared under `tfds_source.tfds_dir(data_dir)`.

  Pixels are `tf.image.rgb_to_grayscale` values 0-255 used directly as token ids, flattened
  row-major; as in LRA, black pixels share id 0 with padding.
  """

  def decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    pixels = tf.reshape(tf.image.rgb_to_grayscale(example['image']), [-1])
    return {'inputs': fit_length(pixels, max_length),
            'targets': tf.cast(example['label'], tf.int32)}

  return {name: Split(tfds_source.load(TFDS_NAME, split, data_dir), decode,
                      shuffle_buffer=TRAIN_SHUFFLE_BUFFER)
          for name, split in TFDS_SPLITS.items()}
