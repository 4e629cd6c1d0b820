"""Attention and feed-forward specs: which form a model uses, named and validated in one place.

An `AttentionSpec` or `FeedForwardSpec` is a frozen dataclass checked when it is built, so a bad
value fails before any model is traced. `make_attention_fn` and `make_feed_forward` turn a spec
into what flax needs. The valid kinds are the keys of `ATTENTION_FNS` and `FEED_FORWARDS`; a
field a kind does not use is ignored for that kind, so one config switches kinds with one field.
Each kind names the fields it takes (`AttentionFn.fields`, `FeedForward.fields`); they reach
its function as keyword arguments, its module as attributes.
"""
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn

from topk import fused, inputs, kernels, select
from topk.chunked import chunked_attention
from topk.dense import dot_product_attention
from topk.feedforward import FEED_FORWARDS
from topk.fused import FusedOptions
from topk.topk_attention import topk_attention


class AttentionFn(NamedTuple):
  """An attention kind: its function and the `AttentionSpec` fields it takes (as keywords)."""
  fn: Callable[..., Any]
  fields: tuple[str, ...]


ATTENTION_FNS: dict[str, AttentionFn] = {
    'vanilla': AttentionFn(dot_product_attention, ('kernel',)),
    'chunked': AttentionFn(chunked_attention, ('query_chunk_size', 'kernel')),
    'topk': AttentionFn(topk_attention, ('k', 'query_chunk_size', 'kernel', 'selection',
                                         'recall_target', 'method', 'fused', 'fused_options')),
}
# Keywords every attention function takes per call, beside the spec's fields (what a model
# knows, not its config).
CALL_OPTIONS = ('is_causal', 'key_padding_mask', 'query_padding_mask')


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
  """The attention of a model: what runs, so two models in one process can differ.

  Attributes:
    kind: a key of `ATTENTION_FNS`: 'vanilla' (dense), 'chunked' (exact, query chunks) or
      'topk'.
    k: keys kept per query (an int >= 1); required by 'topk'.
    query_chunk_size: queries per chunk ('chunked', 'topk').
    kernel: scores-to-weights kernel, a key of `topk.kernels.KERNELS`.
    selection: 'exact' or 'approximate' ('topk'); approximate selects with
      `jax.lax.approx_max_k`, fast on TPU, trading exactness for speed (it is exact on CPU/GPU).
    recall_target: expected fraction of the true top k that 'approximate' finds, in (0, 1].
    method: the exact selection's method ('topk'): None for `topk.select.DEFAULT_METHODS`'
      choice per platform (the CPU kernel 'ffi', 'pallas' on NVIDIA GPUs), or a key of
      `topk.select.METHODS` on every platform.
    fused: 'topk' selects with the fused kernel (`topk.fused`) where it applies
      (`fused_options.platforms`); False keeps the unfused path everywhere.
    fused_options: which fused kernel (`variant`), on which platforms (NVIDIA GPUs by default)
      and with which tuning options (`topk.fused.FusedOptions`).
  """

  kind: str = 'vanilla'
  k: int | None = None
  query_chunk_size: int = 1024
  kernel: str = 'softmax'
  selection: str = 'exact'
  recall_target: float = 0.95
  method: str | None = None
  fused: bool = True
  fused_options: FusedOptions = FusedOptions()

  def __post_init__(self):
    _check_kind(self.kind, ATTENTION_FNS, 'attention')
    _check_k(self.kind, self.k, 'attention')
    inputs.check_positive_int(self.query_chunk_size, 'query_chunk_size')
    kernels.get_kernel(self.kernel)
    select.check_selection(self.selection, self.recall_target, self.method)
    inputs.check_bool(self.fused, 'fused')
    fused.check_options(self.fused_options)

  def options(self) -> dict[str, Any]:
    """The fields the kind's function takes, as its keyword arguments."""
    return {name: getattr(self, name) for name in ATTENTION_FNS[self.kind].fields}


def make_attention_fn(spec: AttentionSpec | str, **options: Any) -> Callable[..., Any]:
  """Returns the attention `spec` describes, for `nn.MultiHeadDotProductAttention`.

  The result keeps flax's parameter names (query, key, value, bias, mask, dropout_rng, ...), so
  flax passes it the mask and dropout arguments.

  Args:
    spec: an `AttentionSpec`, or a kind name: `make_attention_fn('topk', k=64)` builds
      `AttentionSpec(kind='topk', k=64)`. Anything else is a TypeError.
    **options: with a kind name only: the spec fields that kind takes (they go into the spec)
      and `CALL_OPTIONS` (bound as given).

  Returns:
    `fn(query, key, value, bias=None, mask=None, ...) -> [batch..., q_len, heads, d_v]`.
  """
  if isinstance(spec, str):
    _check_kind(spec, ATTENTION_FNS, 'attention')
    fields = ATTENTION_FNS[spec].fields
    unknown = sorted(set(options) - set(fields) - set(CALL_OPTIONS))
    if unknown:
      raise ValueError(f'Unknown options {unknown} for attention kind {spec!r}; valid options: '
                       f'{sorted((*fields, *CALL_OPTIONS))}.')
    spec = AttentionSpec(spec, **{name: options.pop(name) for name in fields if name in options})
  elif not isinstance(spec, AttentionSpec):
    raise TypeError(f'make_attention_fn takes an AttentionSpec or a kind name '
                    f'{sorted(ATTENTION_FNS)}, got {spec!r} ({type(spec).__name__}); for a dict '
                    'of fields, pass AttentionSpec(**fields).')
  elif options:
    raise TypeError(f'make_attention_fn takes options {sorted(options)} only with a kind name; '
                    'set them in the AttentionSpec.')
  return functools.partial(ATTENTION_FNS[spec.kind].fn, **spec.options(), **options)


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
  kind = FEED_FORWARDS[spec.kind]
  return kind.module(**attributes, **{name: getattr(spec, name) for name in kind.fields})
