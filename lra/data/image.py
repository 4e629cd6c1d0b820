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
  """uint8 [H, W, 3] -> uint8 [H, W], `tf.image.rgb_to_grayscale`'s conversion.

  TensorFlow scales to [0, 1] in float32, takes the weighted sum and converts back by
  multiplying with 255.5 and truncating. The sum here is three float32 products added left to
  right, elementwise: IEEE arithmetic with no fused multiply-add, so every machine gives the same
  bytes. A matrix product (TensorFlow's, or numpy's `@`) lets the CPU's BLAS choose order and FMA,
  which moves the rare colors whose exact level lies within 1e-4 of an integer by one (3,355 of
  the 2^24 colors); every other color equals the exact level's floor on any machine (tests).
  """
  scaled = rgb.astype(np.float32) * np.float32(1 / 255)
  gray = ((scaled[..., 0] * _GRAY_WEIGHTS[0] + scaled[..., 1] * _GRAY_WEIGHTS[1])
          + scaled[..., 2] * _GRAY_WEIGHTS[2])
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
