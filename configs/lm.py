r"""Byte-level language model on a folder of UTF-8 text files (causal or masked).

  python train.py --config=configs/lm.py:causal --workdir=runs/lm_causal \
    --config.data_dir=FOLDER --config.task_options.pattern='**/*.py'

`data_dir` is the folder; the files matching `task_options.pattern` (default '**/*.txt') are
read (lra.data.text_folder: the first 90% of their bytes train, 5% validation, 5% test).
Arg: causal|masked (the objective), vanilla|chunked|topk, kernel=NAME (a key of
topk.kernels.KERNELS), smoke, k=INT, query_chunk_size=INT (e.g. `causal,kernel=relu`).
Metrics are per token: 'accuracy' is the token accuracy, 'loss' the mean cross-entropy in nats.
Runtime class: about 3.5 minutes on 2 CPU cores (133K parameters: 2 layers, width 64, 128 bytes
of context, 1,200 steps of batch 32); smoke: seconds. On the stdlib `email` package
(studies/lm/README.md, "Corpus") the causal softmax model reaches 41.7% validation token error.
"""
import ml_collections

from configs import common

OBJECTIVES = {'causal': 'causal_lm', 'masked': 'masked_lm'}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Run config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, objective=tuple(OBJECTIVES), kernel=str, **common.ARGS)
  config = common.base_config(arg.attention)
  config.task = 'lm'
  config.task_options = ml_collections.ConfigDict(dict(
      objective=OBJECTIVES[arg.objective], pattern='**/*.txt'))
  config.max_length = 128  # bytes of context
  config.batch_size = config.eval_batch_size = 32
  config.num_train_steps = 1200
  config.eval_frequency = 200
  config.checkpoint_every = 500
  config.num_eval_steps = 16
  config.learning_rate = 3e-3
  config.schedule = 'cosine'
  config.warmup_steps = 100
  config.weight_decay = 0.0
  config.grad_clip_norm = 1.0
  config.model.update(emb_dim=64, qkv_dim=64, mlp_dim=256, num_heads=4, num_layers=2,
                      dropout_rate=0.0, attention_dropout_rate=0.0, learned_pos=False)
  if arg.kernel is not None:
    config.attention.kernel = arg.kernel
  return common.finalize(config, arg)
