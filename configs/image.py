"""Image = grayscale CIFAR-10 (1,024 pixels, 10 classes): the LRA repository's vanilla settings.

  python train.py --config=configs/image.py:topk --workdir=runs/image_topk --config.data_dir=DATA

Pixels 0-255 are the tokens; as in the original, black pixels (id 0) are masked as padding
(`--config.model.mask_padding=false` turns that off). 35,000 steps = 200 epochs of 175 steps.
Arg: vanilla|chunked|topk, smoke, k=INT, query_chunk_size=INT.
Runtime class: about an hour on one GPU (35K steps of batch 256, one layer); smoke: seconds.
Published vanilla Transformer test accuracy (LRA leaderboard): 42.44%.
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Run config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.base_config(arg.attention)
  config.task = 'image'
  config.max_length = 1024
  config.batch_size = config.eval_batch_size = 256
  config.num_train_steps = 35000
  config.eval_frequency = 175
  config.checkpoint_every = 1750
  config.learning_rate = 5e-4
  config.schedule = 'cosine'
  config.warmup_steps = 175
  config.weight_decay = 0.0
  config.model.update(emb_dim=128, qkv_dim=64, mlp_dim=128, num_heads=8, num_layers=1,
                      dropout_rate=0.3, attention_dropout_rate=0.2, classifier_pool='CLS',
                      learned_pos=True)
  return common.finalize(config, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Override dicts of the attention sweep for `arg` (see `common.attention_sweep`)."""
  return common.attention_sweep(common.parse_arg(arg, **common.ARGS))
