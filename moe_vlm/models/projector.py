"""Projectors from vision features to LLM embeddings."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_vlm.models.adapters import HyperExpert
from moe_vlm.models.config import HyperExpertConfig, VLMConfig
from moe_vlm.models.layers import Dense, activation
from moe_vlm.models.perceiver import PerceiverConnector
from moe_vlm.models.qwen2_vl import PatchMerger

Array = jax.Array


class Projector(nnx.Module):
  """`linear` or LLaVA-1.5's `mlp2x_gelu`: Linear -> GELU(erf) -> Linear.

  With HyperLLaVA's visual expert E_V (a `HyperExpert` guided by the image's mean
  feature): L2(GELU(L1(f) + E_V(f))), the paper's V = L2(L1(f_V) + E_V(f_V)) with
  mlp2x_gelu's activation kept where it is. E_V starts at zero, so the static projector
  is the starting point.
  """

  def __init__(self, kind: str, vision_dim: int, text_dim: int, *, rngs: nnx.Rngs,
               dtype: str = "float32", param_dtype: str = "float32",
               visual_expert: Optional[HyperExpertConfig] = None):
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.kind = kind
    self.visual_expert = (None if visual_expert is None else HyperExpert(
        visual_expert, vision_dim, vision_dim, text_dim, axes=("vision_embed", "embed"),
        rngs=rngs, dtype=dtype, param_dtype=param_dtype))
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
    h = self.linear_1(x)
    if self.visual_expert is not None:
      h = h + self.visual_expert(x, jnp.mean(x.astype(jnp.float32), axis=1)).astype(h.dtype)
    return self.linear_2(self.act(h))


def make_projector(cfg: VLMConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The projector `cfg.projector` names: LLaVA's MLP/linear, IDEFICS2's perceiver or
  Qwen2-VL's patch merger."""
  kw = dict(rngs=rngs, dtype=cfg.text.dtype, param_dtype=cfg.text.param_dtype)
  if cfg.projector == "qwen2_vl_merger":
    return PatchMerger(cfg.vision, cfg.text.hidden_size, **kw)
  if cfg.projector == "perceiver":
    return PerceiverConnector(cfg.perceiver, cfg.vision.hidden_size, cfg.text.hidden_size,
                              cfg.text.intermediate_size, **kw)
  return Projector(cfg.projector, cfg.vision.hidden_size, cfg.text.hidden_size,
                   visual_expert=cfg.visual_expert, **kw)
