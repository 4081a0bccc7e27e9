"""Dense projections over flattened tokens; RoPE tables from constants."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.models.layers import Dense, rope_tables, token_matmul

CONTRACTING = re.compile(r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\]")


@pytest.mark.parametrize("shape", [(6,), (5, 6), (2, 5, 6), (2, 3, 5, 6)])
def test_token_matmul_matches_numpy(shape):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape)
  w = rng.standard_normal((6, 4))
  got = np.asarray(token_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)))
  want = np.tensordot(x, w, axes=([-1], [0]))
  assert got.shape == shape[:-1] + (4,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_gradients_contract_a_single_flattened_token_axis():
  # Why it matters: with [B, L, in] operands the weight gradient contracts two axes, and
  # XLA:CPU lowered that through transposing copies of the activation gradients (they
  # cost ~4% of the benchmark train step). Every dot of forward and backward must be 2-D
  # with one contracting axis.
  dense = Dense(6, 4, axes=("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 5, 6))

  def loss(model, x):
    return jnp.sum(model(x) ** 2)

  text = jax.jit(nnx.grad(loss, argnums=(0, 1))).lower(dense, x).as_text()
  dims = CONTRACTING.findall(text)
  assert len(dims) == 3, text  # forward, input gradient, weight gradient
  for lhs, rhs in dims:
    assert len(lhs.split(",")) == 1 and len(rhs.split(",")) == 1, text
  (g_model, g_x) = jax.jit(nnx.grad(loss, argnums=(0, 1)))(dense, x)
  # Against the closed form: d/dW sum((xW+b)^2) = 2 x^T (xW+b), summed over tokens.
  xf = np.asarray(x).reshape(-1, 6)
  y = xf @ np.asarray(dense.kernel[...]) + np.asarray(dense.bias[...])
  np.testing.assert_allclose(np.asarray(g_model.kernel[...]), 2 * xf.T @ y, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_x).reshape(-1, 6),
                             2 * y @ np.asarray(dense.kernel[...]).T, rtol=1e-5)


def test_rope_tables_gathered_from_constants_match_the_computed_ones():
  # Left-padded rows: positions from the mask, bounded by its width (as DecoderLM does).
  from moe_vlm.models.llm import positions_from_mask
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [0] * 7 + [1]], jnp.int32)
  positions = positions_from_mask(mask)
  for rotary_dim, theta in ((16, 10000.0), (8, 1e6)):
    cos, sin = rope_tables(positions, rotary_dim, theta)
    cos_t, sin_t = rope_tables(positions, rotary_dim, theta, num_positions=mask.shape[1])
    assert cos_t.shape == cos.shape == (3, 8, rotary_dim)
    np.testing.assert_allclose(np.asarray(cos_t), np.asarray(cos), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin_t), np.asarray(sin), atol=2e-6)
    # And HF's definition in float64: angle = position * theta^(-2i/d), halves repeated.
    inv = theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
    ang = np.asarray(positions, np.float64)[..., None] * inv
    np.testing.assert_allclose(np.asarray(cos_t), np.cos(np.concatenate([ang, ang], -1)),
                               atol=1e-5)


def test_rope_tables_past_the_constant_bound_are_computed(monkeypatch):
  from moe_vlm.models import layers
  positions = jnp.arange(8)[None, :]
  monkeypatch.setattr(layers, "ROPE_TABLE_MAX_ELEMENTS", 8 * 16 - 1)
  text = jax.jit(lambda p: layers.rope_tables(p, 16, 1e4, num_positions=8)).lower(
      positions).as_text()
  assert "cosine" in text  # too big for a constant: computed on the device
  monkeypatch.setattr(layers, "ROPE_TABLE_MAX_ELEMENTS", 8 * 16)
  text = jax.jit(lambda p: layers.rope_tables(p, 16, 1e4, num_positions=8)).lower(
      positions).as_text()
  assert "cosine" not in text and "gather" in text
