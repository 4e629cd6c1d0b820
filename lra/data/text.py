"""Byte-level text: IMDB reviews from TFDS (LRA "Text"), and the byte encoding it shares with
retrieval (id = byte + 1, 0 = padding, no BOS/EOS)."""
import tensorflow as tf

from lra.data import tfds_source
from lra.data.pipeline import Split, fit_length

TFDS_NAME = 'imdb_reviews'
# IMDB has no validation set; LRA validates on the test split (so it must not pick checkpoints).
TFDS_SPLITS = {'train': 'train', 'validation': 'test', 'test': 'test'}
TRAIN_SHUFFLE_BUFFER = 25_000


def encode_bytes(text: tf.Tensor, max_length: int) -> tf.Tensor:
  """UTF-8 bytes of a scalar tf.string as ids byte + 1, truncated/padded to int32 [max_length]."""
  data = tf.strings.substr(text, 0, max_length)
  return fit_length(tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32) + 1, max_length)


def build_splits(data_dir: str, max_length: int) -> dict[str, Split]:
  """Splits of `imdb_reviews` (plain_text) prepared under `tfds_source.tfds_dir(data_dir)`."""

  def decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {'inputs': encode_bytes(example['text'], max_length),
            'targets': tf.cast(example['label'], tf.int32)}

  return {name: Split(tfds_source.load(TFDS_NAME, split, data_dir), decode,
                      shuffle_buffer=TRAIN_SHUFFLE_BUFFER)
          for name, split in TFDS_SPLITS.items()}
