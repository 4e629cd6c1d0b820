"""Long Range Arena: data pipelines, models and training-loop pieces built on `topk`."""
