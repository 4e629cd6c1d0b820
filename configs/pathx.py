"""Path-X = Pathfinder 128x128, hard (16,384 tokens, 2 classes): LRA's vanilla settings.

  python train.py --config=configs/pathx.py:topk --workdir=runs/pathx_topk --config.data_dir=DATA

The same settings as `configs/pathfinder.py:128,hard` (gradient clipping 1.0, 500K steps of
batch 64) under the task name 'pathx'. Vanilla attention at 16K tokens needs a [16K, 16K] score
block per head; chunked and top-k attention bound that by query_chunk_size rows.
Arg: vanilla|chunked|topk, smoke, k=INT, query_chunk_size=INT.
Runtime class: days on one GPU; smoke: seconds on CPU.
Published vanilla Transformer test accuracy (LRA leaderboard): FAIL (chance level, 50%).
"""
import ml_collections

from configs import common, pathfinder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Run config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, **common.ARGS)
  config = pathfinder.sized_config(arg, 128)
  config.task = 'pathx'
  return common.finalize(config, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Override dicts of the attention sweep for `arg` (see `common.attention_sweep`)."""
  return common.attention_sweep(common.parse_arg(arg, **common.ARGS))
