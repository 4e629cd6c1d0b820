"""Tests of the metric files of a workdir (lra.metric_writer)."""
import numpy as np
from conftest import read_metrics, read_scalars

from lra.metric_writer import MetricWriter


def test_metric_writer_writes_strict_json_and_tensorboard_scalars(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(1, 'train', {'loss': float('nan'), 'accuracy': 0.5})
  writer.write(2, 'train', {'loss': float('inf'), 'accuracy': 0.25})
  writer.close()
  assert read_metrics(str(tmp_path)) == {(1, 'train'): {'loss': None, 'accuracy': 0.5},
                                         (2, 'train'): {'loss': None, 'accuracy': 0.25}}
  scalars = read_scalars(str(tmp_path / 'tensorboard'))
  assert scalars.keys() == {(1, 'train/loss'), (1, 'train/accuracy'), (2, 'train/loss'),
                            (2, 'train/accuracy')}
  assert np.isnan(scalars[(1, 'train/loss')]) and scalars[(2, 'train/loss')] == float('inf')
  assert scalars[(1, 'train/accuracy')] == 0.5 and scalars[(2, 'train/accuracy')] == 0.25
  # A resumed writer keeps only what `keep` selects.
  MetricWriter(str(tmp_path), keep=lambda record: record['step'] < 2).close()
  assert list(read_metrics(str(tmp_path))) == [(1, 'train')]
