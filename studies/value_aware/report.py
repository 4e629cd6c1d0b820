"""Reporting of the study: CSV files, plots and markdown tables of the analysis rows."""
import os
from typing import Any

import numpy as np

from studies.value_aware.analysis import REPLACED_METHODS


def _r_axis(ax: Any, rs: list[int]) -> None:
  """Log-scale r axis ticked at the studied budgets."""
  ax.set_xscale('log')
  ax.set_xticks(rs, [str(r) for r in rs])
  ax.minorticks_off()


def plot(errors: list[dict], accuracies: list[dict], out: str) -> None:
  import matplotlib  # Plotting is the only reason to import it.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  runs = sorted({row['run'] for row in errors})
  fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
  for ax, run in zip(axes[0], runs, strict=True):
    for method in ('oblivious', 'oblivious_raw', 'value_aware'):
      rows = [row for row in errors if row['run'] == run and row['method'] == method]
      rs = sorted({row['r'] for row in rows})
      mean = [np.mean([row['rel_error'] for row in rows if row['r'] == r]) for r in rs]
      ax.plot(rs, mean, marker='o', label=method)
    _r_axis(ax, rs)
    ax.set(xlabel='r', ylabel='relative output error (mean over layers)',
           title=f'{run} ({next(e["kernel"] for e in errors if e["run"] == run)})')
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'errors.png'), dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 8), squeeze=False)
  for column, run in enumerate(runs):
    rows = [row for row in accuracies if row['run'] == run]
    for ax, metric in zip(axes[:, column], ('accuracy', 'agreement'), strict=True):
      model = next(row[metric] for row in rows if row['method'] == 'model')
      ax.axhline(model, color='gray', linestyle='--', label='model')
      for method in REPLACED_METHODS:
        chosen = sorted((row['r'], row[metric]) for row in rows
                        if row['method'] == method and row['layer'] == 'all')
        ax.plot(*zip(*chosen, strict=True), marker='o', label=f'{method} (all layers)')
      _r_axis(ax, [r for r, _ in chosen])
      ax.set(xlabel='r', ylabel=f'validation {metric}', title=run)
      ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'accuracy.png'), dpi=120)
  plt.close(fig)


def markdown(errors: list[dict], accuracies: list[dict]) -> str:
  """Two markdown tables: mean relative error per run/layer/r, and accuracy per run/layer/r."""
  lines = ['| run | kernel | layer | r | top-r mass | oblivious | oblivious (raw) | value-aware |',
           '|---|---|---|---|---|---|---|---|']
  keys = sorted({(row['run'], row['kernel'], row['layer'], row['r']) for row in errors})
  for key in keys:
    rows = {row['method']: row for row in errors
            if (row['run'], row['kernel'], row['layer'], row['r']) == key}
    lines.append('| ' + ' | '.join(map(str, key)) + f' | {rows["oblivious"]["top_r_mass"]:.3f} | '
                 + ' | '.join(f'{rows[m]["rel_error"]:.4f}'
                              for m in ('oblivious', 'oblivious_raw', 'value_aware')) + ' |')
  lines += ['', '| run | kernel | layer replaced | r | oblivious acc (agree) '
            '| value-aware acc (agree) |', '|---|---|---|---|---|---|']
  for row in accuracies:
    if row['method'] in ('model', 'exact'):
      cell = f'{row["accuracy"]:.4f} ({row["agreement"]:.3f})'
      lines.append(f'| {row["run"]} | {row["kernel"]} | {row["layer"]} ({row["method"]}) | - | '
                   f'{cell} | {cell} |')
  keys = sorted({(row['run'], row['kernel'], row['layer'], row['r']) for row in accuracies
                 if row['method'] in REPLACED_METHODS})
  for key in keys:
    acc = {row['method']: row for row in accuracies
           if (row['run'], row['kernel'], row['layer'], row['r']) == key}
    lines.append('| ' + ' | '.join(map(str, key)) + ' | ' + ' | '.join(
        f'{acc[m]["accuracy"]:.4f} ({acc[m]["agreement"]:.3f})' for m in REPLACED_METHODS) + ' |')
  return '\n'.join(lines)


