"""Evaluation mode: a trained workdir's checkpoint evaluated with a config's model.

The config may differ from the training config in its attention and FFN settings (all kinds
share one parameter tree), e.g. a vanilla-trained checkpoint evaluated with top-k attention. Each
evaluation writes its own file to the workdir, named by `eval_tag`, and changes nothing else there.
"""
import hashlib
import json
import os
from typing import Any

import ml_collections
from absl import logging

from lra.build import restore
from lra.steps import Metrics, Trainer
from lra.workdir import write_json


def evaluate_splits(task: Any, trainer: Trainer, params: Any) -> dict[str, Metrics]:
  """Loss and accuracy of `params` on the whole validation and test splits of `task`."""
  return {'validation': trainer.evaluate(params, task.validation()),
          'test': trainer.evaluate(params, task.test())}


def config_hash(config: ml_collections.ConfigDict) -> str:
  """8 hex digits of the SHA-256 of `config`'s fields (its JSON with sorted keys): configs that
  differ in any field get different hashes."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def eval_tag(config: ml_collections.ConfigDict, checkpoint: str = 'best') -> str:
  """Names an evaluation by its attention and FFN settings, for people, and by the hash of its
  whole config (`config_hash`), so that evaluations differing in any field (max_length too) never
  share a file, e.g. 'topk_k32_1a2b3c4d', 'vanilla_relu_<hash>', 'topk_k32_approx0.9_latest_<hash>'.
  The same evaluation run again gets the same tag."""
  attention = config.attention
  tag = attention.kind
  if attention.kind == 'topk':
    tag += f'_k{attention.k}'
    if attention.selection == 'approximate':
      tag += f'_approx{attention.recall_target}'
  if attention.kernel != 'softmax':
    tag += f'_{attention.kernel}'
  if config.ffn.kind == 'topk':
    tag += f'_ffntopk_k{config.ffn.k}'
  if checkpoint != 'best':
    tag += f'_{checkpoint}'
  return f'{tag}_{config_hash(config)}'


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             checkpoint: str = 'best') -> dict[str, Any]:
  """Evaluates a trained workdir's checkpoint with `config`'s model on validation and test.

  Writes `eval_results_<eval_tag(config)>.json` to the workdir.

  Args:
    config: the run config, possibly with other attention/ffn settings.
    workdir: a training workdir.
    checkpoint: 'best' (falls back to the latest when none exists) or 'latest'.
  Returns:
    {'step', 'checkpoint' (the one used), 'tag', 'validation': {'accuracy', 'loss'},
     'test': {...}, 'config' (all of `config`)}.
  Raises:
    FileNotFoundError: the workdir has no checkpoint (checked before anything is built or
      written).
    CheckpointError: the checkpoint cannot be restored (for 'latest': none of the kept ones).
  """
  restored = restore(workdir, config, checkpoint=checkpoint)
  tag = eval_tag(config, restored.checkpoint)
  results = {'step': restored.step, 'checkpoint': restored.checkpoint, 'tag': tag,
             **evaluate_splits(restored.task, restored.trainer, restored.state.params),
             'config': config.to_dict()}
  logging.info('evaluation %s of step %d: %s', tag, restored.step, results)
  write_json(os.path.join(workdir, f'eval_results_{tag}.json'), results)
  return results
