"""Studies built on `topk` and `lra`: analyses of trained models, kept out of both libraries."""
