"""Memory-efficient top-k attention (Gupta et al., 2021) for JAX/Flax."""
from topk.chunked import chunked_attention
from topk.dense import dot_product_attention
from topk.feedforward import TopKFeedForward
from topk.registry import ATTENTION_FNS, make_attention_fn
from topk.topk_attention import topk_attention

__all__ = [
    'ATTENTION_FNS',
    'TopKFeedForward',
    'chunked_attention',
    'dot_product_attention',
    'make_attention_fn',
    'topk_attention',
]
