"""Attention and feed-forward specs: which form a model uses, named and validated in one place.

An `AttentionSpec` or `FeedForwardSpec` is a frozen dataclass checked when it is built, so a bad
value fails before any model is traced. `make_attention_fn` and `make_feed_forward` turn a spec
into what flax needs. The valid kinds are the keys of `ATTENTION_FNS` and `FEED_FORWARDS`; a
field a kind does not use is ignored for that kind, so one config switches kinds with one field.
"""
import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from topk import inputs, kernels
from topk.chunked import chunked_attention
from topk.dense import dot_product_attention
from topk.feedforward import FEED_FORWARDS
from topk.topk_attention import check_options, topk_attention

ATTENTION_FNS: dict[str, Callable[..., Any]] = {
    'vanilla': dot_product_attention,
    'chunked': chunked_attention,
    'topk': topk_attention,
}


def _check_kind(kind: str, registry: dict[str, Any], what: str) -> None:
  if kind not in registry:
    raise ValueError(f'Unknown {what} kind {kind!r}; valid kinds: {sorted(registry)}.')


def _check_k(kind: str, k: int | None, what: str) -> None:
  if k is None and kind == 'topk':
    raise ValueError(f"{what.capitalize()} kind 'topk' needs the option k.")
  if k is not None:
    inputs.check_positive_int(k, 'k')


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """The attention of a model.

  Attributes:
    kind: a key of `ATTENTION_FNS`: 'vanilla' (dense), 'chunked' (exact, query chunks) or
      'topk'.
    k: keys kept per query (an int >= 1); required by 'topk'.
    query_chunk_size: queries per chunk ('chunked', 'topk').
    kernel: scores-to-weights kernel, a key of `topk.kernels.KERNELS`.
    selection: 'exact' or 'approximate' ('topk'); approximate selects with
      `jax.lax.approx_max_k`, fast on TPU, trading exactness for speed (it is exact on CPU/GPU).
    recall_target: expected fraction of the true top k that 'approximate' finds, in (0, 1].
    fused: 'topk' selects with the fused kernel (`topk.fused`) where it applies (NVIDIA GPUs);
      False keeps the unfused path everywhere.
  """

  kind: str = 'vanilla'
  k: int | None = None
  query_chunk_size: int = 1024
  kernel: str = 'softmax'
  selection: str = 'exact'
  recall_target: float = 0.95
  fused: bool = True

  def __post_init__(self):
    _check_kind(self.kind, ATTENTION_FNS, 'attention')
    _check_k(self.kind, self.k, 'attention')
    inputs.check_positive_int(self.query_chunk_size, 'query_chunk_size')
    kernels.get_kernel(self.kernel)
    check_options(self.selection, self.recall_target, self.fused)

  def options(self) -> dict[str, Any]:
    """The fields the kind's function takes, as its keyword arguments."""
    taken = _keyword_only(ATTENTION_FNS[self.kind])
    return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
            if field.name in taken}


def _keyword_only(fn: Callable[..., Any]) -> set[str]:
  return {name for name, p in inspect.signature(fn).parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_attention_fn(spec: AttentionSpec | str, **options: Any) -> Callable[..., Any]:
  """Returns the attention `spec` describes, for `nn.MultiHeadDotProductAttention`.

  The result keeps flax's parameter names (query, key, value, bias, mask, dropout_rng, ...), so
  flax passes it the mask and dropout arguments.

  Args:
    spec: an `AttentionSpec`, or a kind name: `make_attention_fn('topk', k=64)` builds
      `AttentionSpec(kind='topk', k=64)`. Anything else is a TypeError.
    **options: with a kind name only: keyword-only options of that kind's function; the spec's
      fields go into the spec, others (e.g. is_causal) are bound as given.

  Returns:
    `fn(query, key, value, bias=None, mask=None, ...) -> [batch..., q_len, heads, d_v]`.
  """
  if isinstance(spec, str):
    _check_kind(spec, ATTENTION_FNS, 'attention')
    allowed = _keyword_only(ATTENTION_FNS[spec])
    unknown = sorted(set(options) - allowed)
    if unknown:
      raise ValueError(f'Unknown options {unknown} for attention kind {spec!r}; valid options: '
                       f'{sorted(allowed)}.')
    fields = {field.name for field in dataclasses.fields(AttentionSpec)}
    spec = AttentionSpec(spec, **{name: options.pop(name) for name in fields & set(options)})
  elif not isinstance(spec, AttentionSpec):
    raise TypeError(f'make_attention_fn takes an AttentionSpec or a kind name '
                    f'{sorted(ATTENTION_FNS)}, got {spec!r} ({type(spec).__name__}); for a dict '
                    'of fields, pass AttentionSpec(**fields).')
  elif options:
    raise TypeError(f'make_attention_fn takes options {sorted(options)} only with a kind name; '
                    'set them in the AttentionSpec.')
  return functools.partial(ATTENTION_FNS[spec.kind], **spec.options(), **options)


@dataclasses.dataclass(frozen=True)
class FeedForwardSpec:
  """The feed-forward layer of a model.

  Attributes:
    kind: a key of `FEED_FORWARDS`: 'dense' (the MLP) or 'topk' (`TopKFeedForward`, the same
      parameters).
    k: hidden units kept per token (an int >= 1); required by 'topk'.
    query_chunk_size: tokens per chunk ('topk').
  """

  kind: str = 'dense'
  k: int | None = None
  query_chunk_size: int = 1024

  def __post_init__(self):
    _check_kind(self.kind, FEED_FORWARDS, 'feed-forward')
    _check_k(self.kind, self.k, 'feed-forward')
    inputs.check_positive_int(self.query_chunk_size, 'query_chunk_size')


def make_feed_forward(spec: FeedForwardSpec, **attributes: Any) -> nn.Module:
  """The feed-forward module `spec` describes, `[..., d] -> [..., out_dim]`.

  Args:
    spec: the layer, a `FeedForwardSpec` (anything else is a TypeError).
    **attributes: module attributes every kind takes (mlp_dim, out_dim, dropout_rate, dtype,
      name, ...).
  """
  if not isinstance(spec, FeedForwardSpec):
    raise TypeError(f'make_feed_forward takes a FeedForwardSpec, got {spec!r} '
                    f'({type(spec).__name__}); for a kind name or a dict of fields, pass '
                    'FeedForwardSpec(kind) or FeedForwardSpec(**fields).')
  module = FEED_FORWARDS[spec.kind]
  taken = {field.name for field in dataclasses.fields(module)}
  options = {name: getattr(spec, name) for name in ('k', 'query_chunk_size') if name in taken}
  return module(**attributes, **options)
