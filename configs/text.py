"""Text = byte-level IMDB (1,000 bytes, 2 classes): the LRA repository's vanilla settings.

  python train.py --config=configs/text.py:topk --workdir=runs/text_topk --config.data_dir=DATA

The repository's config uses 1,000 bytes although the paper speaks of 4K; pass
`--config.max_length=4000` for the longer variant. IMDB has no validation split: validation is
the test split, so do not select checkpoints on it.
Arg: vanilla|chunked|topk, smoke, k=INT, query_chunk_size=INT.
Runtime class: about an hour on one GPU (20K steps of batch 32); smoke: seconds on CPU.
Published vanilla Transformer test accuracy (LRA leaderboard): 64.27%.
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Run config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.base_config(arg.attention)
  config.task = 'text'
  config.max_length = 1000
  config.batch_size = config.eval_batch_size = 32
  config.num_train_steps = 20000
  config.eval_frequency = 100
  config.checkpoint_every = 1000
  config.learning_rate = 0.05
  config.schedule = 'rsqrt'
  config.warmup_steps = 8000
  config.weight_decay = 0.1
  config.model.update(emb_dim=256, qkv_dim=256, mlp_dim=1024, num_heads=4, num_layers=4,
                      classifier_pool='CLS', learned_pos=False)
  return common.finalize(config, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Override dicts of the attention sweep for `arg` (see `common.attention_sweep`)."""
  return common.attention_sweep(common.parse_arg(arg, **common.ARGS))
