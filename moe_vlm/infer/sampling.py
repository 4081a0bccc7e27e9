"""Picking the next token from logits: greedy, temperature, nucleus (top-p).

Pure functions of (logits, key); the decode loop calls them once per step with a key
folded from the step number, so a fixed key gives the same tokens on every run.
Temperature and top_p may be traced values: changing them does not recompile.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def top_p_filter(logits: Array, top_p: float | Array) -> Array:
  """Keeps the most likely tokens whose cumulative probability first reaches `top_p`.

  The most likely token is always kept (so top_p -> 0 is greedy); the rest get -inf.
  logits [..., V] -> [..., V]. Ties with the least likely kept token are kept too.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  ranked = jnp.flip(jnp.sort(probs, axis=-1), axis=-1)
  mass_before = jnp.cumsum(ranked, axis=-1) - ranked  # of the strictly more likely tokens
  kept = (mass_before < top_p).at[..., 0].set(True)
  threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(probs >= threshold, logits, -jnp.inf)


def greedy_tokens(logits: Array) -> Array:
  """logits [B, V] -> the most likely ids [B] (int32)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_tokens(logits: Array, key: Array, temperature: float | Array,
                  top_p: Optional[float | Array] = None) -> Array:
  """logits [B, V] -> ids [B] (int32) drawn from softmax(logits / temperature),
  restricted to the top-p nucleus when top_p is given (HF's order: temperature first)."""
  logits = logits.astype(jnp.float32) / temperature
  if top_p is not None:
    logits = top_p_filter(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
