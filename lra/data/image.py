"""Image: CIFAR-10 from TFDS as grayscale pixel tokens (LRA "Image")."""
from typing import Any

import numpy as np

from lra.data import tfds_source
from lra.data.pipeline import Split, fit_length

TFDS_NAME = 'cifar10'
# 45K / 5K / 10K as LRA.
TFDS_SPLITS = {'train': 'train[:90%]', 'validation': 'train[90%:]', 'test': 'test'}
# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale (LRA's conversion).
_GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)


def grayscale(rgb: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [H, W], bit-identical to `tf.image.rgb_to_grayscale`.

  TensorFlow scales to [0, 1] in float32, takes the weighted sum and converts back by
  multiplying with 255.5 and truncating; the same float32 steps give the same bytes (checked on
  all 2^24 colors once, on a million random ones by the tests).
  """
  gray = (rgb.astype(np.float32) * np.float32(1 / 255)) @ _GRAY_WEIGHTS
  return (gray * np.float32(255.5)).astype(np.uint8)


def build_splits(data_dir: str, max_length: int) -> dict[str, Split]:
  """Splits of `cifar10` prepared under `tfds_source.tfds_dir(data_dir)`.

  Pixels are grayscale values 0-255 used directly as token ids, flattened row-major; as in LRA,
  black pixels share id 0 with padding.
  """

  def decode(example: dict[str, Any]) -> dict[str, np.ndarray]:
    return {'inputs': fit_length(grayscale(example['image']).ravel(), max_length),
            'targets': np.int32(example['label'])}

  splits = {}
  for name, split in TFDS_SPLITS.items():
    source = tfds_source.load(TFDS_NAME, split, data_dir)
    height, width, _ = source.dataset_info.features['image'].shape
    splits[name] = Split(source, decode, np.full(len(source), height * width))
  return splits
