"""Attention kernels: how (masked, scaled) scores become attention weights.

A kernel maps scores `[..., n]` to non-negative weights that sum to one over the last axis.
`softmax` is the usual exp kernel; the others are the less skewed kernels of Gupta & Berant
("Value-aware Approximate Attention"): kappa(s) >= 0, weights = kappa / sum(kappa).
Masked entries arrive as the dtype's most negative finite value (flax's convention), which
every kernel maps to zero weight; a fully masked row gets uniform weights under softmax (as in
flax) and all-zero weights under the others (their kappa is zero everywhere).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Smallest normaliser for non-softmax kernels: a row whose kappa is all zero outputs zeros.
_TINY = 1e-30


def _normalise(kappa: jax.Array) -> jax.Array:
  total = jnp.sum(kappa, axis=-1, keepdims=True)
  return kappa / jnp.maximum(total, _TINY)


KERNELS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'softmax': lambda s: jax.nn.softmax(s, axis=-1),
    'relu': lambda s: _normalise(jax.nn.relu(s)),
    'relu2': lambda s: _normalise(jnp.square(jax.nn.relu(s))),
    'elu1': lambda s: _normalise(jax.nn.elu(s) + 1.0),
}


def get_kernel(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the kernel `scores [..., n] -> weights [..., n]` called `name`."""
  if name not in KERNELS:
    raise ValueError(f'Unknown attention kernel {name!r}; valid kernels: {sorted(KERNELS)}.')
  return KERNELS[name]
