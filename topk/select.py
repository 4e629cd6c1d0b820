"""Top-k selection along the last axis: the one place `topk_attention` selects keys.

Contract of `jax.lax.top_k`: values in descending order, int32 indices, ties broken by the
lower index first.
"""
import jax


def top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Returns the `k` largest entries of `scores [..., n]` and their indices, `[..., k]` each."""
  return jax.lax.top_k(scores, k)
