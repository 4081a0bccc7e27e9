"""IDEFICS2's connector: SwiGLU modality projection + perceiver resampler.

Vision features [B, P, Dv] are projected to the text width D, then `n_latents` learned
latents attend, in each of `depth` layers, to concat(context, latents) - the patches and
themselves - with grouped-query attention, RMSNorms and a SwiGLU MLP; a final RMSNorm
gives [B, n_latents, D] image tokens. Same computation and parameter set as
transformers' `Idefics2Connector` (import: `moe_vlm.convert.idefics2`).

Masking: an optional `mask` [B, P] (True = real patch) hides padded patches from the
keys, as IDEFICS2's `attention_mask`; the latents are always visible, so every row of
the attention has a valid key. The VLM feeds a fixed-size image grid and passes none.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_vlm.models.config import PerceiverConfig
from moe_vlm.models.layers import MLP, Dense, Norm, activation, dot_product_attention, param

Array = jax.Array


class GatedProjection(nnx.Module):
  """down(act(gate(x)) * up(x)) without bias, from `in_features` to `out_features`
  (IDEFICS2's `Idefics2MLP`; `layers.MLP` keeps the width, this one changes it)."""

  def __init__(self, in_features: int, intermediate: int, out_features: int, *,
               activation_name: str, rngs: nnx.Rngs, dtype: str = "float32",
               param_dtype: str = "float32"):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.act = activation(activation_name)
    self.wi_gate = Dense(in_features, intermediate, axes=("vision_embed", "mlp"), **kw)
    self.wi_up = Dense(in_features, intermediate, axes=("vision_embed", "mlp"), **kw)
    self.wo = Dense(intermediate, out_features, axes=("mlp", "embed"), **kw)

  def __call__(self, x: Array) -> Array:
    return self.wo(self.act(self.wi_gate(x)) * self.wi_up(x))


class PerceiverAttention(nnx.Module):
  """Queries from the latents; keys and values from concat(context, latents)."""

  def __init__(self, hidden: int, cfg: PerceiverConfig, *, rngs: nnx.Rngs,
               dtype: str = "float32", param_dtype: str = "float32"):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                        cfg.head_dim)
    self.query = Dense(hidden, cfg.num_heads * cfg.head_dim, axes=("embed", "heads"), **kw)
    self.key = Dense(hidden, cfg.num_kv_heads * cfg.head_dim, axes=("embed", "kv_heads"), **kw)
    self.value = Dense(hidden, cfg.num_kv_heads * cfg.head_dim, axes=("embed", "kv_heads"),
                       **kw)
    self.out = Dense(cfg.num_heads * cfg.head_dim, hidden, axes=("heads", "embed"), **kw)

  def __call__(self, latents: Array, context: Array, mask: Optional[Array]) -> Array:
    """latents [B, N, D], context [B, P, D], mask [B, N, P + N] bool or None."""
    b, n, _ = latents.shape
    kv_in = jnp.concatenate([context, latents], axis=1)
    s = kv_in.shape[1]
    q = self.query(latents).reshape(b, n, self.num_heads, self.head_dim)
    k = self.key(kv_in).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.value(kv_in).reshape(b, s, self.num_kv_heads, self.head_dim)
    out = dot_product_attention(q, k, v, mask)
    return self.out(out.reshape(b, n, self.num_heads * self.head_dim))


class PerceiverLayer(nnx.Module):
  """Pre-norm cross-attention (latents and context normed separately) + SwiGLU MLP."""

  def __init__(self, hidden: int, cfg: PerceiverConfig, *, rngs: nnx.Rngs,
               dtype: str = "float32", param_dtype: str = "float32"):
    norm = lambda: Norm(hidden, kind="rms", eps=cfg.norm_eps, rngs=rngs,
                        param_dtype=param_dtype)
    self.latents_norm = norm()
    self.context_norm = norm()
    self.attn = PerceiverAttention(hidden, cfg, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype)
    self.post_attn_norm = norm()
    self.mlp = MLP(hidden, 4 * hidden, kind="gated", activation_name=cfg.activation,
                   use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, latents: Array, context: Array, mask: Optional[Array]) -> Array:
    latents = latents + self.attn(self.latents_norm(latents), self.context_norm(context),
                                  mask)
    return latents + self.mlp(self.post_attn_norm(latents))


class PerceiverConnector(nnx.Module):
  """Vision features [B, P, Dv] -> [B, n_latents, D_text] (transformers' Idefics2Connector)."""

  def __init__(self, cfg: PerceiverConfig, vision_dim: int, text_dim: int,
               text_intermediate: int, *, rngs: nnx.Rngs, dtype: str = "float32",
               param_dtype: str = "float32"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dtype = jnp.dtype(dtype)
    self.modality_projection = GatedProjection(
        vision_dim, cfg.intermediate_size or text_intermediate, text_dim,
        activation_name=cfg.activation, **kw)
    # HF initialises the latents to ones; from scratch, unit-variance noise gives the
    # latents distinct queries from the first step (same RMS, so the same scale).
    self.latents = param(rngs, nnx.initializers.normal(1.0), (cfg.n_latents, text_dim),
                         ("latents", "embed"), param_dtype)
    self.layers = nnx.List([PerceiverLayer(text_dim, cfg, **kw) for _ in range(cfg.depth)])
    self.final_norm = Norm(text_dim, kind="rms", eps=cfg.norm_eps, rngs=rngs,
                           param_dtype=param_dtype)

  def __call__(self, features: Array, mask: Optional[Array] = None) -> Array:
    """features [B, P, Dv]; mask [B, P] (True/1 = real patch) or None (all real)."""
    context = self.modality_projection(features)
    b = context.shape[0]
    n = self.latents.shape[0]
    latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (b,) + self.latents.shape)
    full = None
    if mask is not None:
      full = jnp.concatenate([mask.astype(bool), jnp.ones((b, n), bool)], axis=1)
      full = jnp.broadcast_to(full[:, None, :], (b, n, full.shape[1]))
    for layer in self.layers:
      latents = layer(latents, context, full)
    return self.final_norm(latents)
