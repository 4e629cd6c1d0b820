"""Byte-level text: IMDB reviews from TFDS (LRA "Text"), and the byte encoding it shares with
retrieval (id = byte + 1, 0 = padding, no BOS/EOS).

Building the splits reads every review once, to know its length before any batch is read
(`Split.lengths`): about 0.2 ms a review (a 25K-review ArrayRecord file on two busy cores), so
about 10 s for IMDB's 50K, once per run.
"""
from typing import Any

import numpy as np

from lra.data import tfds_source
from lra.data.pipeline import Split, fit_length

TFDS_NAME = 'imdb_reviews'
# IMDB has no validation set; LRA validates on the test split (so it must not pick checkpoints).
TFDS_SPLITS = {'train': 'train', 'validation': 'test', 'test': 'test'}


def _utf8(text: bytes | str) -> bytes:
  return text.encode('utf-8') if isinstance(text, str) else text


def encode_bytes(text: bytes | str, max_length: int) -> np.ndarray:
  """UTF-8 bytes of `text` as ids byte + 1, truncated/padded to int32 [max_length]."""
  return fit_length(np.frombuffer(_utf8(text)[:max_length], np.uint8).astype(np.int32) + 1,
                    max_length)


def build_splits(data_dir: str, max_length: int) -> dict[str, Split]:
  """Splits of `imdb_reviews` (plain_text) prepared under `tfds_source.tfds_dir(data_dir)`."""

  def decode(example: dict[str, Any]) -> dict[str, np.ndarray]:
    return {'inputs': encode_bytes(example['text'], max_length),
            'targets': np.int32(example['label'])}

  splits = {}  # by TFDS split: validation and test share one, read once
  for split in dict.fromkeys(TFDS_SPLITS.values()):
    source = tfds_source.load(TFDS_NAME, split, data_dir)
    lengths = np.asarray([len(_utf8(example['text'])) for example in source], np.int64)
    splits[split] = Split(source, decode, lengths)
  return {name: splits[split] for name, split in TFDS_SPLITS.items()}
