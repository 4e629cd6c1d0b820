"""Run configs: one module per LRA task, `get_config(arg)` and `get_sweep(arg)` each."""
