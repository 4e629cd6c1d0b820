"""ListOps (2,000 tokens, 10 classes): the LRA repository's vanilla-Transformer settings.

  python train.py --config=configs/listops.py:topk --workdir=runs/listops_topk \
    --config.data_dir=DATA

Arg: vanilla|chunked|topk, smoke, k=INT, query_chunk_size=INT (e.g. `topk,k=64`).
Runtime class: under an hour on one GPU (5K steps of batch 32); smoke: seconds on CPU.
Published vanilla Transformer test accuracy (LRA leaderboard): 36.37%.
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Run config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.base_config(arg.attention)
  config.task = 'listops'
  config.max_length = 2000
  config.batch_size = config.eval_batch_size = 32
  config.num_train_steps = 5000
  config.eval_frequency = 50
  config.checkpoint_every = 500
  config.learning_rate = 0.05
  config.schedule = 'rsqrt'
  config.warmup_steps = 1000
  config.weight_decay = 0.1
  config.model.update(emb_dim=512, qkv_dim=512, mlp_dim=1024, num_heads=8, num_layers=4,
                      classifier_pool='CLS', learned_pos=False)
  return common.finalize(config, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Override dicts of the attention sweep for `arg` (see `common.attention_sweep`)."""
  return common.attention_sweep(common.parse_arg(arg, **common.ARGS))
