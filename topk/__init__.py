"""Memory-efficient top-k attention (Gupta et al., 2021) for JAX/Flax."""
from topk.chunked import chunked_attention
from topk.dense import dot_product_attention
from topk.feedforward import FEED_FORWARDS, DenseFeedForward, TopKFeedForward
from topk.fused import FusedOptions
from topk.spec import (
    ATTENTION_FNS,
    AttentionSpec,
    FeedForwardSpec,
    make_attention_fn,
    make_feed_forward,
)
from topk.topk_attention import topk_attention

__all__ = [
    'ATTENTION_FNS',
    'FEED_FORWARDS',
    'AttentionSpec',
    'DenseFeedForward',
    'FeedForwardSpec',
    'FusedOptions',
    'TopKFeedForward',
    'chunked_attention',
    'dot_product_attention',
    'make_attention_fn',
    'make_feed_forward',
    'topk_attention',
]
