"""ViT vision tower: CLIP and SigLIP variants.

Images are NHWC (TPU-friendly). The tower returns every hidden state (embeddings
output, then each layer's output, as HF's `output_hidden_states`) so LLaVA's
`vision_feature_layer=-2` selects the penultimate layer; `features()` stops after the
layer it needs, so the unused last layer costs nothing.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_vlm.models.config import VisionConfig
from moe_vlm.models.layers import MLP, Attention, Norm, default_kernel_init, param

Array = jax.Array


class VisionBlock(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d = cfg.hidden_size
    self.norm1 = Norm(d, kind="layer", eps=cfg.norm_eps, rngs=rngs, param_dtype=cfg.param_dtype)
    self.attn = Attention(d, cfg.num_heads, cfg.num_heads, d // cfg.num_heads,
                          qkv_bias=True, o_bias=True, **kw)
    self.norm2 = Norm(d, kind="layer", eps=cfg.norm_eps, rngs=rngs, param_dtype=cfg.param_dtype)
    self.mlp = MLP(d, cfg.intermediate_size, kind="plain", activation_name=cfg.activation,
                   use_bias=True, **kw)

  def __call__(self, x: Array) -> Array:
    x = x + self.attn(self.norm1(x), mask=None)
    return x + self.mlp(self.norm2(x))


class VisionEncoder(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    self.patch_kernel = param(rngs, default_kernel_init, (p, p, cfg.num_channels, d),
                              (None, None, None, "embed"), cfg.param_dtype)
    self.patch_bias = (param(rngs, nnx.initializers.zeros, (d,), ("embed",), cfg.param_dtype)
                       if cfg.patch_bias else None)
    self.class_embedding = (param(rngs, default_kernel_init, (d,), ("embed",), cfg.param_dtype)
                            if cfg.class_token else None)
    self.pos_embedding = param(rngs, default_kernel_init, (cfg.num_positions, d),
                               (None, "embed"), cfg.param_dtype)
    self.pre_norm = (Norm(d, kind="layer", eps=cfg.norm_eps, rngs=rngs,
                          param_dtype=cfg.param_dtype) if cfg.pre_norm else None)
    self.layers = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    # Unused by LLaVA (it reads a pre-norm hidden state); kept so HF weights round-trip.
    self.post_norm = Norm(d, kind="layer", eps=cfg.norm_eps, rngs=rngs,
                          param_dtype=cfg.param_dtype)

  def embed(self, pixels: Array) -> Array:
    """pixels [B, H, W, C] (already normalised) -> [B, N(+1), D] tokens."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(
          f"pixel_values shape {tuple(pixels.shape)}: expected [B, {cfg.image_size}, "
          f"{cfg.image_size}, {cfg.num_channels}] (NHWC)")
    x = jax.lax.conv_general_dilated(
        pixels.astype(dtype), self.patch_kernel[...].astype(dtype),
        window_strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.patch_bias is not None:
      x = x + self.patch_bias[...].astype(dtype)
    b = x.shape[0]
    x = x.reshape(b, -1, cfg.hidden_size)
    if self.class_embedding is not None:
      cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, cfg.hidden_size))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embedding[...].astype(dtype)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    return x

  def __call__(self, pixels: Array, num_layers: Optional[int] = None) -> list[Array]:
    """All hidden states [embeddings, layer 1, ..., layer n] (n = num_layers or all)."""
    n = self.cfg.num_layers if num_layers is None else num_layers
    hidden = [self.embed(pixels)]
    for block in self.layers[:n]:
      hidden.append(block(hidden[-1]))
    return hidden

  def features(self, pixels: Array, layer: int) -> Array:
    """Hidden state `layer` (python indexing over the n+1 states, e.g. -2)."""
    total = self.cfg.num_layers + 1
    index = layer % total
    return self(pixels, num_layers=index)[index]
