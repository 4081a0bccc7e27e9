"""Optimizer and learning-rate schedule (MoE-LLaVA: AdamW, 3% warmup, cosine to zero)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 2e-5
  warmup_ratio: float = 0.03
  total_steps: int = 1000
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0

  @property
  def warmup_steps(self) -> int:
    return max(1, math.ceil(self.total_steps * self.warmup_ratio)) if self.warmup_ratio else 0


def schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to zero at `total_steps` (HF 'cosine')."""
  warm = cfg.warmup_steps
  decay = max(cfg.total_steps - warm, 1)

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = cfg.learning_rate * step / max(warm, 1)
    progress = jnp.clip((step - warm) / decay, 0.0, 1.0)
    cosine = cfg.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warm, warmup, cosine)

  return lr


def _decay_mask(params):
  # No weight decay on biases, norms and 1-D parameters (HF Trainer's convention).
  return {k: v.ndim > 1 and not k.endswith(("bias", "scale")) for k, v in params.items()}


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW; built for the trainable parameters only."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
      optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask),
  )
