"""The two studies on trained language models, as rows of token error rates and losses.

- `value_aware_study`: each attention layer's output (and every layer's at once) replaced by its
  value-oblivious (top-r renormalised) or value-aware r-sparse approximation
  (`studies.approximations`), for r in a grid; plus the top-r weight mass (the kernel's skewness)
  and the relative output error of each approximation on sampled queries.
- `zero_shot_study`: the trained model evaluated with top-k attention (k grid) or top-k
  feed-forward layers (k grid) in place of the dense ones, no retraining.

Standard errors treat evaluation windows as independent clusters of tokens (tokens of one window
are not independent); differences between two models on the same windows are paired.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from lra import build
from studies.approximations import error_rows, replacement
from studies.capture import Run
from studies.lm.runs import window_totals

METHODS = ('oblivious', 'value_aware')


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> tuple[float, float]:
  """`sum(numerator) / sum(denominator)` over windows `[W]` and its standard error, the ratio
  estimator's `sqrt(sum((num_i - ratio * den_i)^2) / (W (W - 1))) / mean(den)`."""
  windows = numerator.size
  if windows < 2:
    raise ValueError(f'a standard error needs at least 2 windows, got {windows}.')
  value = numerator.sum() / denominator.sum()
  spread = np.sum(np.square(numerator - value * denominator)) / (windows * (windows - 1))
  return float(value), float(np.sqrt(spread) / denominator.mean())


def summary(totals: dict[str, np.ndarray], prefix: str = '') -> dict[str, float]:
  """Token error rate and loss (nats per token) of `window_totals`, with standard errors."""
  error, error_se = ratio(totals['errors'], totals['tokens'])
  loss, loss_se = ratio(totals['loss'], totals['tokens'])
  return {f'{prefix}error': error, f'{prefix}error_se': error_se, f'{prefix}loss': loss,
          f'{prefix}loss_se': loss_se}


def difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], prefix: str
               ) -> dict[str, float]:
  """Error rate and loss of `a` minus those of `b` on the same windows, with paired SEs."""
  if not np.array_equal(a['tokens'], b['tokens']):
    raise ValueError('differences need the same scored tokens in both.')
  return summary({'errors': a['errors'] - b['errors'], 'loss': a['loss'] - b['loss'],
                  'tokens': a['tokens']}, prefix)


def _counts(run: Run, totals: dict[str, np.ndarray]) -> dict[str, object]:
  return {'run': run.name, 'kernel': run.kernel, 'tokens': int(totals['tokens'].sum()),
          'windows': int(totals['tokens'].size)}


def value_aware_study(run: Run, rs: Sequence[int], max_queries: int,
                      solver: Mapping[str, Any] | None = None) -> tuple[list[dict], list[dict]]:
  """The value-aware study of one run on its evaluation batches; `solver` holds keyword options
  of the value-aware solver (`studies.solvers.value_aware_greedy`).

  Returns:
    (replacement rows, one per layer ('all' = every layer) and r: the unmodified model's error
    and loss (`model_*`), each method's (`oblivious_*`, `value_aware_*`) and the gap
    oblivious - value-aware (`gap_*`, paired); output rows of `error_rows`: relative
    output error and top-r mass per layer, r and method on `max_queries` sampled queries).
  """
  batches = list(run.batches())
  sampled = Run(run.name, run.kernel, run.model, run.params, lambda: iter(batches), run.config)
  outputs, layers = error_rows(sampled, list(rs), max_queries, solver)
  model = window_totals(run.model, run.params, batches)
  rows = []
  for layer in layers + ['all']:
    for r in rs:
      totals = {method: window_totals(run.model, run.params, batches, replacement(
          run.kernel, method, r, layer, solver)) for method in METHODS}
      rows.append({**_counts(run, model), 'layer': layer, 'r': r, **summary(model, 'model_'),
                   **{key: value for method in METHODS
                      for key, value in summary(totals[method], f'{method}_').items()},
                   **difference(totals['oblivious'], totals['value_aware'], 'gap_')})
  return rows, outputs


def _swapped(config: ml_collections.ConfigDict, group: str, k: int) -> ml_collections.ConfigDict:
  """`config` with `config.<group>` ('attention' or 'ffn') set to top-k with `k`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config[group].kind = 'topk'
  config[group].k = k
  return config


def zero_shot_study(run: Run, attention_ks: Sequence[int], ffn_ks: Sequence[int]
                    ) -> list[dict]:
  """Rows of the run's error and loss with top-k attention ('attention') or top-k feed-forward
  layers ('ffn') for each k, and their increase over the unmodified model ('none', k = 0)."""
  batches = list(run.batches())
  model = window_totals(run.model, run.params, batches)
  rows = [{**_counts(run, model), 'swap': 'none', 'k': 0, **summary(model),
           **difference(model, model, 'increase_')}]
  for group, ks in (('attention', attention_ks), ('ffn', ffn_ks)):
    for k in ks:
      swapped = build.build(_swapped(run.config, group, k)).model
      totals = window_totals(swapped, run.params, batches)
      rows.append({**_counts(run, model), 'swap': group, 'k': k, **summary(totals),
                   **difference(totals, model, 'increase_')})
  return rows
