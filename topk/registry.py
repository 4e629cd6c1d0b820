"""`make_attention_fn`: attention functions by name, ready for flax's `attention_fn=`."""
import functools
import inspect
from collections.abc import Callable
from typing import Any

from topk import inputs, kernels
from topk.chunked import chunked_attention
from topk.dense import dot_product_attention
from topk.topk_attention import topk_attention

ATTENTION_FNS: dict[str, Callable[..., Any]] = {
    'vanilla': dot_product_attention,
    'chunked': chunked_attention,
    'topk': topk_attention,
}


def make_attention_fn(kind: str, **options: Any) -> Callable[..., Any]:
  """Returns attention `kind` with `options` bound, for `nn.MultiHeadDotProductAttention`.

  The result keeps flax's parameter names (query, key, value, bias, mask, dropout_rng, ...), so
  flax passes it the mask and dropout arguments.

  Args:
    kind: 'vanilla' | 'chunked' | 'topk'.
    **options: keyword-only options of that function, e.g. k=64, query_chunk_size=1024,
      is_causal, kernel. `k` is required for 'topk'.

  Returns:
    `fn(query, key, value, bias=None, mask=None, ...) -> [batch..., q_len, heads, d_v]`.
  """
  if kind not in ATTENTION_FNS:
    raise ValueError(f'Unknown attention kind {kind!r}; valid kinds: {sorted(ATTENTION_FNS)}.')
  fn = ATTENTION_FNS[kind]
  allowed = {name for name, p in inspect.signature(fn).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise ValueError(f'Unknown options {unknown} for attention kind {kind!r}; valid options: '
                     f'{sorted(allowed)}.')
  if kind == 'topk' and 'k' not in options:
    raise ValueError("Attention kind 'topk' needs the option k (keys kept per query).")
  for name in ('k', 'query_chunk_size'):
    if name in options:
      options[name] = inputs.check_positive_int(options[name], name)
  kernels.get_kernel(options.get('kernel', 'softmax'))
  return functools.partial(fn, **options)
