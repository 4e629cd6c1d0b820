"""Attention kernels: how (masked, scaled) scores become attention weights.

A kernel maps scores `[..., n]` to non-negative weights that sum to one over the last axis.
`softmax` is the usual exp kernel; the others are the less skewed kernels of Gupta & Berant
("Value-aware Approximate Attention"): kappa(s) >= 0, weights = kappa / sum(kappa).
Masked entries arrive as the dtype's most negative finite value (flax's convention), which
every kernel maps to zero weight; a fully masked row gets uniform weights under softmax (as in
flax) and all-zero weights under the others (their kappa is zero everywhere).

The non-softmax kernels normalise after dividing by the row's largest kappa (a constant for the
gradient), so a row of tiny total mass, e.g. one causal key far below zero, has finite weights
and gradients: `kappa / sum(kappa)` differentiates into `kappa / sum(kappa)^2`, which underflows
to 0/0 = NaN in float32 for sums below about 1e-19.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _normalise(kappa: jax.Array) -> jax.Array:
  """`kappa / sum(kappa)` over the last axis; a row whose kappa is all zero gets zeros."""
  peak = jax.lax.stop_gradient(jnp.max(kappa, axis=-1, keepdims=True))
  scaled = kappa / jnp.where(peak > 0, peak, 1.0)  # in [0, 1]; a non-zero row sums to >= 1
  total = jnp.sum(scaled, axis=-1, keepdims=True)
  return scaled / jnp.where(total > 0, total, 1.0)


KERNELS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'softmax': lambda s: jax.nn.softmax(s, axis=-1),
    'relu': lambda s: _normalise(jax.nn.relu(s)),
    'relu2': lambda s: _normalise(jnp.square(jax.nn.relu(s))),
    # elu(s) + 1, written as exp(s) below zero: elu(s) + 1 rounds to 0 below s = -17.
    'elu1': lambda s: _normalise(jnp.where(s > 0, s + 1.0, jnp.exp(jnp.minimum(s, 0.0)))),
}


def get_kernel(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the kernel `scores [..., n] -> weights [..., n]` called `name`."""
  if name not in KERNELS:
    raise ValueError(f'Unknown attention kernel {name!r}; valid kernels: {sorted(KERNELS)}.')
  return KERNELS[name]
