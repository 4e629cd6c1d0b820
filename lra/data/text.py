"""Byte-level text: IMDB reviews from TFDS (LRA "Text"), and the byte encoding it shares with
retrieval (id = byte + 1, 0 = padding, no BOS/EOS)."""
from typing import Any

import numpy as np

from lra.data import tfds_source
from lra.data.pipeline import Split, fit_length

TFDS_NAME = 'imdb_reviews'
# IMDB has no validation set; LRA validates on the test split (so it must not pick checkpoints).
TFDS_SPLITS = {'train': 'train', 'validation': 'test', 'test': 'test'}


def encode_bytes(text: bytes | str, max_length: int) -> np.ndarray:
  """UTF-8 bytes of `text` as ids byte + 1, truncated/padded to int32 [max_length]."""
  data = text.encode('utf-8') if isinstance(text, str) else text
  return fit_length(np.frombuffer(data[:max_length], np.uint8).astype(np.int32) + 1, max_length)


def build_splits(data_dir: str, max_length: int) -> dict[str, Split]:
  """Splits of `imdb_reviews` (plain_text) prepared under `tfds_source.tfds_dir(data_dir)`."""

  def decode(example: dict[str, Any]) -> dict[str, np.ndarray]:
    return {'inputs': encode_bytes(example['text'], max_length),
            'targets': np.int32(example['label'])}

  return {name: Split(tfds_source.load(TFDS_NAME, split, data_dir), decode)
          for name, split in TFDS_SPLITS.items()}
