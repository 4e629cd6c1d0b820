"""Studies on small byte-level language models trained with `train.py` (configs/lm.py).

- `runs`: training the models (one per attention kernel, through `lra.train`) and their
  per-window token errors and losses, optionally with attention outputs replaced;
- `analysis`: the value-aware study (Gupta & Berant) on language models, on the shared study
  modules (`studies.capture`, `studies.approximations`), and the zero-shot top-k swaps of
  attention and feed-forward layers (Gupta et al.);
- `report`: plots and markdown tables;
- `python -m studies.lm {value_aware,zero_shot} ...`: the command line (see `__main__`).
"""
