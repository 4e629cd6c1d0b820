"""Shared defaults, the `arg` parser, the smoke preset, sweeps and validation of task configs.

A task config is `configs/<task>.py:get_config(arg)`, where `arg` is a comma list such as
`topk,k=64,smoke`: bare tokens pick a choice (attention kind, presets) and `name=value` sets an
argument. Any field can still be overridden with `--config.<field>=...`; configs are locked, so
misspelt fields are rejected. Configs are plain data: this package imports nothing but
ml_collections, and the trainer checks every value (building the model's specs, the optimizer and
the loop settings) before it reads any data.
"""
import itertools
import types
from typing import Any

import ml_collections

# The attention kinds the arg names, as bare tokens: the keys of `topk.ATTENTION_FNS` (a test
# keeps the two equal; configs do not import topk, which starts JAX).
ATTENTION_KINDS = ('vanilla', 'chunked', 'topk')

# Arguments every task accepts: name -> default, a tuple of choices (the first is the default),
# or a type (the argument is None unless given).
ARGS = {
    'attention': ATTENTION_KINDS,  # attention.kind
    'smoke': False,  # tiny model and data: a few CPU-seconds per run
    'k': int,  # attention.k; default 128, or 8 under smoke
    'query_chunk_size': int,  # attention.query_chunk_size; default 1024, or 16 under smoke
}

# Sweep grids: attention.k and attention.query_chunk_size (full runs / smoke runs).
SWEEP_KS = (32, 64, 128, 256)
SWEEP_CHUNKS = (256, 1024)
SMOKE_SWEEP_KS = (4, 16)
SMOKE_SWEEP_CHUNKS = (16,)


def _convert(name: str, text: str, spec: Any) -> Any:
  if isinstance(spec, tuple):
    matches = [choice for choice in spec if str(choice) == text]
    if not matches:
      raise ValueError(f'config arg {name}={text!r}; expected one of {list(spec)}.')
    return matches[0]
  if isinstance(spec, bool):
    if text not in ('true', 'false'):
      raise ValueError(f'config arg {name}={text!r}; expected true or false.')
    return text == 'true'
  kind = spec if isinstance(spec, type) else type(spec)
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f'config arg {name}={text!r}; expected {kind.__name__}.') from None


def parse_arg(arg: str | None, **spec: Any) -> types.SimpleNamespace:
  """Parses `arg` ('topk,k=64,smoke') against `spec` (name -> default, tuple of choices, or type).

  A bare token selects a choice of a tuple argument or turns a bool argument on; `name=value`
  sets any argument, converted to the type of its default (or to the type itself, for an
  argument that is None unless given).

  Raises:
    ValueError: on an unknown token or name, a name given twice (also as two choices of one
      argument, e.g. 'topk,vanilla'), or a value of the wrong type; lists what is valid.
  """
  values = {name: s[0] if isinstance(s, tuple) else None if isinstance(s, type) else s
            for name, s in spec.items()}
  bare = {str(c): name for name, s in spec.items() if isinstance(s, tuple) for c in s}
  bare.update({name: name for name, s in spec.items() if isinstance(s, bool)})
  given = {}  # name -> the token that set it
  for token in filter(None, (arg or '').split(',')):
    name, is_pair, text = token.partition('=')
    if not is_pair:
      if token not in bare:
        raise ValueError(f'config arg {token!r} is unknown; valid tokens: {sorted(bare)}, or '
                         f'name=value with a name in {sorted(spec)}.')
      name = bare[token]
      text = token if isinstance(spec[name], tuple) else 'true'
    if name not in spec:
      raise ValueError(f'config arg {name!r} is unknown; valid names: {sorted(spec)}.')
    if name in given:
      raise ValueError(f'config arg {name!r} is given twice ({given[name]!r} and {token!r}).')
    given[name] = token
    values[name] = _convert(name, text, spec[name])
  return types.SimpleNamespace(**values)


def base_config(attention: str) -> ml_collections.ConfigDict:
  """Fields whose defaults all tasks share; each task config adds the rest (see lra/README.md)."""
  config = ml_collections.ConfigDict()
  config.task_options = ml_collections.ConfigDict()  # extra kwargs for lra.data.get_task
  config.data_dir = ''  # root of the LRA release / TFDS data
  config.seed = 0
  # Inputs longer than max_length are cut to it, with a warning per split saying how many and by
  # how much; False makes such an input an error naming it, before training starts.
  config.truncate = True
  config.num_eval_steps = -1  # validation batches per evaluation; -1 = whole split
  config.keep_checkpoints = 2  # periodic checkpoints kept, plus the best
  config.log_every = 50  # steps between progress lines
  config.profile_steps = 0  # train steps traced with jax.profiler into workdir/profile; 0 = off
  config.grad_clip_norm = 0.0  # global-norm gradient clipping; 0 = off
  # lra.models.TransformerConfig fields; the task adds sizes, pooling and positions.
  config.model = ml_collections.ConfigDict(dict(
      dropout_rate=0.1, attention_dropout_rate=0.1, mask_padding=True, dtype='float32'))
  # topk.AttentionSpec fields. k = 128 as in the top-k paper's LRA runs; queries are processed in
  # chunks of 1024. selection='approximate' (with recall_target) trades exactness for speed on TPU.
  # method=None selects exactly with each platform's default (topk.select.DEFAULT_METHODS); a
  # name (e.g. 'two_stage') runs that method everywhere. fused=False keeps top-k off the fused
  # score-and-select kernel it uses on NVIDIA GPUs.
  config.attention = ml_collections.ConfigDict(dict(
      kind=attention, k=128, query_chunk_size=1024, kernel='softmax', selection='exact',
      recall_target=0.95, method=None, fused=True))
  # topk.FeedForwardSpec fields.
  config.ffn = ml_collections.ConfigDict(dict(kind='dense', k=128, query_chunk_size=1024))
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks `config` in place to a model and run that train a few steps on CPU in seconds."""
  config.max_length = min(config.max_length, 64)
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = 4
  config.eval_frequency = config.checkpoint_every = 2
  config.num_eval_steps = 2
  config.log_every = 1
  config.warmup_steps = 2
  config.model.update(emb_dim=32, num_heads=2, qkv_dim=32, mlp_dim=64,
                      num_layers=min(config.model.num_layers, 2))
  # Small k and chunks so that smoke runs select and chunk for real.
  config.attention.update(k=8, query_chunk_size=16)
  config.ffn.update(k=16, query_chunk_size=16)


def finalize(config: ml_collections.ConfigDict, arg: types.SimpleNamespace
             ) -> ml_collections.ConfigDict:
  """Applies the common `arg` (smoke preset, then k/query_chunk_size) and locks."""
  if arg.smoke:
    apply_smoke(config)
  if arg.k is not None:
    config.attention.k = arg.k
  if arg.query_chunk_size is not None:
    config.attention.query_chunk_size = arg.query_chunk_size
  config.lock()
  return config


def attention_sweep(arg: types.SimpleNamespace) -> list[dict[str, Any]]:
  """Override dicts for a sweep of `arg.attention`, after a vanilla baseline point.

  'topk' sweeps k x query_chunk_size, 'chunked' sweeps query_chunk_size, 'vanilla' is the
  baseline alone. A k or query_chunk_size given in the arg pins that axis to its value (every
  point overrides the arg's, so sweeping the axis anyway would drop it unseen).
  """
  ks, chunks = (SMOKE_SWEEP_KS, SMOKE_SWEEP_CHUNKS) if arg.smoke else (SWEEP_KS, SWEEP_CHUNKS)
  if arg.k is not None:
    ks = (arg.k,)
  if arg.query_chunk_size is not None:
    chunks = (arg.query_chunk_size,)
  points = [{'attention.kind': 'vanilla'}]
  if arg.attention == 'chunked':
    points += [{'attention.kind': 'chunked', 'attention.query_chunk_size': c} for c in chunks]
  elif arg.attention == 'topk':
    points += [{'attention.kind': 'topk', 'attention.k': k, 'attention.query_chunk_size': c}
               for k, c in itertools.product(ks, chunks)]
  return points
