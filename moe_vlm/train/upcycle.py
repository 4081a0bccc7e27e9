"""Sparse upcycling (MoE-Tuning stage 3): dense model -> MoE model; and Awaker2.5-VL's
stage II start: its stage-I LoRA copied into every LoRA expert (`lora_upcycle_params`).

Every expert of an MoE layer starts as an exact copy of that layer's stage-2 FFN and
each router is freshly initialised like torch's `nn.Linear` (what MoE-LLaVA does).
All other parameters are carried over unchanged. Because the renormalised top-k gate
weights sum to one, the upcycled model computes the same function as the dense one
until the experts diverge (with dropless dispatch, or with capacity large enough).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from moe_vlm.models.config import ConfigError, MoEConfig, TextConfig, VLMConfig
from moe_vlm.models.layers import torch_linear_init
from moe_vlm.models.params import ParamCodec, Params

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


def upcycle_check(dense_cfg, moe: MoEConfig):
  """The MoE config of the upcycled model; errors name what cannot be upcycled."""
  text = _text_cfg(dense_cfg)
  if text.moe is not None:
    raise ConfigError("upcycle: the model already has MoE layers (text.moe is set)")
  if moe.expert_intermediate_size not in (None, text.intermediate_size):
    raise ConfigError(
        f"upcycle: moe.expert_intermediate_size={moe.expert_intermediate_size} differs from "
        f"the dense FFN's intermediate_size={text.intermediate_size}; experts are copies")
  new_cfg = with_moe(dense_cfg, moe)
  _text_cfg(new_cfg).validate()
  return new_cfg


def upcycled(dense: Mapping[str, jax.Array], moe_codec: ParamCodec, moe: MoEConfig,
             seed: int) -> Params:
  """The MoE model's flat parameters from the dense model's: the routing core of
  upcycling, as a pure function (jit-able, so it can run straight onto a mesh)."""
  key = jax.random.key(seed)
  out = {}
  for i, name in enumerate(moe_codec.names):
    shape = moe_codec.shapes[name]
    if name in dense:
      value = dense[name]
    elif ".experts." in name:
      head, leaf = name.rsplit(".experts.", 1)
      submodule, var = _EXPERT_SOURCE[leaf]
      value = jnp.broadcast_to(dense[f"{head}.{submodule}.{var}"], shape.shape)
    elif ".router." in name:
      value = torch_linear_init(jax.random.fold_in(key, i), shape.shape, shape.dtype)
    else:
      raise AssertionError(f"upcycle: no source for parameter {name}")
    if tuple(value.shape) != tuple(shape.shape):
      raise AssertionError(f"upcycle: {name} has shape {value.shape}, expected {shape.shape}")
    out[name] = jnp.asarray(value, shape.dtype)
  return out


def upcycle(dense: M, moe: MoEConfig, *, seed: int = 0) -> M:
  """Returns a new model of the same class whose chosen FFNs became `moe` layers."""
  new_cfg = upcycle_check(dense.cfg, moe)
  cls = type(dense)
  codec = ParamCodec.abstract(lambda: cls(new_cfg, rngs=nnx.Rngs(seed)))
  return codec.merge(upcycled(ParamCodec(dense).flatten(dense), codec, moe, seed))


def upcycle_params(dense: Params, dense_cfg: VLMConfig, moe: MoEConfig, *, seed: int,
                   mesh: Mesh) -> Params:
  """Stage 3's starting parameters from stage 2's final ones (global arrays on `mesh`):
  computed under jit straight onto the MoE model's shardings (experts split over the
  `expert` axis as they are created), the dense inputs donated, so no device ever holds
  more than its shards of either model."""
  from moe_vlm.parallel import placement

  cfg = upcycle_check(dense_cfg, moe)
  codec = placement.abstract_codec(cfg)
  dense_shardings = placement.shardings(dense_cfg, mesh)
  fn = jax.jit(lambda d: upcycled(d, codec, moe, seed), in_shardings=(dense_shardings,),
               out_shardings=placement.shardings(cfg, mesh), donate_argnums=0)
  return fn({n: dense[n] for n in dense_shardings})


# ------------------------------------------------- Awaker2.5-VL: single LoRA -> experts


def lora_source(name: str, single: Mapping[str, object]) -> str | None:
  """The stage-I parameter a stage-II LoRA parameter starts from: itself (q/k/v's plain
  LoRA and everything outside the LoRA), `<proj>_a/_b` for every expert's `<proj>_a/_b`
  and for the global expert's `<proj>_shared_a/_b`; None for the routers (fresh)."""
  if name in single:
    return name
  head, leaf = name.rsplit(".", 1)
  if leaf.endswith(("_shared_a", "_shared_b")):
    leaf = leaf.replace("_shared_", "_")
  source = f"{head}.{leaf}"
  return source if source in single else None


def lora_upcycled(single: Mapping[str, jax.Array], codec: ParamCodec) -> Params:
  """Stage II's parameters that come from stage I's (`lora_source`), as a pure function:
  each routed expert [E, in, r] and the global expert [in, r] a copy of stage I's LoRA
  [in, r] of the same projection; every other parameter carried over."""
  out = {}
  for name in codec.names:
    source = lora_source(name, single)
    if source is None:
      continue
    shape = codec.shapes[name]
    value = jnp.broadcast_to(single[source], shape.shape)
    out[name] = jnp.asarray(value, shape.dtype)
  return out


def lora_upcycle_params(single: Params, single_cfg: VLMConfig, experts_cfg: VLMConfig, *,
                        seed: int, mesh: Mesh) -> Params:
  """Awaker2.5-VL's stage II start from its stage I's final parameters (global arrays on
  `mesh`): every expert and the global expert start as copies of the single LoRA,
  computed under jit straight onto the experts model's shardings (stage I's arrays
  donated), and the routers (RMSNorm at one, linear gate) freshly initialised on
  theirs. No host copy of a global array."""
  from moe_vlm.parallel import placement

  lm, lm_single = experts_cfg.text.lora_moe, single_cfg.text.lora_moe
  if lm is None or lm.single or lm_single is None or not lm_single.single:
    raise ConfigError("lora_upcycle_params: expected a single-LoRA (stage I) model and a "
                      "LoRA-experts one")
  shape = lambda c: (c.rank, c.targets, c.layers)
  if shape(lm_single) != shape(lm):
    raise ConfigError(f"lora_upcycle_params: stage I's LoRA (rank, targets, layers) "
                      f"{shape(lm_single)} differs from stage II's {shape(lm)}")
  codec = placement.abstract_codec(experts_cfg)
  single_shardings = placement.shardings(single_cfg, mesh)
  shardings = placement.shardings(experts_cfg, mesh)
  copied = [n for n in codec.names if lora_source(n, single_shardings) is not None]
  fn = jax.jit(lambda d: lora_upcycled(d, codec), in_shardings=(single_shardings,),
               out_shardings={n: shardings[n] for n in copied}, donate_argnums=0)
  out = fn({n: single[n] for n in single_shardings})
  fresh = [n for n in codec.names if n not in out]
  return {**out, **placement.init_params(experts_cfg, mesh, seed, fresh)}
