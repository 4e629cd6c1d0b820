"""The value-aware study of one run: per-layer errors of each approximation
(`studies.approximations`) and the accuracy of a model whose attention outputs are replaced by
them.
"""
from collections.abc import Mapping
from typing import Any

import numpy as np

from studies.approximations import error_rows, replacement
from studies.capture import Run, predictions

# Methods whose downstream accuracy is measured (the error table covers all of
# `studies.approximations.METHODS`).
REPLACED_METHODS = ('oblivious', 'value_aware')


def study_run(run: Run, rs: list[int], max_queries: int,
              solver: Mapping[str, Any] | None = None, accuracy_rs: list[int] | None = None
              ) -> tuple[list[dict], list[dict]]:
  """Error rows (`error_rows`) for budgets `rs` and accuracy rows of one run for `accuracy_rs`
  (default `rs`): replacing whole layers solves every query, far costlier than the sampled error
  table. `solver` as in `studies.approximations.approximate`."""
  errors, layers = error_rows(run, rs, max_queries, solver)
  model, targets = predictions(run, None)

  def row(layer, r, method, predicted):
    # Agreement with the unmodified model is meaningful even for random-init smoke models.
    return {'run': run.name, 'kernel': run.kernel, 'layer': layer, 'r': r, 'method': method,
            'accuracy': float(np.mean(predicted == targets)),
            'agreement': float(np.mean(predicted == model))}

  accuracies = [row('none', 0, 'model', model),
                row('all', 0, 'exact', predictions(run, replacement(run.kernel, 'exact', 0,
                                                                     'all'))[0])]
  for layer in layers + ['all']:
    for method in REPLACED_METHODS:
      for r in rs if accuracy_rs is None else accuracy_rs:
        replace = replacement(run.kernel, method, r, layer, solver)
        predicted = predictions(run, replace)[0]
        accuracies.append(row(layer, r, method, predicted))
  return errors, accuracies


