"""The language models of the studies: trained with `lra.train` from configs/lm.py, one workdir
per kernel, and scored per evaluation window (the unit of the standard errors).
"""
import os
import sysconfig
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

import config_cli
from lra import train
from lra.steps import target_terms
from studies import capture

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), 'configs', 'lm.py')


def default_corpus() -> str:
  """The `email` package of the running Python's standard library: present wherever Python is."""
  return os.path.join(sysconfig.get_paths()['stdlib'], 'email')


def workdir(root: str, objective: str, kernel: str) -> str:
  return os.path.join(root, f'{objective}_{kernel}')


def ensure_trained(root: str, objective: str, kernel: str, overrides: Sequence[tuple[str, str]]
                   ) -> str:
  """Trains `configs/lm.py:<objective>,kernel=<kernel>` with `overrides` in its workdir under
  `root` unless it has finished there (a results.json); returns the workdir.

  An interrupted run resumes (`lra.train.train_and_evaluate`).
  """
  path = workdir(root, objective, kernel)
  if not os.path.isfile(os.path.join(path, 'results.json')):
    config = config_cli.get_config(f'{CONFIG}:{objective},kernel={kernel}', overrides)
    train.train_and_evaluate(config, path)
  return path


def window_totals(model: nn.Module, params: Any, batches: Iterable[capture.Batch],
                  replace: capture.Replace | None = None) -> dict[str, np.ndarray]:
  """Sums over the scored tokens of each window (example) of `batches`, each `[W]`: 'loss'
  (nats), 'errors' (wrong argmax predictions) and 'tokens'; attention outputs rewritten by
  `replace` if given (`capture.apply_replaced`)."""

  @jax.jit
  def totals(params, batch):
    logits = capture.apply_replaced(model, params, batch, replace)
    loss, correct, weights = target_terms(logits, batch)
    axes = tuple(range(1, weights.ndim))
    return {'loss': (loss * weights).sum(axes), 'errors': ((1.0 - correct) * weights).sum(axes),
            'tokens': weights.sum(axes)}

  per_batch = [jax.device_get(totals(params, batch)) for batch in batches]
  if not per_batch:
    raise ValueError('no evaluation batches.')
  return {name: np.concatenate([batch[name] for batch in per_batch]).astype(np.float64)
          for name in per_batch[0]}
