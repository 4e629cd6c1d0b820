"""Reporting of the language-model studies: plots and markdown tables of the analysis rows (CSV
files with `studies.tables.write_csv`)."""
import os

import numpy as np

from studies.lm.analysis import METHODS

_LABELS = {'oblivious': 'value-oblivious (top-r renormalised)', 'value_aware': 'value-aware'}


def _pyplot():
  import matplotlib  # Plotting is the only reason to import it.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _log2_axis(ax, ticks) -> None:
  ax.set_xscale('log', base=2)
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.minorticks_off()


def _kernels(rows: list[dict]) -> list[str]:
  return list(dict.fromkeys(row['kernel'] for row in rows))


def plot_value_aware(rows: list[dict], outputs: list[dict], out: str) -> None:
  """value_aware.png: token error rate against r, per kernel (columns) and replaced layer (rows),
  both methods with one standard error; top_r_mass.png: top-r mass against r per kernel."""
  plt = _pyplot()
  kernels = _kernels(rows)
  layers = list(dict.fromkeys(row['layer'] for row in rows))
  fig, axes = plt.subplots(len(layers), len(kernels), figsize=(4.5 * len(kernels),
                                                               3.2 * len(layers)),
                           squeeze=False, sharey='row')
  for column, kernel in enumerate(kernels):
    for line, layer in enumerate(layers):
      ax = axes[line, column]
      chosen = sorted((row for row in rows if row['kernel'] == kernel and row['layer'] == layer),
                      key=lambda row: row['r'])
      rs = [row['r'] for row in chosen]
      for method in METHODS:
        ax.errorbar(rs, [row[f'{method}_error'] for row in chosen],
                    yerr=[row[f'{method}_error_se'] for row in chosen], marker='o', capsize=3,
                    label=_LABELS[method])
      ax.axhline(chosen[0]['model_error'], color='gray', linestyle='--', label='unmodified')
      _log2_axis(ax, rs)
      ax.set(title=f'{kernel}: {"every layer" if layer == "all" else layer} replaced',
             xlabel='r', ylabel='token error rate')
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'value_aware.png'), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 3.8))
  for kernel in kernels:
    chosen = [row for row in outputs if row['kernel'] == kernel and row['method'] == 'oblivious']
    rs = sorted({row['r'] for row in chosen})
    ax.plot(rs, [np.mean([row['top_r_mass'] for row in chosen if row['r'] == r]) for r in rs],
            marker='o', label=kernel)
  _log2_axis(ax, rs)
  ax.set(xlabel='r', ylabel='top-r weight mass (mean over layers)',
         title='skewness of the attention weights')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'top_r_mass.png'), dpi=110)
  plt.close(fig)


def plot_zero_shot(rows: list[dict], out: str) -> None:
  """zero_shot.png: token error rate against k for top-k attention and top-k FF, per kernel."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, swap, title in zip(axes, ('attention', 'ffn'),
                             ('top-k attention (k of the keys)',
                              'top-k feed-forward (k of the hidden units)'), strict=True):
    for index, kernel in enumerate(_kernels(rows)):
      chosen = sorted((row for row in rows if row['kernel'] == kernel and row['swap'] == swap),
                      key=lambda row: row['k'])
      dense = next(row for row in rows if row['kernel'] == kernel and row['swap'] == 'none')
      ks = [row['k'] for row in chosen]
      lines = ax.errorbar(ks, [row['error'] for row in chosen],
                          yerr=[row['error_se'] for row in chosen], marker='o', capsize=3,
                          label=kernel, color=f'C{index}')
      ax.axhline(dense['error'], color=lines[0].get_color(), linestyle='--', linewidth=0.8)
    _log2_axis(ax, ks)
    ax.set(xlabel='k', ylabel='token error rate', title=title)
  axes[0].legend(title='kernel (dashed: dense)')
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'zero_shot.png'), dpi=110)
  plt.close(fig)


def _pm(value: float, se: float, digits: int = 3) -> str:
  return f'{value:.{digits}f} ± {se:.{digits}f}'


def _mass(outputs: list[dict], kernel: str, layer: str, r: int) -> float:
  chosen = [row['top_r_mass'] for row in outputs if row['kernel'] == kernel
            and row['method'] == 'oblivious' and row['r'] == r
            and (layer == 'all' or row['layer'] == layer)]
  return float(np.mean(chosen))


def value_aware_markdown(rows: list[dict], outputs: list[dict]) -> str:
  """Token error rate (± one SE) per kernel, replaced layer and r, with the top-r mass."""
  lines = ['| kernel | layer replaced | r | top-r mass | unmodified error | value-oblivious error '
           '| value-aware error | gap (oblivious - aware) | value-oblivious loss '
           '| value-aware loss |', '|---|---|---|---|---|---|---|---|---|---|']
  for row in rows:
    lines.append(
        f'| {row["kernel"]} | {row["layer"]} | {row["r"]} | '
        f'{_mass(outputs, row["kernel"], row["layer"], row["r"]):.3f} | '
        f'{row["model_error"]:.3f} | '
        + ' | '.join(_pm(row[f'{name}_error'], row[f'{name}_error_se'])
                     for name in ('oblivious', 'value_aware', 'gap')) + ' | '
        + ' | '.join(_pm(row[f'{method}_loss'], row[f'{method}_loss_se'], 2)
                     for method in METHODS) + ' |')
  return '\n'.join(lines)


def zero_shot_markdown(rows: list[dict]) -> str:
  """Token error rate and loss (± one SE) per kernel, swap and k, and their increase (paired)."""
  lines = ['| kernel | swap | k | token error | increase | loss (nats) | increase |',
           '|---|---|---|---|---|---|---|']
  for row in rows:
    swap = 'none (dense)' if row['swap'] == 'none' else row['swap']
    lines.append(f'| {row["kernel"]} | {swap} | {row["k"] or "-"} | '
                 f'{_pm(row["error"], row["error_se"])} | '
                 f'{_pm(row["increase_error"], row["increase_error_se"])} | '
                 f'{_pm(row["loss"], row["loss_se"], 2)} | '
                 f'{_pm(row["increase_loss"], row["increase_loss_se"], 2)} |')
  return '\n'.join(lines)
