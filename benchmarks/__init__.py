"""Benchmarks for the topk library (run as modules, e.g. `python -m benchmarks.attention`)."""
