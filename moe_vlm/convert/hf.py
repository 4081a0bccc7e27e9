"""Import (and export) of HuggingFace transformers checkpoints.

Weights are read from safetensors files (or an in-memory state dict), never from
pickles. Configs are read from `config.json` through transformers' config classes with
`trust_remote_code` off. Loading is strict: every parameter of our model must be
filled and every HF tensor must be used (or be known-unused, like SigLIP's pooling
head), otherwise the error lists what is missing, extra or mis-shaped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_vlm.convert import keymap, safetensors_io
from moe_vlm.convert.keymap import Rule
from moe_vlm.models.config import ConfigError, MoEConfig, TextConfig, VisionConfig, VLMConfig

StateDict = Mapping[str, np.ndarray]


class ConversionError(ValueError):
  """A checkpoint does not fit the model: names the keys and shapes involved."""


# --------------------------------------------------------------------- state dicts


def to_numpy(tensor: Any) -> np.ndarray:
  """torch tensor / numpy / jax array -> numpy, keeping bf16 (via ml_dtypes)."""
  if hasattr(tensor, "detach"):  # torch.Tensor, without importing torch here
    t = tensor.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      import ml_dtypes
      return t.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(tensor)


def safetensors_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory (sharded or not), or `path` itself."""
  if os.path.isfile(path):
    return [path]
  index = os.path.join(path, safetensors_io.INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = (f" It has {bins}: pickled weights are not loaded (unsafe); convert them to "
            "safetensors first." if bins else "")
    raise ConversionError(f"{path}: no *.safetensors file found.{hint}")
  return [os.path.join(path, f) for f in files]


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (sharded or single file) or one file, read
  lazily: memory-mapped, nothing is read until a tensor or a slice of it is used."""
  out: dict[str, np.ndarray] = {}
  for file in safetensors_files(path):
    try:
      out.update(safetensors_io.read(file))
    except safetensors_io.SafetensorsError as e:
      raise ConversionError(str(e)) from None
  return out


def load_hf_config(path: str):
  """transformers config from a directory's config.json (no remote code)."""
  from transformers import AutoConfig

  return AutoConfig.from_pretrained(path, trust_remote_code=False)


# ------------------------------------------------------------------------ configs


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


def _rope(cfg: Any) -> tuple[float, float]:
  params = _get(cfg, "rope_parameters") or {}
  rope_type = params.get("rope_type", "default")
  if rope_type != "default":
    raise ConfigError(f"{_get(cfg, 'model_type')}: rope_type={rope_type!r} is not "
                      "supported (only 'default' rotary embeddings)")
  theta = params.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
  partial = params.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0))
  return float(theta), float(partial)


_TEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen2_moe", "phi", "stablelm", "qwen2_vl_text")


def text_config_from_hf(hf: Any, dtype: str = "float32") -> TextConfig:
  """TextConfig from a transformers config of a supported decoder family."""
  mt = _get(hf, "model_type")
  if mt not in _TEXT_FAMILIES:
    raise ConfigError(f"model_type={mt!r}: supported text families are "
                      f"{', '.join(_TEXT_FAMILIES)}")
  if mt == "qwen2_vl_text":
    return _qwen2_vl_text_config(hf, dtype)
  theta, partial = _rope(hf)
  common = dict(
      vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=_get(hf, "num_key_value_heads") or hf.num_attention_heads,
      head_dim=_get(hf, "head_dim"), rope_theta=theta, partial_rotary_factor=partial,
      tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)), activation=hf.hidden_act,
      dtype=dtype)
  if mt in ("llama", "mistral"):
    bias = bool(_get(hf, "attention_bias", False))
    return TextConfig(family="llama", norm="rms", norm_eps=hf.rms_norm_eps, mlp="gated",
                      qkv_bias=bias, o_bias=bias, mlp_bias=bool(_get(hf, "mlp_bias", False)),
                      **common)
  if mt in ("qwen2", "qwen2_moe"):
    if _get(hf, "use_sliding_window", False):
      raise ConfigError(f"{mt}: use_sliding_window=True is not supported")
    moe = None
    if mt == "qwen2_moe":
      if _get(hf, "shared_expert_intermediate_size", 0):
        raise ConfigError(
            "qwen2_moe: shared_expert_intermediate_size="
            f"{hf.shared_expert_intermediate_size}; only 0 (no shared expert, the MoE-LLaVA "
            "design) is supported")
      step, only = hf.decoder_sparse_step, set(hf.mlp_only_layers or ())
      idx = tuple(i for i in range(hf.num_hidden_layers)
                  if i not in only and step > 0 and (i + 1) % step == 0)
      moe = MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                      moe_layers_idx=idx, dispatch="dropless",
                      renormalize=bool(hf.norm_topk_prob),
                      aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.01)),
                      expert_intermediate_size=hf.moe_intermediate_size)
    return TextConfig(family=mt, norm="rms", norm_eps=hf.rms_norm_eps, mlp="gated",
                      qkv_bias=bool(_get(hf, "qkv_bias", True)), moe=moe, **common)
  if mt == "phi":
    if _get(hf, "qk_layernorm", False):
      raise ConfigError("phi: qk_layernorm=True is not supported")
    return TextConfig(family="phi", norm="layer", norm_eps=hf.layer_norm_eps, mlp="plain",
                      mlp_bias=True, qkv_bias=True, o_bias=True, parallel_residual=True,
                      lm_head_bias=True, **common)
  if mt == "stablelm":
    if _get(hf, "qk_layernorm", False):
      raise ConfigError("stablelm: qk_layernorm=True is not supported")
    return TextConfig(family="stablelm", norm="layer", norm_eps=hf.layer_norm_eps,
                      mlp="gated", qkv_bias=bool(hf.use_qkv_bias),
                      parallel_residual=bool(hf.use_parallel_residual), **common)
  raise AssertionError(mt)  # unreachable: _TEXT_FAMILIES lists the branches above


def _qwen2_vl_text_config(hf: Any, dtype: str) -> TextConfig:
  """Qwen2-VL's decoder: Qwen2 (q/k/v bias, RMSNorm, SwiGLU) with M-RoPE. Its attention
  takes head_dim = hidden / heads whatever the config says."""
  if _get(hf, "use_sliding_window", False):
    raise ConfigError("qwen2_vl: use_sliding_window=True is not supported")
  params = dict(_get(hf, "rope_parameters") or {})
  if params.get("rope_type", "default") not in ("default", "mrope"):
    raise ConfigError(f"qwen2_vl: rope_type={params['rope_type']!r} is not supported")
  return TextConfig(
      family="qwen2", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=_get(hf, "num_key_value_heads") or hf.num_attention_heads,
      norm="rms", norm_eps=hf.rms_norm_eps, mlp="gated", activation=hf.hidden_act,
      qkv_bias=True, rope_theta=float(params.get("rope_theta", 1000000.0)),
      rope_type="mrope", mrope_section=tuple(int(x) for x in params.get(
          "mrope_section", (16, 24, 24))),
      tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)), dtype=dtype)


def _qwen2_vl_vision_config(hf: Any, dtype: str) -> VisionConfig:
  """Qwen2VLVisionConfig -> our tower (its LayerNorms and the merger's use eps 1e-6;
  `hidden_size` there is the merger's output, the LLM's width)."""
  for name in ("patch_size", "temporal_patch_size"):
    if not isinstance(_get(hf, name), int):
      raise ConfigError(f"qwen2_vl vision {name}={_get(hf, name)!r}: expected an int")
  params = _get(hf, "rope_parameters") or {}
  return VisionConfig(
      variant="qwen2_vl", patch_size=hf.patch_size, num_channels=hf.in_channels,
      hidden_size=hf.embed_dim, intermediate_size=int(hf.embed_dim * hf.mlp_ratio),
      num_layers=hf.depth, num_heads=hf.num_heads, norm_eps=1e-6, activation=hf.hidden_act,
      spatial_merge_size=hf.spatial_merge_size, temporal_patch_size=hf.temporal_patch_size,
      rope_theta=float(params.get("rope_theta", 10000.0)), dtype=dtype)


def vision_config_from_hf(hf: Any, dtype: str = "float32") -> VisionConfig:
  mt = _get(hf, "model_type")
  if mt == "qwen2_vl_vision":
    return _qwen2_vl_vision_config(hf, dtype)
  variants = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
  if mt not in variants:
    raise ConfigError(f"vision model_type={mt!r}: expected one of {sorted(variants)}")
  return VisionConfig(variant=variants[mt], image_size=hf.image_size, patch_size=hf.patch_size,
                      num_channels=hf.num_channels, hidden_size=hf.hidden_size,
                      intermediate_size=hf.intermediate_size,
                      num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                      norm_eps=hf.layer_norm_eps, activation=hf.hidden_act, dtype=dtype)


def vlm_config_from_hf(hf: Any, dtype: str = "float32") -> VLMConfig:
  """VLMConfig from a LlavaConfig or a Qwen2VLConfig."""
  if _get(hf, "model_type") == "qwen2_vl":
    return qwen2_vl_config_from_hf(hf, dtype)
  if _get(hf, "model_type") != "llava":
    raise ConfigError(f"model_type={_get(hf, 'model_type')!r}: expected 'llava' or "
                      "'qwen2_vl'")
  layer = hf.vision_feature_layer
  if not isinstance(layer, int):
    raise ConfigError(f"vision_feature_layer={layer!r}: only a single layer is supported")
  if hf.projector_hidden_act != "gelu" or not _get(hf, "multimodal_projector_bias", True):
    raise ConfigError("LLaVA projector must be Linear-GELU-Linear with bias (mlp2x_gelu); "
                      f"got act={hf.projector_hidden_act!r}")
  # LLaVA's own lm_head has no bias, whatever the text family's (Phi's) has.
  text = dataclasses.replace(text_config_from_hf(hf.text_config, dtype), lm_head_bias=False)
  return VLMConfig(vision=vision_config_from_hf(hf.vision_config, dtype),
                   text=text, projector="mlp2x_gelu",
                   vision_feature_layer=layer,
                   vision_feature_select_strategy=hf.vision_feature_select_strategy,
                   image_token_id=hf.image_token_index)


def qwen2_vl_config_from_hf(hf: Any, dtype: str = "float32",
                            min_pixels: Optional[int] = None,
                            max_pixels: Optional[int] = None) -> VLMConfig:
  """VLMConfig from a Qwen2VLConfig: the tower's last hidden state through the patch
  merger, M-RoPE in the Qwen2 decoder. The pixel budget (`min_pixels`, `max_pixels`) is
  the image processor's (preprocessor_config.json), not the model's; default: ours."""
  text = dataclasses.replace(text_config_from_hf(hf.text_config, dtype),
                             tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)))
  vision = vision_config_from_hf(hf.vision_config, dtype)
  if hf.vision_config.hidden_size != text.hidden_size:
    raise ConfigError(f"qwen2_vl: vision_config.hidden_size={hf.vision_config.hidden_size} "
                      f"(the merger's output) differs from the text hidden_size "
                      f"{text.hidden_size}")
  budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
            if v is not None}
  return VLMConfig(vision=dataclasses.replace(vision, **budget), text=text,
                   projector="qwen2_vl_merger", vision_feature_layer=-1,
                   vision_feature_select_strategy="full", image_token_id=hf.image_token_id)


def pixel_budget(path: str) -> dict[str, int]:
  """min_pixels / max_pixels of a directory's Qwen2-VL image processor (its
  preprocessor_config.json: `size.shortest_edge` / `size.longest_edge`, or the older
  `min_pixels` / `max_pixels` keys); {} when it has none."""
  file = os.path.join(path, "preprocessor_config.json")
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    raw = json.load(f)
  size = raw.get("size") or {}
  out = {"min_pixels": raw.get("min_pixels", size.get("shortest_edge")),
         "max_pixels": raw.get("max_pixels", size.get("longest_edge"))}
  return {k: int(v) for k, v in out.items() if v is not None}


# ------------------------------------------------------- configs, the other way

# The inverses of the three functions above: text_config_from_hf(text_config_to_hf(c))
# describes the same computation as `c` (export relies on it; tests/test_export.py checks).


def _require(cfg: Any, target: str, **expected: Any) -> None:
  bad = [f"{name}={getattr(cfg, name)!r} (needs {want!r})" for name, want in expected.items()
         if getattr(cfg, name) != want]
  if bad:
    raise ConfigError(f"{target} cannot express this model: " + ", ".join(bad))


def _rope_parameters(cfg: TextConfig) -> dict[str, Any]:
  params = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
  if cfg.partial_rotary_factor != 1.0:
    params["partial_rotary_factor"] = float(cfg.partial_rotary_factor)
  return params


def text_config_to_hf(cfg: TextConfig, **extra: Any) -> Any:
  """The transformers config of a decoder that computes what `cfg` computes.

  Dense: LlamaConfig (Llama/Mistral, optional attention and MLP bias), Qwen2Config (qkv
  bias only), PhiConfig, StableLmConfig. MoE: Qwen2MoeConfig without shared expert, for
  the gated RMSNorm family (a Llama-style model is Qwen2-MoE with `qkv_bias=False`).
  The lm_head bias is not a config matter (LLaVA's lm_head has none): see
  `moe_vlm.convert.export`. `extra` (token ids) is passed to the config.
  Raises ConfigError naming the fields the target cannot express.
  """
  import transformers

  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                hidden_act=cfg.activation, tie_word_embeddings=cfg.tie_embeddings,
                rope_parameters=_rope_parameters(cfg), **extra)
  head_dim = {} if cfg.head_dim is None else {"head_dim": cfg.head_dim}
  gated_rms = dict(norm="rms", mlp="gated", parallel_residual=False, partial_rotary_factor=1.0)
  if cfg.moe is not None:
    _require(cfg, "Qwen2MoeConfig (the only transformers MoE class without token dropping "
             "that holds MoE-LLaVA's routing)", **gated_rms, o_bias=False, mlp_bias=False)
    moe, moe_layers = cfg.moe, set(cfg.moe_layers())
    return transformers.Qwen2MoeConfig(
        **common, **head_dim, rms_norm_eps=cfg.norm_eps, qkv_bias=cfg.qkv_bias,
        # MoE exactly in `moe_layers`: every layer is sparse unless listed as MLP-only.
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(cfg.num_layers) if i not in moe_layers],
        num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.expert_intermediate_size or cfg.intermediate_size,
        shared_expert_intermediate_size=0, norm_topk_prob=moe.renormalize,
        router_aux_loss_coef=moe.aux_loss_coef)
  if cfg.family in ("llama", "mistral", "qwen2", "qwen2_moe"):
    _require(cfg, "LlamaConfig / Qwen2Config", **gated_rms)
    if cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias:
      return transformers.Qwen2Config(**common, **head_dim, rms_norm_eps=cfg.norm_eps)
    _require(cfg, "LlamaConfig (one attention_bias switch)", o_bias=cfg.qkv_bias)
    return transformers.LlamaConfig(**common, **head_dim, rms_norm_eps=cfg.norm_eps,
                                    attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  default_head = {"dim_per_head": cfg.hidden_size // cfg.num_heads}
  if cfg.family == "phi":
    _require(cfg, "PhiConfig", norm="layer", mlp="plain", mlp_bias=True, qkv_bias=True,
             o_bias=True, parallel_residual=True, **default_head)
    return transformers.PhiConfig(**common, layer_norm_eps=cfg.norm_eps, qk_layernorm=False)
  if cfg.family == "stablelm":
    _require(cfg, "StableLmConfig", norm="layer", mlp="gated", mlp_bias=False, o_bias=False,
             **default_head)
    return transformers.StableLmConfig(**common, layer_norm_eps=cfg.norm_eps,
                                       use_qkv_bias=cfg.qkv_bias, qk_layernorm=False,
                                       use_parallel_residual=cfg.parallel_residual)
  raise ConfigError(f"text.family={cfg.family!r}: exportable families are llama, mistral, "
                    "qwen2, qwen2_moe, phi, stablelm")


def vision_config_to_hf(cfg: VisionConfig) -> Any:
  """CLIPVisionConfig / SiglipVisionConfig (SigLIP without the attention-pool head we lack)."""
  import transformers

  kw = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            image_size=cfg.image_size, patch_size=cfg.patch_size,
            num_channels=cfg.num_channels, layer_norm_eps=cfg.norm_eps,
            hidden_act=cfg.activation)
  if cfg.variant == "clip":
    return transformers.CLIPVisionConfig(**kw)
  if cfg.variant == "siglip":
    return transformers.SiglipVisionConfig(**kw, vision_use_head=False)
  raise ConfigError(f"vision.variant={cfg.variant!r}: expected 'clip' or 'siglip'")


def vlm_config_to_hf(cfg: VLMConfig, **text_extra: Any) -> Any:
  """LlavaConfig; its text config per `text_config_to_hf` (Qwen2MoeConfig for MoE)."""
  import transformers

  if cfg.projector != "mlp2x_gelu":
    raise ConfigError(f"projector={cfg.projector!r}: LLaVA's projector is Linear-GELU-Linear "
                      "(mlp2x_gelu)")
  # Both the strategy and the layer mean the same in LLaVA: "default" drops token 0 (CLIP's
  # CLS, and SigLIP's first patch as MoE-LLaVA does), hidden_states[layer] is our layer.
  return transformers.LlavaConfig(
      vision_config=vision_config_to_hf(cfg.vision),
      text_config=text_config_to_hf(cfg.text, **text_extra),
      image_token_index=cfg.image_token_id, vision_feature_layer=cfg.vision_feature_layer,
      vision_feature_select_strategy=cfg.vision_feature_select_strategy,
      projector_hidden_act="gelu", multimodal_projector_bias=True,
      image_seq_length=cfg.num_image_tokens, tie_word_embeddings=cfg.text.tie_embeddings)


def qwen2_vl_config_to_hf(cfg: VLMConfig, **text_extra: Any) -> Any:
  """Qwen2VLConfig of a Qwen2-VL model of ours (tower, merger, dense Qwen2 decoder with
  M-RoPE); ConfigError names what it cannot express."""
  import transformers

  t, v = cfg.text, cfg.vision
  _require(t, "Qwen2VLConfig's decoder (Qwen2 with M-RoPE)", norm="rms", mlp="gated",
           qkv_bias=True, o_bias=False, mlp_bias=False, parallel_residual=False,
           partial_rotary_factor=1.0, rope_type="mrope", lm_head_bias=False, moe=None,
           dim_per_head=t.hidden_size // t.num_heads)
  _require(cfg, "Qwen2VLConfig", projector="qwen2_vl_merger", vision_feature_layer=-1)
  _require(v, "Qwen2VLVisionConfig (LayerNorm eps 1e-6)", variant="qwen2_vl", norm_eps=1e-6)
  if v.intermediate_size % v.hidden_size:
    raise ConfigError(f"Qwen2VLVisionConfig cannot express vision.intermediate_size="
                      f"{v.intermediate_size}: it is mlp_ratio x hidden_size "
                      f"({v.hidden_size}) with an integer mlp_ratio")
  text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
              num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
              hidden_act=t.activation, rms_norm_eps=t.norm_eps,
              rope_parameters={"rope_type": "default", "rope_theta": float(t.rope_theta),
                               "mrope_section": list(t.mrope_section)},
              tie_word_embeddings=t.tie_embeddings, **text_extra)
  vision = dict(depth=v.num_layers, embed_dim=v.hidden_size, hidden_size=t.hidden_size,
                hidden_act=v.activation, mlp_ratio=v.intermediate_size // v.hidden_size,
                num_heads=v.num_heads, in_channels=v.num_channels, patch_size=v.patch_size,
                spatial_merge_size=v.spatial_merge_size,
                temporal_patch_size=v.temporal_patch_size,
                rope_parameters={"rope_type": "axial", "rope_theta": float(v.rope_theta)})
  return transformers.Qwen2VLConfig(text_config=text, vision_config=vision,
                                    image_token_id=cfg.image_token_id,
                                    tie_word_embeddings=t.tie_embeddings)


# ---------------------------------------------------------- on-disk key layouts

# transformers 5 keeps two layouts: the in-memory one our tables use, and the on-disk one
# that save_pretrained writes and hub checkpoints carry. Rename on-disk keys on import.
_LLAVA_DISK_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def rename_prefixes(state: StateDict, pairs) -> dict[str, np.ndarray]:
  """Replaces the first matching (old, new) key prefix of every tensor name."""
  out = {}
  for key, value in state.items():
    for old, new in pairs:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    out[key] = value
  return out


def canonical_llava_keys(state: StateDict) -> dict[str, np.ndarray]:
  """On-disk LLaVA names (`language_model.model.*`) -> in-memory ones."""
  return rename_prefixes(state, _LLAVA_DISK_PREFIXES)


# Qwen2-VL on disk (hub checkpoints, save_pretrained): `model.*` is the decoder body,
# `visual.*` the tower, `lm_head.*`; in memory `model.language_model.*`, `model.visual.*`.
_QWEN2_VL_DISK_PREFIXES = (
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
)


def canonical_qwen2_vl_keys(state: StateDict) -> dict[str, np.ndarray]:
  """On-disk Qwen2-VL names -> in-memory ones (a state already in memory names is kept)."""
  if any(k.startswith(("model.language_model.", "model.visual.")) for k in state):
    return dict(state)
  return rename_prefixes(state, _QWEN2_VL_DISK_PREFIXES)


def fuse_unfused_experts(state: StateDict) -> dict[str, np.ndarray]:
  """`mlp.experts.<i>.{gate,up,down}_proj.weight` (on disk) -> fused
  `mlp.experts.gate_up_proj [E, 2F, D]` and `mlp.experts.down_proj [E, D, F]`."""
  out, experts = {}, {}
  for key, value in state.items():
    head, sep, tail = key.partition(".mlp.experts.")
    parts = tail.split(".")
    if sep and len(parts) == 3 and parts[0].isdigit() and parts[2] == "weight":
      experts.setdefault(head, {}).setdefault(parts[1], {})[int(parts[0])] = to_numpy(value)
    else:
      out[key] = value
  for head, projs in experts.items():
    n = len(projs.get("down_proj", {}))
    for name in ("gate_proj", "up_proj", "down_proj"):
      if sorted(projs.get(name, {})) != list(range(n)):
        raise ConversionError(f"{head}.mlp.experts: expected {name}.weight for experts "
                              f"0..{n - 1}, found {sorted(projs.get(name, {}))}")
    stack = lambda name: np.stack([projs[name][i] for i in range(n)])
    out[f"{head}.mlp.experts.gate_up_proj"] = np.concatenate(
        [stack("gate_proj"), stack("up_proj")], axis=1)
    out[f"{head}.mlp.experts.down_proj"] = stack("down_proj")
  return out


# ----------------------------------------------------------------- apply the rules


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Our parameters by dotted path."""
  return {".".join(str(p) for p in path): var
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def import_params(state: StateDict, rules: Sequence[Rule], shapes: Mapping[str, Any],
                  shardings: Optional[Mapping[str, Any]] = None,
                  ignore_prefixes: Iterable[str] = (), complete: bool = True
                  ) -> dict[str, jax.Array]:
  """Our flat parameters from an HF state dict, strictly (see module docstring).

  shapes: our parameters' ShapeDtypeStructs (target shapes and dtypes);
  shardings: each parameter's sharding: it is then created straight on the mesh, each
    process reading only the slices its devices hold (with a memory-mapped state, only
    those bytes); None: whole arrays on the default device.
  complete: every parameter of `shapes` must be filled (False: only those the rules
    name, for a part of a larger model).
  Tensors are converted one at a time, never the whole checkpoint at once.
  """
  from moe_vlm.parallel import placement

  ignore = tuple(ignore_prefixes)
  missing_hf = sorted({k for r in rules for k in r.hf if k not in state})
  if missing_hf:
    raise ConversionError(f"checkpoint lacks {len(missing_hf)} tensors the model needs, e.g. "
                          f"{missing_hf[:5]}")
  used = keymap.hf_keys(rules)
  extra = sorted(k for k in state if k not in used and not k.startswith(ignore))
  if extra:
    raise ConversionError(f"checkpoint has {len(extra)} tensors the model does not use, "
                          f"e.g. {extra[:5]} (wrong family or config?)")
  out: dict[str, jax.Array] = {}
  for rule in rules:
    values = rule.to_ours([to_numpy(state[k]) for k in rule.hf])
    for path, value in zip(rule.ours, values):
      if path not in shapes:
        raise ConversionError(f"{rule.hf[0]} -> {path}: the configured model has no such "
                              "parameter; align the model config with the checkpoint")
      want = shapes[path]
      if tuple(value.shape) != tuple(want.shape):
        raise ConversionError(f"{rule.hf[0]} -> {path}: shape {tuple(value.shape)}, model "
                              f"expects {tuple(want.shape)}")
      if shardings is None:
        out[path] = jnp.asarray(value, dtype=want.dtype)
      else:
        out[path] = placement.from_host(want.shape, want.dtype, shardings[path],
                                        lambda index, v=value: v[index])
  unfilled = sorted(set(shapes) - set(out)) if complete else []
  if unfilled:
    raise ConversionError(f"{len(unfilled)} model parameters have no source tensor, e.g. "
                          f"{unfilled[:5]}")
  return out


def load_weights(model: nnx.Module, state: StateDict, rules: Sequence[Rule],
                 ignore_prefixes: Iterable[str] = ()) -> None:
  """Fills `model` in place from an HF state dict, strictly (see `import_params`).
  `model` may be abstract (`nnx.eval_shape`); it is concrete afterwards."""
  ours = flat_params(model)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in ours.items()}
  for path, value in import_params(state, rules, shapes, None, ignore_prefixes).items():
    var = ours[path]
    if isinstance(var.get_value(), jax.ShapeDtypeStruct):
      # A model from nnx.eval_shape (no memory spent on a random init): set, not write.
      var.set_value(value)
    else:
      var[...] = value


def export_tensors(get: Callable[[str], np.ndarray],
                   rules: Sequence[Rule]) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy tensor) pairs, rule by rule: the inverse of `import_params`. `get`
  returns one of our parameters on the host, so only one rule's tensors are ever held."""
  for rule in rules:
    yield from zip(rule.hf, rule.to_hf([get(p) for p in rule.ours]))


def export_weights(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """HF state dict (numpy) from `model`: the inverse of `load_weights`."""
  ours = flat_params(model)
  return dict(export_tensors(lambda p: np.asarray(ours[p][...]), rules))


# ----------------------------------------------------------------- whole models


def _vision_prefix(state: StateDict, base: str) -> str:
  """transformers 5.23 flattens CLIP keys; checkpoints on disk keep `vision_model.`."""
  nested = f"{base}vision_model."
  return nested if any(k.startswith(nested) for k in state) else base


def vision_part(hf_config: Any) -> Any:
  """The vision config of a vision directory: CLIPModel / SiglipModel directories hold a
  text tower too."""
  return getattr(hf_config, "vision_config", None) or hf_config


def _vision_state(state: StateDict, hf_config: Any) -> StateDict:
  if _get(hf_config, "model_type") in ("clip", "siglip"):  # both towers: keep the vision one
    return {k[len("vision_model."):]: v for k, v in state.items()
            if k.startswith("vision_model.")}
  return state


# Each source below is (state, rules, ignored key prefixes) for one kind of checkpoint:
# the model-level importers and `import_pretrained_params` share them.


def _text_source(state: StateDict, cfg: TextConfig, ours: str, hf_model: str, moe_layout: str):
  state = fuse_unfused_experts(state)
  ignore = ["lm_head."] if cfg.tie_embeddings else []
  ignore += [k for k in state if ".shared_expert" in k]  # size-0 shared expert
  return state, keymap.text_rules(cfg, ours, hf_model, "lm_head", moe_layout), ignore


def _vision_source(state: StateDict, cfg: VisionConfig, ours: str):
  prefix = _vision_prefix(state, "")
  return state, keymap.vision_rules(cfg, ours, prefix), [f"{prefix}head."]


def _llava_source(state: StateDict, cfg: VLMConfig, moe_layout: str):
  state = fuse_unfused_experts(canonical_llava_keys(state))
  vprefix = _vision_prefix(state, "model.vision_tower.")
  ignore = [f"{vprefix}head."]
  if cfg.text.tie_embeddings:
    ignore.append("lm_head.")
  ignore += [k for k in state if ".shared_expert" in k]
  return state, keymap.llava_rules(cfg, vprefix, moe_layout), ignore


def _qwen2_vl_source(state: StateDict, cfg: VLMConfig):
  state = canonical_qwen2_vl_keys(state)
  return state, keymap.qwen2_vl_rules(cfg), ["lm_head."] if cfg.text.tie_embeddings else []


def import_text(state: StateDict, hf_config: Any, *, dtype: str = "float32",
                rngs: Optional[nnx.Rngs] = None, moe_layout: str = "qwen2_moe"):
  """*ForCausalLM (llama, qwen2, qwen2_moe, phi, stablelm) -> DecoderLM."""
  from moe_vlm.models.llm import DecoderLM

  cfg = text_config_from_hf(hf_config, dtype)
  model = DecoderLM(cfg, rngs=rngs or nnx.Rngs(0))
  load_weights(model, *_text_source(state, cfg, "", "model.", moe_layout))
  return model


def import_vision(state: StateDict, hf_config: Any, *, dtype: str = "float32",
                  rngs: Optional[nnx.Rngs] = None):
  """CLIPVisionModel / SiglipVisionModel -> VisionEncoder."""
  from moe_vlm.models.vision import VisionEncoder

  cfg = vision_config_from_hf(hf_config, dtype)
  model = VisionEncoder(cfg, rngs=rngs or nnx.Rngs(0))
  load_weights(model, *_vision_source(state, cfg, ""))
  return model


def import_llava(state: StateDict, hf_config: Any, *, dtype: str = "float32",
                 rngs: Optional[nnx.Rngs] = None, moe_layout: str = "qwen2_moe"):
  """LlavaForConditionalGeneration -> VLM (an MoE text model if its text config is one)."""
  from moe_vlm.models.vlm import VLM

  cfg = vlm_config_from_hf(hf_config, dtype)
  model = VLM(cfg, rngs=rngs or nnx.Rngs(0))
  load_weights(model, *_llava_source(state, cfg, moe_layout))
  return model


def import_qwen2_vl(state: StateDict, hf_config: Any, *, dtype: str = "float32",
                    rngs: Optional[nnx.Rngs] = None, **budget: int):
  """Qwen2VLForConditionalGeneration (in-memory or on-disk names) -> VLM; `budget`:
  min_pixels / max_pixels (see `qwen2_vl_config_from_hf`)."""
  from moe_vlm.models.vlm import VLM

  cfg = qwen2_vl_config_from_hf(hf_config, dtype, **budget)
  model = VLM(cfg, rngs=rngs or nnx.Rngs(0))
  load_weights(model, *_qwen2_vl_source(state, cfg))
  return model


def import_pretrained(path: str, *, dtype: str = "float32", moe_layout: str = "qwen2_moe"):
  """A model directory (config.json + safetensors) -> (our model, its config)."""
  hf_config = load_hf_config(path)
  state = load_safetensors(path)
  mt = hf_config.model_type
  if mt == "qwen2_vl":
    model = import_qwen2_vl(state, hf_config, dtype=dtype, **pixel_budget(path))
  elif mt == "llava":
    model = import_llava(state, hf_config, dtype=dtype, moe_layout=moe_layout)
  elif mt in ("clip_vision_model", "siglip_vision_model", "clip", "siglip"):
    model = import_vision(_vision_state(state, hf_config), vision_part(hf_config), dtype=dtype)
  else:
    model = import_text(state, hf_config, dtype=dtype, moe_layout=moe_layout)
  return model, model.cfg


PARTS = ("vision", "llm", "llava")


def import_pretrained_params(path: str, cfg: VLMConfig, part: str, shapes: Mapping[str, Any],
                             shardings: Optional[Mapping[str, Any]] = None,
                             moe_layout: str = "qwen2_moe") -> dict[str, jax.Array]:
  """A pretrained part of the VLM `cfg` from a local HF directory, as our flat parameters
  (`vision.*`, `llm.*`, or the whole model for a LLaVA directory), each tensor read and
  placed on its sharding on its own (see `import_params`); `cfg` must describe the
  checkpoint's architecture (`moe_vlm.experiment.model_config` derives it from it)."""
  if part not in PARTS:
    raise ValueError(f"part={part!r}: expected one of {PARTS}")
  hf_config = load_hf_config(path)
  state = load_safetensors(path)
  if part == "vision":
    source = _vision_source(_vision_state(state, hf_config), cfg.vision, "vision.")
  elif part == "llm":
    source = _text_source(state, cfg.text, "llm.", "model.", moe_layout)
  elif cfg.vision.native:  # a Qwen2-VL directory
    source = _qwen2_vl_source(state, cfg)
  else:
    source = _llava_source(state, cfg, moe_layout)
  try:
    return import_params(*source[:2], shapes, shardings, source[2], complete=part == "llava")
  except ConversionError as e:
    raise ConversionError(f"{path}: {e}") from None
