"""Pathfinder (size x size pixels, 2 classes): the LRA repository's vanilla-Transformer settings.

  python train.py --config=configs/pathfinder.py:topk --workdir=runs/pathfinder32_topk \
    --config.data_dir=DATA
  python train.py --config=configs/pathfinder.py:64,easy,topk,k=64 --workdir=...

Arg: 32|64|128|256 (image size, default 32), easy|intermediate|hard (contour length, default
hard), vanilla|chunked|topk, smoke, k=INT, query_chunk_size=INT. The LRA "Pathfinder" result is
32/hard, "Path-X" is 128/hard (configs/pathx.py). Steps = 200 epochs of 160K images (100 for
256); black pixels (id 0) are masked as padding, as in the original.
Runtime class (one GPU): 32: hours (62K steps of batch 512); 64: hours; 128 and 256: days.
Smoke: seconds on CPU.
Published vanilla Transformer test accuracy (LRA leaderboard): 71.40% (32/hard); Path-X: FAIL.
"""
import ml_collections

from configs import common

SIZES = (32, 64, 128, 256)
DIFFICULTIES = ('hard', 'easy', 'intermediate')

# Per image size, from the repository's image/configs/pathfinder{size}/transformer_base.py.
_SETTINGS = {
    32: dict(batch_size=512, num_train_steps=62400, warmup_steps=312, grad_clip_norm=0.0,
             model=dict(emb_dim=32, qkv_dim=16, mlp_dim=32, num_heads=4, num_layers=4,
                        dropout_rate=0.2, attention_dropout_rate=0.1, classifier_pool='MEAN',
                        learned_pos=False)),
    64: dict(batch_size=256, num_train_steps=125000, warmup_steps=625, grad_clip_norm=0.0,
             model=dict(emb_dim=32, qkv_dim=32, mlp_dim=32, num_heads=4, num_layers=2,
                        classifier_pool='CLS', learned_pos=True)),
    128: dict(batch_size=64, num_train_steps=500000, warmup_steps=2500, grad_clip_norm=1.0,
              model=dict(emb_dim=32, qkv_dim=16, mlp_dim=32, num_heads=2, num_layers=1,
                         classifier_pool='MEAN', learned_pos=True)),
    256: dict(batch_size=32, num_train_steps=500000, warmup_steps=5000, grad_clip_norm=0.0,
              model=dict(emb_dim=32, qkv_dim=32, mlp_dim=32, num_heads=4, num_layers=2,
                         classifier_pool='CLS', learned_pos=True)),
}


def sized_config(arg, size: int) -> ml_collections.ConfigDict:
  """Config of one image size, before the task name is set and before `common.finalize`."""
  settings = _SETTINGS[size]
  config = common.base_config(arg.attention)
  config.max_length = size * size
  config.batch_size = config.eval_batch_size = settings['batch_size']
  config.num_train_steps = settings['num_train_steps']
  # One epoch: evaluate and warm up once per epoch, checkpoint every 10 epochs.
  config.eval_frequency = settings['warmup_steps']
  config.checkpoint_every = 10 * settings['warmup_steps']
  config.learning_rate = 1e-3
  config.schedule = 'cosine'
  config.warmup_steps = settings['warmup_steps']
  config.weight_decay = 0.0
  config.grad_clip_norm = settings['grad_clip_norm']
  config.model.update(settings['model'])
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Run config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, size=SIZES, difficulty=DIFFICULTIES, **common.ARGS)
  config = sized_config(arg, arg.size)
  config.task = f'pathfinder{arg.size}'
  config.task_options.difficulty = arg.difficulty
  return common.finalize(config, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Override dicts of the attention sweep for `arg` (see `common.attention_sweep`)."""
  return common.attention_sweep(
      common.parse_arg(arg, size=SIZES, difficulty=DIFFICULTIES, **common.ARGS))
