"""Studies built on `topk` and `lra`: analyses of trained models, kept out of both libraries.

The studies (`value_aware`, `lm`) share, and never import from each other:
- `capture`: runs (trained workdirs, read-only, or random-init models) and the capture of each
  attention layer's queries, keys, values and mask;
- `solvers`: r-sparse approximations of attention outputs (value-oblivious top-r, exact and greedy
  value-aware) and their metrics, on per-head arrays;
- `approximations`: those approximations applied to captured layers: errors, and `replace`
  functions that swap them into a model;
- `tables`: rows of results as CSV files.
"""
