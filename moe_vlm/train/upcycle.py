"""Sparse upcycling (MoE-Tuning stage 3): dense model -> MoE model.

Every expert of an MoE layer starts as an exact copy of that layer's stage-2 FFN and
each router is freshly initialised like torch's `nn.Linear` (what MoE-LLaVA does).
All other parameters are carried over unchanged. Because the renormalised top-k gate
weights sum to one, the upcycled model computes the same function as the dense one
until the experts diverge (with dropless dispatch, or with capacity large enough).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from moe_vlm.models.config import ConfigError, MoEConfig, TextConfig, VLMConfig
from moe_vlm.models.layers import torch_linear_init

M = TypeVar("M", bound=nnx.Module)

# Expert parameter -> (dense FFN submodule, its variable) it is copied from.
_EXPERT_SOURCE = {
    "wi_gate": ("wi_gate", "kernel"),
    "wi_up": ("wi_up", "kernel"),
    "wi": ("wi", "kernel"),
    "wo": ("wo", "kernel"),
    "wi_bias": ("wi", "bias"),
    "wo_bias": ("wo", "bias"),
}


def with_moe(cfg, moe: MoEConfig):
  """The same model config with `moe` set on its text decoder."""
  if isinstance(cfg, VLMConfig):
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, moe=moe))
  if isinstance(cfg, TextConfig):
    return dataclasses.replace(cfg, moe=moe)
  raise TypeError(f"cannot upcycle a model with config {type(cfg).__name__}")


def _text_cfg(cfg) -> TextConfig:
  return cfg.text if isinstance(cfg, VLMConfig) else cfg


def upcycle(dense: M, moe: MoEConfig, *, seed: int = 0) -> M:
  """Returns a new model of the same class whose chosen FFNs became `moe` layers."""
  text = _text_cfg(dense.cfg)
  if text.moe is not None:
    raise ConfigError("upcycle: the model already has MoE layers (text.moe is set)")
  if moe.expert_intermediate_size not in (None, text.intermediate_size):
    raise ConfigError(
        f"upcycle: moe.expert_intermediate_size={moe.expert_intermediate_size} differs from "
        f"the dense FFN's intermediate_size={text.intermediate_size}; experts are copies")
  new_cfg = with_moe(dense.cfg, moe)
  _text_cfg(new_cfg).validate()
  cls = type(dense)
  abstract = nnx.eval_shape(lambda: cls(new_cfg, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  old = dict(nnx.to_flat_state(nnx.state(dense)))
  key = jax.random.key(seed)
  flat = []
  for path, var in nnx.to_flat_state(abstract_state):
    if path in old:
      value = old[path][...]
    elif "experts" in path:
      i = path.index("experts")
      submodule, leaf = _EXPERT_SOURCE[path[i + 1]]
      src = old[path[:i] + (submodule, leaf)][...]
      value = jnp.broadcast_to(src, (moe.num_experts,) + src.shape)
    elif "router" in path:
      layer_key = jax.random.fold_in(key, len(flat))
      value = torch_linear_init(layer_key, var.shape, var.dtype)
    else:
      raise AssertionError(f"upcycle: no source for parameter {path}")
    if tuple(value.shape) != tuple(var.shape):
      raise AssertionError(f"upcycle: {path} has shape {value.shape}, expected {var.shape}")
    flat.append((path, var.replace(value=jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
