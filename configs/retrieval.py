"""Retrieval = AAN document matching (2 x 4,000 bytes, 2 classes): LRA's vanilla settings.

  python train.py --config=configs/retrieval.py:topk --workdir=runs/retrieval_topk \
    --config.data_dir=DATA

A shared encoder reads each document (no CLS token: 'CLS' pooling takes each document's first
byte) and the head sees [u, v]; `--config.model.interaction=nli` gives [u, v, u*v, u-v].
Warmup (8,000) exceeds the 5,000 steps, so the learning rate never peaks, as in the original.
Arg: vanilla|chunked|topk, smoke, k=INT, query_chunk_size=INT.
Runtime class: about an hour on one GPU (5K steps of batch 32 x 2 documents); smoke: seconds.
Published vanilla Transformer test accuracy (LRA leaderboard): 57.46%.
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Run config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.base_config(arg.attention)
  config.task = 'retrieval'
  config.max_length = 4000
  config.batch_size = config.eval_batch_size = 32
  config.num_train_steps = 5000
  config.eval_frequency = 100
  config.checkpoint_every = 1000
  config.learning_rate = 0.05
  config.schedule = 'rsqrt'
  config.warmup_steps = 8000
  config.weight_decay = 0.1
  config.model.update(emb_dim=128, qkv_dim=128, mlp_dim=512, num_heads=4, num_layers=4,
                      classifier_pool='CLS', learned_pos=False, interaction='concat')
  return common.finalize(config, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Override dicts of the attention sweep for `arg` (see `common.attention_sweep`)."""
  return common.attention_sweep(common.parse_arg(arg, **common.ARGS))
