"""LRA Transformer classifiers (single input and dual encoder) and byte-level language models,
with injected attention.

A faithful port of the LRA repository's vanilla Transformer (`models/transformer/` and
`models/layers/common_layers.py`): token embedding, a CLS token prepended before the position
encoding, pre-LN blocks with bias-free attention, a final LayerNorm and a ReLU MLP head. The
attention kernel and the feed-forward layer come from `topk`, so every attention kind and FFN
kind shares one parameter tree: a vanilla checkpoint loads unchanged into a top-k model.

`LanguageModel` is the same encoder without the CLS token and with a per-position head: causal
(every attention call gets `is_causal=True`) or masked.

Shapes: B batch, L tokens (L+1 with a CLS token), D emb_dim, C num_classes (the vocabulary for
language models).
"""
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import topk
from lra.data.info import TaskInfo

# Names a config may give: name -> what it stands for.
POOLINGS = {
    'CLS': lambda x: x[:, 0],  # position 0
    'MEAN': lambda x: jnp.mean(x, axis=1),  # every position, padding included, as the original
}
INTERACTIONS = {
    'concat': lambda u, v: [u, v],
    'nli': lambda u, v: [u, v, u * v, u - v],
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Initialisers of the original encoder (common_layers.py / transformer.py).
_EMBED_INIT = nn.initializers.normal(stddev=1.0)
_POS_INIT = nn.initializers.normal(stddev=0.02)
_KERNEL_INIT = nn.initializers.xavier_uniform()


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the LRA Transformer.

  Attributes:
    vocab_size: number of token ids; id 0 is padding.
    num_classes: number of output logits.
    max_len: longest input sequence, CLS token excluded.
    emb_dim: model width D.
    num_heads: attention heads; must divide qkv_dim.
    num_layers: encoder blocks.
    qkv_dim: total width of the query/key/value projections.
    mlp_dim: hidden width of the block MLP and of the classifier head.
    dropout_rate: dropout after the position encoding, attention and MLP.
    attention_dropout_rate: dropout on attention weights.
    classifier_pool: a key of `POOLINGS`: 'CLS' (first position) or 'MEAN' (mean over all
      positions, padding included, as the original).
    learned_pos: learned position table (init N(0, 0.02)) instead of a fixed sinusoidal one.
    mask_padding: treat token id 0 as padding in attention. The original does, even for pixel
      tasks where 0 is a black pixel.
    interaction: dual encoder only, a key of `INTERACTIONS`: 'concat' joins [u, v] (the
      original's default), 'nli' joins [u, v, u * v, u - v].
    attention: the attention of every block (`topk.AttentionSpec`).
    ffn: the feed-forward layer of every block (`topk.FeedForwardSpec`); every kind has the
      dense MLP's parameters.
    causal: position i attends to positions 0..i only (a causal language model).
    dtype: computation dtype name, a key of `DTYPES`; parameters and logits stay float32.
  """

  vocab_size: int
  num_classes: int
  max_len: int
  emb_dim: int = 512
  num_heads: int = 8
  num_layers: int = 6
  qkv_dim: int = 512
  mlp_dim: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  classifier_pool: str = 'CLS'
  learned_pos: bool = False
  mask_padding: bool = True
  interaction: str = 'concat'
  attention: topk.AttentionSpec = topk.AttentionSpec()
  ffn: topk.FeedForwardSpec = topk.FeedForwardSpec()
  causal: bool = False
  dtype: str = 'float32'

  def __post_init__(self):
    choices = {'classifier_pool': POOLINGS, 'interaction': INTERACTIONS, 'dtype': DTYPES}
    for name, valid in choices.items():
      if getattr(self, name) not in valid:
        raise ValueError(f'TransformerConfig.{name}={getattr(self, name)!r}; expected one of '
                         f'{list(valid)}.')
    for name, spec in (('attention', topk.AttentionSpec), ('ffn', topk.FeedForwardSpec)):
      if not isinstance(getattr(self, name), spec):
        raise TypeError(f'TransformerConfig.{name} must be a {spec.__name__}, got '
                        f'{getattr(self, name)!r}.')
    for name in ('vocab_size', 'num_classes', 'max_len', 'emb_dim', 'num_heads', 'num_layers',
                 'qkv_dim', 'mlp_dim'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'TransformerConfig.{name}={value!r}; expected an int >= 1.')
    if self.qkv_dim % self.num_heads:
      raise ValueError(f'TransformerConfig.num_heads={self.num_heads} must divide '
                       f'qkv_dim={self.qkv_dim}.')
    for name in ('dropout_rate', 'attention_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'TransformerConfig.{name}={getattr(self, name)!r}; expected [0, 1).')


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
  """Fixed position table `[1, length, dim]`: sin on even features, cos on odd, base 10000."""
  position = np.arange(length, dtype=np.float32)[:, None]
  inv_freq = np.exp(np.arange(0, dim, 2, dtype=np.float32) * -(np.log(10000.0) / dim))
  table = np.zeros((length, dim), dtype=np.float32)
  table[:, 0::2] = np.sin(position * inv_freq)
  table[:, 1::2] = np.cos(position * inv_freq)[:, :dim // 2]
  return table[None]


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block `[B, L, D] -> [B, L, D]`."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, keep: jax.Array | None, *, train: bool) -> jax.Array:
    """`keep` is bool `[B, L]`, False at padding, or None for no masking."""
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    attention_fn = topk.make_attention_fn(cfg.attention)
    if cfg.causal:
      attention_fn = functools.partial(attention_fn, is_causal=True)
    if keep is not None:
      # Query and key padding from [B, L] vectors, for every kind, so no L x L mask is built; a
      # padded query attends uniformly, as the original.
      attention_fn = functools.partial(attention_fn, key_padding_mask=keep,
                                       query_padding_mask=keep)
    h = nn.LayerNorm(dtype=dtype, name='attention_norm')(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, qkv_features=cfg.qkv_dim, out_features=cfg.emb_dim,
        dtype=dtype, kernel_init=_KERNEL_INIT, use_bias=False, broadcast_dropout=False,
        dropout_rate=cfg.attention_dropout_rate, attention_fn=attention_fn,
        name='attention')(h, deterministic=not train)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=not train)

    h = nn.LayerNorm(dtype=dtype, name='mlp_norm')(x)
    # Every kind's defaults are LRA's MlpBlock: its initialisers and GELU.
    ffn = topk.make_feed_forward(cfg.ffn, mlp_dim=cfg.mlp_dim, out_dim=cfg.emb_dim,
                                 dropout_rate=cfg.dropout_rate, dtype=dtype, name='mlp')
    return x + ffn(h, deterministic=not train)


class Encoder(nn.Module):
  """Token ids `[B, L]` -> encodings `[B, L (+1 with CLS), D]` after the final LayerNorm.

  Attributes:
    config: model hyper-parameters.
    add_cls: prepend a learned CLS vector (zeros init) before the position encoding.
  """

  config: TransformerConfig
  add_cls: bool

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.config
    if inputs.ndim != 2 or inputs.shape[1] > cfg.max_len:
      raise ValueError(f'inputs: expected int [batch, length <= max_len={cfg.max_len}], got '
                       f'shape {inputs.shape}.')
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f'inputs: expected integer token ids, got dtype {inputs.dtype}.')
    x = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=_EMBED_INIT, name='embed')(
        inputs.astype(jnp.int32))
    keep = inputs > 0  # [B, L]
    max_len = cfg.max_len
    if self.add_cls:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, cfg.emb_dim))
      x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
      # The original gives CLS the first token's mask entry (so a black first pixel masks it).
      keep = jnp.concatenate([keep[:, :1], keep], axis=1)
      max_len += 1
    length = x.shape[1]
    if cfg.learned_pos:
      x = x + self.param('pos_embedding', _POS_INIT, (1, max_len, cfg.emb_dim))[:, :length]
    else:
      x = x + sinusoidal_table(length, cfg.emb_dim)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    x = x.astype(DTYPES[cfg.dtype])

    for i in range(cfg.num_layers):
      x = EncoderBlock(cfg, name=f'encoderblock_{i}')(x, keep if cfg.mask_padding else None,
                                                      train=train)
    return nn.LayerNorm(dtype=DTYPES[cfg.dtype], name='encoder_norm')(x)


class Classifier(nn.Module):
  """Single-input classifier: `batch['inputs']` int `[B, L]` -> float32 logits `[B, C]`."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool) -> jax.Array:
    cfg = self.config
    x = Encoder(cfg, add_cls=cfg.classifier_pool == 'CLS', name='encoder')(
        batch['inputs'], train=train)
    x = nn.relu(nn.Dense(cfg.mlp_dim, name='mlp')(POOLINGS[cfg.classifier_pool](x)))
    return nn.Dense(cfg.num_classes, name='logits')(x).astype(jnp.float32)


class DualClassifier(nn.Module):
  """Siamese matcher: `batch['inputs1']`, `batch['inputs2']` int `[B, L]` -> logits `[B, C]`.

  One shared encoder (no CLS token, no cross attention) encodes each document; 'CLS' pooling
  takes each document's first position, as the original.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool) -> jax.Array:
    cfg = self.config
    encoder = Encoder(cfg, add_cls=False, name='encoder')
    pool = POOLINGS[cfg.classifier_pool]
    u = pool(encoder(batch['inputs1'], train=train))
    v = pool(encoder(batch['inputs2'], train=train))
    x = jnp.concatenate(INTERACTIONS[cfg.interaction](u, v), axis=-1)
    x = nn.relu(nn.Dense(cfg.mlp_dim, name='mlp')(x))
    x = nn.relu(nn.Dense(cfg.mlp_dim // 2, name='mlp2')(x))
    return nn.Dense(cfg.num_classes, name='logits')(x).astype(jnp.float32)


class LanguageModel(nn.Module):
  """Byte-level language model: `batch['inputs']` int `[B, L]` -> float32 logits `[B, L, C]`.

  Causal with `config.causal` (logits at i predict token i + 1), else masked (logits at i predict
  the token hidden at i).
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool) -> jax.Array:
    x = Encoder(self.config, add_cls=False, name='encoder')(batch['inputs'], train=train)
    return nn.Dense(self.config.num_classes, name='logits')(x).astype(jnp.float32)


def _build(cls: type, group: ml_collections.ConfigDict, where: str, **fields: Any) -> Any:
  """`cls(**group, **fields)`; errors name the config group `where`."""
  valid = sorted({field.name for field in dataclasses.fields(cls)} - set(fields))
  unknown = sorted(set(group.keys()) - set(valid))
  if unknown:
    raise ValueError(f'{where}: unknown keys {unknown}; valid keys: {valid}.')
  try:
    return cls(**group, **fields)
  except (TypeError, ValueError) as error:
    raise ValueError(f'{where}: {error}') from None


def build_model(config: ml_collections.ConfigDict, info: TaskInfo) -> nn.Module:
  """Builds the classifier for `info` from `config.model`, `config.attention` and `config.ffn`.

  Args:
    config: run config (see configs/common.py); other fields are ignored.
    info: the task; gives vocab_size, num_classes, max_length, whether it is dual-input and its
      objective.

  Returns:
    `LanguageModel` for the language-model objectives (causal for 'causal_lm'),
    `DualClassifier` for dual-input tasks, else `Classifier`.

  Raises:
    ValueError: on unknown keys in those groups or invalid values, naming the group.
  """
  model_config = _build(
      TransformerConfig, config.model, 'config.model', vocab_size=info.vocab_size,
      num_classes=info.num_classes, max_len=info.max_length,
      attention=_build(topk.AttentionSpec, config.attention, 'config.attention'),
      ffn=_build(topk.FeedForwardSpec, config.ffn, 'config.ffn'),
      causal=info.objective == 'causal_lm')
  if info.objective != 'classification':
    return LanguageModel(model_config)
  return DualClassifier(model_config) if info.dual else Classifier(model_config)
