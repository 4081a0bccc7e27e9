"""Attention with causal query blocks, and the next-token loss, against numpy formulas.

`dot_product_attention(..., causal_blocks=n)` skips the keys a causal mask hides from
a whole block of queries. References: softmax(q k^T / sqrt(d)) v in float64 numpy
with GQA head groups, under the same mask; the unblocked path's autodiff gradients.
Rows whose mask is all False (left padding) are excluded: their output is an
unspecified average either way, and nothing downstream reads it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_vlm.models.config import ConfigError, TextConfig
from moe_vlm.models.layers import dot_product_attention
from moe_vlm.models.llm import causal_mask
from moe_vlm.train.step import token_loss

B, L, H, KV, D = 2, 11, 4, 2, 8  # L prime: blocks of unequal size


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, L, H, D)).astype(np.float32)
  k = rng.standard_normal((B, L, KV, D)).astype(np.float32)
  v = rng.standard_normal((B, L, KV, D)).astype(np.float32)
  attn = np.ones((B, L), np.int32)
  attn[0, :3] = 0   # left padding: 3 fully masked query rows
  attn[1, -2:] = 0  # right padding
  return q, k, v, attn


def _numpy_attention(q, k, v, mask):
  q, k, v = (x.astype(np.float64) for x in (q, k, v))
  g = H // KV
  out = np.zeros(q.shape)
  for h in range(H):
    s = np.einsum("bqd,bsd->bqs", q[:, :, h], k[:, :, h // g]) / np.sqrt(D)
    s = np.where(mask, s, -np.inf)
    with np.errstate(invalid="ignore"):  # fully masked rows become NaN; callers skip them
      p = np.exp(s - s.max(-1, keepdims=True))
      out[:, :, h] = np.einsum("bqs,bsd->bqd", p / p.sum(-1, keepdims=True),
                               v[:, :, h // g])
  return out


@pytest.mark.parametrize("blocks", [1, 3, 4, L])
def test_blocked_causal_attention_matches_numpy(blocks):
  q, k, v, attn = _inputs()
  mask = np.asarray(causal_mask(jnp.asarray(attn)))
  got = np.asarray(dot_product_attention(*(jnp.asarray(x) for x in (q, k, v)),
                                         jnp.asarray(mask), causal_blocks=blocks))
  valid = mask.any(-1)  # [B, L]: rows that may attend something
  assert valid.sum() == B * L - 3
  want = _numpy_attention(q, k, v, mask)
  np.testing.assert_allclose(got[valid], want[valid], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("blocks", [3, 4])
def test_blocked_causal_attention_gradients_equal_unblocked(blocks):
  q, k, v, attn = _inputs(1)
  mask = causal_mask(jnp.asarray(attn))
  w = jnp.asarray(np.random.default_rng(2).standard_normal((B, L, H, D)), jnp.float32)
  w = w * mask.any(-1)[..., None, None]  # the loss reads only rows that attend something

  def loss(q, k, v, n):
    return jnp.sum(dot_product_attention(q, k, v, mask, causal_blocks=n) * w)

  args = tuple(jnp.asarray(x) for x in (q, k, v))
  want = jax.grad(loss, argnums=(0, 1, 2))(*args, 1)
  got = jax.grad(loss, argnums=(0, 1, 2))(*args, blocks)
  for name, a, b in zip("qkv", got, want):
    assert float(jnp.max(jnp.abs(b))) > 1e-3, name  # a real gradient to compare
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5,
                               err_msg=f"d{name}")


def test_causal_blocks_need_self_attention_and_a_positive_count():
  q, k, v, _ = _inputs()
  with pytest.raises(ValueError, match="causal self-attention"):
    dot_product_attention(jnp.asarray(q[:, :5]), jnp.asarray(k), jnp.asarray(v), None,
                          causal_blocks=2)
  with pytest.raises(ConfigError, match="attention_causal_blocks"):
    TextConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
               num_layers=1, num_heads=2, num_kv_heads=2,
               attention_causal_blocks=0).validate()


def test_token_loss_matches_numpy_next_token_cross_entropy():
  rng = np.random.default_rng(3)
  b, l, vocab = 3, 7, 13
  logits = rng.standard_normal((b, l, vocab)).astype(np.float32) * 3
  ids = rng.integers(0, vocab, (b, l))
  loss_mask = (rng.random((b, l)) < 0.6).astype(np.int32)
  loss_mask[:, -1] = 1  # the last target counts; position l-1 predicts nothing
  total, count = token_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(loss_mask))
  x = logits.astype(np.float64)
  logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - x.max(-1, keepdims=True)
  want = sum(-logp[i, t - 1, ids[i, t]] for i in range(b) for t in range(1, l)
             if loss_mask[i, t])
  assert float(count) == loss_mask[:, 1:].sum()
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
