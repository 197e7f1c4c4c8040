"""Warmup-stable-decay (WSD) learning-rate schedule from optax schedules.

    lr(t) = peak * t / warmup                      0 <= t < warmup        (linear warmup)
          = peak                                   warmup <= t < D        (stable)
          = peak * (f + (1 - f) * shape(u))        D <= t <= steps,  u = (t - D) / (steps - D)

with D = steps - round(decay_fraction * steps), f = final_lr_fraction and
shape(u) = 1 - u (linear), 1 - sqrt(u) (1-sqrt, Hagele et al. 2024) or (1 + cos(pi u)) / 2.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from train.config import ScheduleConfig


def wsd(peak: float, steps: int, cfg: ScheduleConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, steps)
  decay = int(round(cfg.decay_fraction * steps))
  decay = min(decay, steps - warmup)
  stable = steps - warmup - decay
  f = cfg.final_lr_fraction

  def decay_fn(t):
    u = jnp.clip(t / max(decay, 1), 0.0, 1.0)
    if cfg.decay_shape == "linear":
      s = 1.0 - u
    elif cfg.decay_shape == "1-sqrt":
      s = 1.0 - jnp.sqrt(u)
    else:
      s = 0.5 * (1.0 + jnp.cos(jnp.pi * u))
    return peak * (f + (1.0 - f) * s)

  parts, bounds = [], []
  if warmup > 0:
    parts.append(optax.linear_schedule(0.0, peak, warmup))
    bounds.append(warmup)
  parts.append(optax.constant_schedule(peak))
  if decay > 0:
    bounds.append(warmup + stable)
    parts.append(decay_fn)
  return optax.join_schedules(parts, bounds) if bounds else parts[0]
