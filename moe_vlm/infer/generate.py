"""Batched greedy decoding for short answers.

Prompts are left-padded into one [B, P + T] buffer so every shape is static and the
whole loop is one jit-compiled program; each step re-runs the model over the buffer
(no KV cache), which is cheap for the few-token answers of VQA/POPE-style evaluation.
MoE layers route dropless at inference.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def left_pad(prompts: Sequence[np.ndarray], pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-aligns each prompt in a [B, length] array; returns ids and attention mask."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt {row} has {len(p)} tokens, more than the buffer ({length})")
    ids[row, length - len(p):] = p
    mask[row, length - len(p):] = 1
  return ids, mask


@nnx.jit(static_argnames=("max_new_tokens", "eos_id"))
def _greedy(model, ids, mask, pixels, *, max_new_tokens: int, eos_id: int):
  b, p = ids.shape
  ids = jnp.concatenate([ids, jnp.zeros((b, max_new_tokens), ids.dtype)], axis=1)
  mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)
  done = jnp.zeros((b,), bool)

  def body(t, carry):
    ids, mask, done = carry
    logits, _ = model(ids, pixels, mask, dispatch="dropless")
    nxt = jnp.argmax(logits[:, p + t - 1], axis=-1).astype(ids.dtype)
    nxt = jnp.where(done, eos_id, nxt)
    ids = ids.at[:, p + t].set(nxt)
    mask = mask.at[:, p + t].set(jnp.where(done, 0, 1))
    return ids, mask, done | (nxt == eos_id)

  ids, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (ids, mask, done))
  return ids[:, p:]


def greedy_generate(model, prompts: Sequence[np.ndarray], pixels: np.ndarray, *, pad_id: int,
                    eos_id: int, max_new_tokens: int, prompt_length: int) -> list[list[int]]:
  """New tokens per prompt (up to, excluding, eos). `pixels` [B, H, W, 3] row-aligned."""
  ids, mask = left_pad(prompts, pad_id, prompt_length)
  out = np.asarray(_greedy(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                           max_new_tokens=max_new_tokens, eos_id=eos_id))
  result = []
  for row in out:
    toks = list(row)
    result.append(toks[:toks.index(eos_id)] if eos_id in toks else toks)
  return result
