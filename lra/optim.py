"""Learning-rate schedules and the optimizer of the LRA training loop.

The original trains with bias-corrected Adam(b1=0.9, b2=0.98, eps=1e-9) followed by a decoupled,
learning-rate-scaled weight decay on every parameter: p <- p - lr * (adam_update + wd * p). That is
exactly `optax.adamw` without a mask. Its learning rate is the product of named factors; the three
products LRA uses (or that we need for new runs) are registered in `SCHEDULES`.
"""

from collections.abc import Callable

import jax.numpy as jnp
import optax


def _linear_warmup(step: jnp.ndarray, warmup_steps: int) -> jnp.ndarray:
  # LRA's factor min(1, step / warmup): the very first update uses learning rate 0.
  if warmup_steps <= 0:
    return jnp.ones_like(step)
  return jnp.minimum(1.0, step / warmup_steps)


def _rsqrt(base: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  del total_steps  # The rsqrt decay never ends.

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    decay = 1.0 / jnp.sqrt(jnp.maximum(step, max(warmup_steps, 1)))
    return base * _linear_warmup(step, warmup_steps) * decay

  return schedule


def _cosine(base: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  # LRA sets steps_per_cycle to the total number of steps and starts the cycle after warmup, so the
  # rate ends slightly above zero; we keep that.
  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    progress = jnp.maximum(0.0, (step - warmup_steps) / max(total_steps, 1))
    cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
    return base * _linear_warmup(step, warmup_steps) * cosine

  return schedule


def _constant(base: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  del total_steps

  def schedule(count):
    return base * _linear_warmup(jnp.asarray(count, jnp.float32), warmup_steps)

  return schedule


SCHEDULES: dict[str, Callable[[float, int, int], optax.Schedule]] = {
    'rsqrt': _rsqrt,
    'cosine': _cosine,
    'constant': _constant,
}


def make_schedule(name: str, base: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Returns the learning rate as a function of the number of updates already applied.

  Args:
    name: 'rsqrt' (base * linear warmup * 1/sqrt(max(step, warmup)), so the peak is
      base / sqrt(warmup)), 'cosine' (base * linear warmup * cosine decay over `total_steps`) or
      'constant' (base * linear warmup).
    base: the constant factor (config.learning_rate).
    warmup_steps: steps of linear warmup from 0; 0 disables warmup.
    total_steps: length of the run, used by 'cosine'.
  """
  if name not in SCHEDULES:
    raise ValueError(f'schedule must be one of {sorted(SCHEDULES)}, got {name!r}')
  if not base > 0:
    raise ValueError(f'learning_rate (base) must be > 0, got {base}')
  if not warmup_steps >= 0:
    raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}')
  return SCHEDULES[name](base, warmup_steps, total_steps)


def make_optimizer(
    schedule: optax.Schedule, *, weight_decay: float, grad_clip_norm: float
) -> optax.GradientTransformation:
  """LRA's Adam with decoupled weight decay, optionally after global-norm gradient clipping.

  Args:
    schedule: learning rate per update count.
    weight_decay: decoupled decay, multiplied by the learning rate, applied to all parameters.
    grad_clip_norm: clip gradients to this global norm; 0 disables clipping.
  """
  if not grad_clip_norm >= 0:
    raise ValueError(f'grad_clip_norm must be >= 0, got {grad_clip_norm}')
  if not weight_decay >= 0:
    raise ValueError(f'weight_decay must be >= 0, got {weight_decay}')
  adam = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=weight_decay)
  if grad_clip_norm == 0:
    return adam
  return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adam)
