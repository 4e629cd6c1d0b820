"""Value-aware study (Gupta & Berant, "Value-aware Approximate Attention").

How well r-sparse approximations reproduce attention outputs of trained LRA models, built on the
shared study modules (`studies.solvers`, `studies.capture`, `studies.approximations`):
- `analysis`: per-layer errors and the accuracy of models whose attention outputs are replaced;
- `report`: plots and markdown tables;
- `python -m studies.value_aware ...`: the command line (see `__main__`).
"""
