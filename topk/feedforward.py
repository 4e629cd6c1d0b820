"""Feed-forward layers: the dense MLP and its top-k form (Gupta et al., 2021), by name in
`FEED_FORWARDS`.

The top-k layer reads the MLP as attention over its hidden units: each token is a query, the
first layer's weight columns are the keys and the second layer's rows are the values; the
activation (no normalisation) plays the kernel. Per token only the k largest pre-activations are
kept, then activated, and only their value rows are mixed. Tokens are processed in chunks,
checkpointed, so memory is `chunk x mlp_dim` rather than `tokens x mlp_dim`. Both layers' parameters
are named and shaped as two `nn.Dense` layers ('Dense_0', 'Dense_1', with biases), so dense MLP
weights load unchanged; with k >= mlp_dim the top-k layer is the dense one.
"""
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from topk import inputs, select


class _DenseParams(nn.Module):
  """Holds an `nn.Dense`-compatible kernel `[in, features]` and bias `[features]`."""
  features: int
  kernel_init: Callable[..., jax.Array]
  bias_init: Callable[..., jax.Array]

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', self.kernel_init, (in_features, self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    return kernel, bias


def _check_sizes(module: nn.Module) -> None:
  """Raises ValueError unless the feed-forward `module`'s mlp_dim is an int >= 1 and its
  dropout_rate in [0, 1) (an empty hidden layer or rate 1 would train silently on nothing)."""
  inputs.check_positive_int(module.mlp_dim, 'mlp_dim')
  if not 0.0 <= module.dropout_rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {module.dropout_rate}.')


class DenseFeedForward(nn.Module):
  """Dense(mlp_dim) -> activation -> dropout -> Dense(out_dim) -> dropout: LRA's MlpBlock.

  The reference `TopKFeedForward` equals with k >= mlp_dim; its submodules are `Dense_0` and
  `Dense_1`, the tree of `TopKFeedForward`.

  Attributes:
    mlp_dim: hidden units.
    out_dim: output features (default: input features).
    dropout_rate: dropout after the activation and after the output layer.
    activation: elementwise activation of the hidden units.
    dtype: computation dtype (default: the input's); parameters are float32.
    kernel_init: initialiser of both kernels.
    bias_init: initialiser of both biases.
  """
  mlp_dim: int
  out_dim: int | None = None
  dropout_rate: float = 0.0
  activation: Callable[[jax.Array], jax.Array] = nn.gelu
  dtype: Any = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.xavier_uniform()
  bias_init: Callable[..., jax.Array] = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """Maps `x [..., d]` to `[..., out_dim]`."""
    _check_sizes(self)
    x = inputs.real_array(x, 'x', 'a real or integer array')
    dense = functools.partial(nn.Dense, dtype=inputs.computation_dtype(self.dtype, x),
                              kernel_init=self.kernel_init, bias_init=self.bias_init)
    h = self.activation(dense(self.mlp_dim)(x))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    out = dense(x.shape[-1] if self.out_dim is None else self.out_dim)(h)
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class TopKFeedForward(nn.Module):
  """Dense(mlp_dim) -> top-k -> activation -> dropout -> Dense(out_dim) -> dropout.

  Defaults follow LRA's MlpBlock (GELU, xavier-uniform kernels, N(0, 1e-6) biases), so with
  k >= mlp_dim it is that block. The paper's FF layers use ReLU (`activation=nn.relu`).
  Hidden-unit dropout is drawn per token chunk from the 'dropout' rng folded with the chunk index.

  Attributes:
    mlp_dim: hidden units.
    k: hidden units kept per token (int >= 1).
    out_dim: output features (default: input features).
    query_chunk_size: tokens per chunk.
    dropout_rate: dropout after the activation and after the output layer.
    activation: elementwise activation applied to the kept pre-activations.
    dtype: computation dtype, real floating point (default: the input's, integer promoted to
      float32); parameters are float32. Complex input is refused.
    kernel_init: initialiser of both kernels.
    bias_init: initialiser of both biases.
  """
  mlp_dim: int
  k: int
  out_dim: int | None = None
  query_chunk_size: int = 1024
  dropout_rate: float = 0.0
  activation: Callable[[jax.Array], jax.Array] = nn.gelu
  dtype: Any = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.xavier_uniform()
  bias_init: Callable[..., jax.Array] = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """Maps `x [..., d]` to `[..., out_dim]`."""
    k = inputs.check_positive_int(self.k, 'k')
    chunk = inputs.check_positive_int(self.query_chunk_size, 'query_chunk_size')
    _check_sizes(self)
    x = inputs.real_array(x, 'x', 'a real or integer array')
    dtype = inputs.computation_dtype(self.dtype, x)
    out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
    w_in, b_in = _DenseParams(self.mlp_dim, self.kernel_init, self.bias_init,
                              name='Dense_0')(x.shape[-1])
    w_out, b_out = _DenseParams(out_dim, self.kernel_init, self.bias_init,
                                name='Dense_1')(self.mlp_dim)
    w_in, b_in, w_out = w_in.astype(dtype), b_in.astype(dtype), w_out.astype(dtype)
    values = w_out  # [mlp_dim, out_dim]: one value row per hidden unit
    kk = min(k, self.mlp_dim)
    dropping = not deterministic and self.dropout_rate > 0.0
    rng = self.make_rng('dropout') if dropping else None

    tokens = x.reshape(-1, x.shape[-1]).astype(dtype)
    chunk = min(chunk, max(tokens.shape[0], 1))
    pad = -tokens.shape[0] % chunk
    chunks = jnp.pad(tokens, ((0, pad), (0, 0))).reshape(-1, chunk, tokens.shape[-1])

    @jax.checkpoint
    def one_chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
      i, x_chunk = args  # x_chunk [C, d]
      pre = x_chunk @ w_in + b_in[None]  # [C, mlp_dim]
      # [C, k] each; k was checked above.
      kept, idx = select.unchecked_top_k(pre, kk, 'exact', recall_target=1.0, method=None)
      hidden = self.activation(kept)
      if dropping:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - self.dropout_rate,
                                    hidden.shape)
        hidden = jnp.where(keep, hidden / (1.0 - self.dropout_rate), 0.0).astype(dtype)
      return jnp.einsum('ck,ckd->cd', hidden, values[idx])  # gather of the kept value rows

    out = jax.lax.map(one_chunk, (jnp.arange(chunks.shape[0]), chunks))
    out = out.reshape(-1, out_dim)[:tokens.shape[0]] + b_out.astype(dtype)[None]
    out = out.reshape(x.shape[:-1] + (out_dim,))
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class FeedForward(NamedTuple):
  """A feed-forward kind: its module and the `topk.FeedForwardSpec` fields it takes (as module
  attributes)."""
  module: type[nn.Module]
  fields: tuple[str, ...]


FEED_FORWARDS: dict[str, FeedForward] = {
    'dense': FeedForward(DenseFeedForward, ()),
    'topk': FeedForward(TopKFeedForward, ('k', 'query_chunk_size')),
}
