"""Projectors from vision features to LLM embeddings."""

from __future__ import annotations

import jax
from flax import nnx

from moe_vlm.models.config import VLMConfig
from moe_vlm.models.layers import Dense, activation
from moe_vlm.models.perceiver import PerceiverConnector

Array = jax.Array


class Projector(nnx.Module):
  """`linear` or LLaVA-1.5's `mlp2x_gelu`: Linear -> GELU(erf) -> Linear."""

  def __init__(self, kind: str, vision_dim: int, text_dim: int, *, rngs: nnx.Rngs,
               dtype: str = "float32", param_dtype: str = "float32"):
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.kind = kind
    if kind == "linear":
      self.linear_1 = Dense(vision_dim, text_dim, axes=("vision_embed", "embed"), **kw)
    elif kind == "mlp2x_gelu":
      self.linear_1 = Dense(vision_dim, text_dim, axes=("vision_embed", "embed"), **kw)
      self.linear_2 = Dense(text_dim, text_dim, axes=("embed", "embed_out"), **kw)
      self.act = activation("gelu")
    else:
      raise ValueError(f"projector={kind!r}: expected 'linear' or 'mlp2x_gelu'")

  def __call__(self, x: Array) -> Array:
    if self.kind == "linear":
      return self.linear_1(x)
    return self.linear_2(self.act(self.linear_1(x)))


def make_projector(cfg: VLMConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The projector `cfg.projector` names: LLaVA's MLP/linear or IDEFICS2's perceiver."""
  kw = dict(rngs=rngs, dtype=cfg.text.dtype, param_dtype=cfg.text.param_dtype)
  if cfg.projector == "perceiver":
    return PerceiverConnector(cfg.perceiver, cfg.vision.hidden_size, cfg.text.hidden_size,
                              cfg.text.intermediate_size, **kw)
  return Projector(cfg.projector, cfg.vision.hidden_size, cfg.text.hidden_size, **kw)
