"""Value-aware study (Gupta & Berant, "Value-aware Approximate Attention").

How well r-sparse approximations reproduce attention outputs of trained models:
- `solvers`: the approximations themselves (value-oblivious top-r, exact and greedy value-aware)
  and their metrics, on per-head arrays;
- `capture`: runs (trained workdirs or random-init models) and the capture of each attention
  layer's queries, keys, values and mask;
- `analysis`: per-layer errors and the accuracy of models whose attention outputs are replaced;
- `report`: CSV files, plots and markdown tables;
- `python -m studies.value_aware ...`: the command line (see `__main__`).
"""
