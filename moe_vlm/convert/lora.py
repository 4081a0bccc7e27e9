"""Folding Awaker-style LoRA experts into dense weights, where routing allows it.

With instance routing every token of a sample uses the same expert weights, so for a
given sample (or any fixed routing) the experts collapse into one kernel delta per
projection: W = W0 + s * (G_max B_m A_m + (1 - G_max) B_g A_g); plain LoRAs (q/k/v, and
every target in stage I) fold as W0 + s B A. The merged model is a plain dense VLM that
`export_vlm` writes as LLaVA. Per-token routing changes the weights from token to token
and cannot be merged; such a model stays in our format.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_vlm.models.adapters import LoRA
from moe_vlm.models.config import ConfigError
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM


def instance_guide(model: VLM, input_ids: np.ndarray, pixel_values: np.ndarray | None,
                   router_mask: np.ndarray,
                   image_grid_thw: Optional[np.ndarray] = None) -> jax.Array:
  """The instance router's input for one batch: the mean embedding-layer output (image
  features spliced in) over each row's router span (`router_mask` [B, L], the data
  pipeline's: image start to the end of the first user turn) -> [B, D]. Qwen2-VL:
  `image_grid_thw` [B, 3] with its patches."""
  from moe_vlm.models.adapters import masked_mean
  from moe_vlm.models.vlm import splice_image_features

  ids = jnp.asarray(input_ids)
  embeds = model.llm.embed_tokens(ids)
  if pixel_values is not None:
    grid = None if image_grid_thw is None else jnp.asarray(image_grid_thw)
    embeds = splice_image_features(embeds, model.image_features(jnp.asarray(pixel_values), grid),
                                   ids == model.cfg.image_token_id)
  return masked_mean(embeds, jnp.asarray(router_mask))


def merge_lora_experts(model: VLM, guide: Optional[jax.Array]) -> VLM:
  """A dense VLM (no LoRA) equal to `model` on every sample whose instance guide is
  `guide` [D] (see `instance_guide`; None for a stage-I model, whose LoRAs are plain)."""
  lm = model.cfg.text.lora_moe
  if lm is None:
    raise ConfigError("merge_lora_experts: the model has no LoRA experts (text.lora_moe)")
  if lm.routing != "instance" and not lm.single:
    raise ConfigError("merge_lora_experts: lora_moe.routing='token' routes every token "
                      "differently, so the experts cannot be folded into one dense weight; "
                      "keep the model in moe_vlm's format (or train with routing='instance')")
  cfg = dataclasses.replace(model.cfg, text=dataclasses.replace(model.cfg.text, lora_moe=None))
  params = ParamCodec(model).flatten(model)
  merged = {k: v for k, v in params.items() if ".lora_" not in k}
  for i, block in enumerate(model.llm.layers):
    for group, owner in ((block.lora_mlp, "mlp"), (block.lora_attn, "attn"),
                         (block.lora_qkv, "attn")):
      if group is None:
        continue
      if isinstance(group, LoRA):
        deltas = {name: group.merged(name) for name in group.names}
      else:
        if guide is None:
          raise ValueError("merge_lora_experts: routed LoRA experts need the instance guide")
        weights, shared = group.route(jnp.asarray(guide)[None])
        deltas = {name: group.merged(name, weights[0], None if shared is None else shared[0])
                  for name in group.names}
      for name, delta in deltas.items():
        key = f"llm.layers.{i}.{owner}.{name}.kernel"
        merged[key] = (merged[key] + delta).astype(merged[key].dtype)
  codec = ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  return codec.merge(merged)
