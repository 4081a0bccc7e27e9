"""Export of a trained VLM to PyTorch checkpoint directories, and import back.

Two layouts:
- "llava": a `LlavaForConditionalGeneration` directory that plain transformers loads
  (`from_pretrained`, no remote code). Dense models carry their family's text config
  (Llama, Qwen2, Phi, StableLM); MoE models of the gated RMSNorm family (Llama / Qwen2 /
  Mistral style) a `Qwen2MoeConfig`: no shared expert, MoE exactly in our MoE layers,
  top-k weights renormalised as ours. transformers never drops tokens, so the export
  computes what our `dispatch="dropless"` path computes.
- "moe_llava": MoE-LLaVA's own checkpoint layout (DeepSpeed expert names, `mm_projector`,
  a `moe` dict and `mm_*` keys in config.json) for the families transformers has no MoE
  class for (Phi-2's biased plain experts, StableLM's LayerNorm / partial rotary). The
  MoE-LLaVA repository's model classes load it; its vision tower is written to
  `image_tower/`, a plain CLIP/SigLIP vision-model directory that `mm_image_tower` names,
  because those classes load the tower from that path, not from the checkpoint.
"auto" takes "llava" whenever transformers can express the model, else "moe_llava".

Tensors are written with numpy + safetensors (no torch needed) in the on-disk layout that
transformers 5 `save_pretrained` writes: `language_model.model.*`, `language_model.lm_head`,
`vision_tower.*`, `multi_modal_projector.*`, unfused `mlp.experts.<e>.*_proj.weight`.
`moe_vlm_config.json` keeps our VLMConfig beside them, so what transformers has no field
for (capacity factors, dispatch, dtypes, remat, family name) survives a round trip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Mapping, Optional

import numpy as np
from flax import nnx

from moe_vlm.convert import hf, keymap
from moe_vlm.convert.hf import ConversionError
from moe_vlm.models import config as config_lib
from moe_vlm.models.config import (ConfigError, MoEConfig, TextConfig,
                                   VisionConfig, VLMConfig)
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM

log = logging.getLogger("moe_vlm")

LAYOUTS = ("auto", "llava", "moe_llava")
CONFIG_FILE = "moe_vlm_config.json"
PROCESSOR_FILE = "preprocessor_config.json"
IMAGE_TOWER_DIR = "image_tower"
IMAGE_TOKEN = "<image>"
_MAX_SHARD_BYTES = 5 * 2**30
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "chat_template.jinja", "chat_template.json")

# ------------------------------------------------------------- VLMConfig <-> JSON


def config_to_dict(cfg: VLMConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def config_from_dict(d: Mapping[str, Any]) -> VLMConfig:
  return config_lib.from_dict(VLMConfig, d)


def save_config(cfg: VLMConfig, path: str) -> None:
  with open(path, "w") as f:
    json.dump(config_to_dict(cfg), f, indent=2)


def load_config(path: str) -> VLMConfig:
  with open(path) as f:
    return config_from_dict(json.load(f))


def _architecture(cfg: VLMConfig) -> VLMConfig:
  """`cfg` with everything that does not change the computed function normalised away:
  dtypes, remat, the family's name among families with the same key names, routing
  knobs that transformers has no field for, and equivalent spellings (head_dim, MoE
  layers by mode or list, expert size None)."""
  t = cfg.text
  moe = None
  if t.moe is not None:
    moe = MoEConfig(num_experts=t.moe.num_experts, top_k=t.moe.top_k,
                    moe_layers_idx=t.moe_layers(), renormalize=t.moe.renormalize,
                    expert_intermediate_size=t.moe.expert_intermediate_size or t.intermediate_size)
  family = "llama" if t.family in ("llama", "mistral", "qwen2", "qwen2_moe") else t.family
  text = dataclasses.replace(t, family=family, head_dim=t.dim_per_head, dtype="float32",
                             param_dtype="float32", remat="none", moe=moe)
  vision = dataclasses.replace(cfg.vision, dtype="float32", param_dtype="float32")
  return dataclasses.replace(cfg, text=text, vision=vision)


# ------------------------------------------------------------------- layouts


def resolve_layout(cfg: VLMConfig, layout: str = "auto") -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
  if layout != "auto":
    return layout
  try:
    hf.vlm_config_to_hf(cfg)
    return "llava"
  except ConfigError as e:
    log.info("no native transformers class for this model (%s): using the moe_llava layout", e)
    return "moe_llava"


def _cast(state: dict[str, np.ndarray], dtype: Optional[str]) -> dict[str, np.ndarray]:
  """Floating tensors to `dtype` (None keeps them as they are)."""
  if not dtype:
    return state
  import ml_dtypes  # numpy has no bfloat16 of its own

  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  floating = lambda dt: dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)
  return {k: v.astype(target) if floating(v.dtype) else v for k, v in state.items()}


def _split_lm_head_bias(state: dict[str, np.ndarray], drop: bool) -> None:
  """LLaVA's lm_head has no bias: a zero bias is dropped (exact), others only on request."""
  bias = state.pop("lm_head.bias", None)
  if bias is None or not np.any(bias.astype(np.float32)) or drop:
    return
  raise ConversionError(
      "the model has a non-zero lm_head bias (Phi-2) but LlavaForConditionalGeneration's "
      "lm_head has none: the exported model would compute different logits. Export with "
      "drop_lm_head_bias=True (--drop_lm_head_bias) to accept that, or layout='moe_llava'.")


_LLAVA_MEMORY_TO_DISK = tuple((mem, disk) for disk, mem in hf._LLAVA_DISK_PREFIXES)  # pylint: disable=protected-access


def llava_disk_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """In-memory LLaVA names (`model.language_model.*`) -> on-disk ones: the inverse of
  `hf.canonical_llava_keys`."""
  return hf.rename_prefixes(state, _LLAVA_MEMORY_TO_DISK)


def unfuse_experts(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Fused `mlp.experts.gate_up_proj [E, 2F, D]` / `down_proj [E, D, F]` -> one tensor per
  expert and projection, as transformers 5 writes them: the inverse of
  `hf.fuse_unfused_experts`."""
  out = {}
  for key, value in state.items():
    head, sep, tail = key.partition(".mlp.experts.")
    if sep and tail == "gate_up_proj":
      f = value.shape[1] // 2
      for e in range(value.shape[0]):
        out[f"{head}.mlp.experts.{e}.gate_proj.weight"] = value[e, :f]
        out[f"{head}.mlp.experts.{e}.up_proj.weight"] = value[e, f:]
    elif sep and tail == "down_proj":
      for e in range(value.shape[0]):
        out[f"{head}.mlp.experts.{e}.down_proj.weight"] = value[e]
    else:
      out[key] = value
  return out


def _empty_shared_experts(cfg: TextConfig, prefix: str, dtype: np.dtype) -> dict[str, np.ndarray]:
  # Qwen2-MoE always builds a shared expert; at size 0 it adds 0 * sigmoid(gate) = 0 to the
  # output. save_pretrained writes these tensors, so do we (no "missing keys" on load).
  d, out = cfg.hidden_size, {}
  for i in cfg.moe_layers():
    m = f"{prefix}layers.{i}.mlp"
    out[f"{m}.shared_expert.gate_proj.weight"] = np.zeros((0, d), dtype)
    out[f"{m}.shared_expert.up_proj.weight"] = np.zeros((0, d), dtype)
    out[f"{m}.shared_expert.down_proj.weight"] = np.zeros((d, 0), dtype)
    out[f"{m}.shared_expert_gate.weight"] = np.zeros((1, d), dtype)
  return out


def llava_state(model: VLM, *, drop_lm_head_bias: bool = False) -> dict[str, np.ndarray]:
  """The tensors of `LlavaForConditionalGeneration.save_pretrained`, by on-disk name."""
  cfg = model.cfg
  state = hf.export_weights(model, keymap.llava_rules(cfg))
  _split_lm_head_bias(state, drop_lm_head_bias)
  if cfg.text.moe is not None:
    dtype = state["model.language_model.embed_tokens.weight"].dtype
    state.update(_empty_shared_experts(cfg.text, "model.language_model.", dtype))
  return llava_disk_keys(unfuse_experts(state))


def moe_llava_state(model: VLM) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(LLM + projector tensors by MoE-LLaVA name, vision tower tensors by CLIPVisionModel
  name). The tower keeps the `vision_model.` prefix that transformers 4.x (MoE-LLaVA's)
  needs and 5.x accepts."""
  cfg = model.cfg
  text = hf.export_weights(model, keymap.text_rules(cfg.text, "llm.", "model.", "lm_head",
                                                     "moe_llava")
                           + keymap.moe_llava_projector_rules(cfg.projector))
  vision = hf.export_weights(model, keymap.vision_rules(cfg.vision, "vision.", "vision_model."))
  return text, vision


# ----------------------------------------------------------------- file writing


def write_safetensors(state: Mapping[str, np.ndarray], out_dir: str,
                      max_shard_bytes: int = _MAX_SHARD_BYTES) -> list[str]:
  """`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards + the index
  transformers reads when the tensors exceed `max_shard_bytes`."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  for name in os.listdir(out_dir):  # a previous export's shards would be read as well
    if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")):
      os.remove(os.path.join(out_dir, name))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(state):
    value = np.ascontiguousarray(state[key])
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = value
    size += value.nbytes
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
  return names


def _write_json(obj: Mapping[str, Any], path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def image_processor(vision: VisionConfig, normalization: Optional[str] = None):
  """The transformers image processor of our image transform: resize to the tower's size
  (bicubic) and normalise with the tower's mean/std (`normalization` overrides). MoE-LLaVA
  pads images to a square with the mean colour first (`image_aspect_ratio="pad"`); a
  processor has no such step, so callers pad non-square images themselves."""
  import transformers
  from moe_vlm.data import images as images_lib

  norm = images_lib.get_normalization(normalization or vision.variant)
  s = vision.image_size
  kw = dict(image_mean=list(norm.mean), image_std=list(norm.std), resample=3)  # 3 = bicubic
  if vision.variant == "siglip":
    return transformers.SiglipImageProcessor(size={"height": s, "width": s}, **kw)
  return transformers.CLIPImageProcessor(size={"shortest_edge": s},
                                         crop_size={"height": s, "width": s}, **kw)


def prepare_tokenizer(tokenizer: Any, cfg: VLMConfig) -> Any:
  """A tokenizer (or its directory) whose `<image>` id is the model's image token."""
  if isinstance(tokenizer, (str, os.PathLike)):
    from moe_vlm.data import tokenizer as tokenizer_lib
    tokenizer = tokenizer_lib.load_tokenizer(os.fspath(tokenizer))
  if IMAGE_TOKEN not in tokenizer.get_vocab():
    # As training does (loop.ensure_image_token): pretrained tokenizers lack `<image>`.
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]},
                                 replace_extra_special_tokens=False)
  token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
  if token != cfg.image_token_id:
    raise ConversionError(f"tokenizer maps {IMAGE_TOKEN} to {token} but the model's "
                          f"image_token_id is {cfg.image_token_id}: not this model's tokenizer")
  return tokenizer


def _token_ids(tokenizer: Any) -> dict[str, int]:
  if tokenizer is None:
    return {}
  ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
             pad_token_id=tokenizer.pad_token_id)
  return {k: int(v) for k, v in ids.items() if v is not None}


# -------------------------------------------------------------------- export


def export_vlm(model: VLM, out_dir: str, *, layout: str = "auto", tokenizer: Any = None,
               normalization: Optional[str] = None, dtype: Optional[str] = None,
               mm_image_tower: Optional[str] = None, drop_lm_head_bias: bool = False,
               max_shard_bytes: int = _MAX_SHARD_BYTES) -> str:
  """Writes `model` to `out_dir` in `layout` (see module docstring); returns the layout.

  tokenizer: a tokenizer or its directory, saved beside the weights (with `<image>`).
  normalization: image mean/std set ("clip" / "siglip"); default: the tower's own.
  dtype: cast floating tensors ("bfloat16", "float16", "float32"); default: keep.
  mm_image_tower: moe_llava only, the path config.json names for the tower
    (default: the absolute path of `<out_dir>/image_tower`).
  """
  cfg = model.cfg
  if cfg.projector == "perceiver":
    raise ValueError("projector='perceiver' (IDEFICS2 resampler) has no place in the LLaVA "
                     "or MoE-LLaVA layouts; keep its Orbax checkpoint instead")
  layout = resolve_layout(cfg, layout)
  tok = None if tokenizer is None else prepare_tokenizer(tokenizer, cfg)
  os.makedirs(out_dir, exist_ok=True)
  if layout == "llava":
    _export_llava(model, out_dir, tok, normalization, dtype, drop_lm_head_bias, max_shard_bytes)
  else:
    _export_moe_llava(model, out_dir, tok, normalization, dtype, mm_image_tower, max_shard_bytes)
  save_config(cfg, os.path.join(out_dir, CONFIG_FILE))
  return layout


def _export_llava(model: VLM, out_dir: str, tok: Any, normalization: Optional[str],
                  dtype: Optional[str], drop_lm_head_bias: bool, max_shard_bytes: int) -> None:
  cfg = model.cfg
  hf_config = hf.vlm_config_to_hf(cfg, **_token_ids(tok))
  state = _cast(llava_state(model, drop_lm_head_bias=drop_lm_head_bias), dtype)
  hf_config.architectures = ["LlavaForConditionalGeneration"]
  hf_config.dtype = dtype or str(state["language_model.model.embed_tokens.weight"].dtype)
  hf_config.save_pretrained(out_dir)
  write_safetensors(state, out_dir, max_shard_bytes)
  processor = image_processor(cfg.vision, normalization)
  if tok is None:
    processor.save_pretrained(out_dir)
    return
  import transformers

  ids = _token_ids(tok)
  if ids:
    transformers.GenerationConfig(**ids).save_pretrained(out_dir)
  # AutoProcessor.from_pretrained(out_dir) then expands `<image>` to num_image_tokens copies.
  transformers.LlavaProcessor(
      image_processor=processor, tokenizer=tok, patch_size=cfg.vision.patch_size,
      vision_feature_select_strategy=cfg.vision_feature_select_strategy,
      image_token=IMAGE_TOKEN, num_additional_image_tokens=int(cfg.vision.class_token),
  ).save_pretrained(out_dir)


# MoE-LLaVA's names per family: (model_type suffix, class-name part), see its
# moellava/model/language_model/llava_*_moe.py. Qwen2 is its "qwen1_5" (Qwen1.5 = Qwen2
# architecture); its "qwen" classes are Qwen-1, a different key layout we do not write.
_MOE_LLAVA_FAMILIES = {"phi": ("phi", "Phi"), "stablelm": ("stablelm", "Stablelm"),
                       "qwen2": ("qwen1_5", "Qwen1_5"), "qwen2_moe": ("qwen1_5", "Qwen1_5"),
                       "llama": ("llama", "Llama"), "mistral": ("mistral", "Mistral")}
_HF_TYPE_OF_MOE_LLAVA = {"phi": "phi", "stablelm": "stablelm", "qwen1_5": "qwen2",
                         "llama": "llama", "mistral": "mistral"}


def _expert_modules(cfg: TextConfig) -> list[str]:
  return (["fc1", "fc2"] if cfg.mlp == "plain" else ["gate_proj", "up_proj", "down_proj"]) + ["wg"]


def moe_dict(cfg: TextConfig) -> dict[str, Any]:
  """config.json's `moe` entry as MoE-LLaVA's `initialize_moe_modules` leaves it."""
  moe = cfg.moe
  layers = list(cfg.moe_layers())
  # DeepSpeed 0.9.5 gating: top-2 renormalises over the pair, top-1 keeps the raw
  # probability, nothing else exists. Refuse what it would compute differently.
  if moe.top_k not in (1, 2) or moe.renormalize != (moe.top_k == 2):
    raise ConfigError(f"moe.top_k={moe.top_k}, renormalize={moe.renormalize}: DeepSpeed's "
                      "gating (MoE-LLaVA) has top-1 unnormalised and top-2 renormalised only")
  if moe.expert_intermediate_size not in (None, cfg.intermediate_size):
    raise ConfigError(f"moe.expert_intermediate_size={moe.expert_intermediate_size}: "
                      "MoE-LLaVA's experts are copies of the layer's MLP "
                      f"(intermediate_size={cfg.intermediate_size})")
  return dict(moe_enable=True, moe_mode=moe.moe_mode, moe_layers_idx=layers,
              num_experts=[moe.num_experts] * len(layers), ep_size=1,
              top_k_experts=moe.top_k, capacity_factor=moe.capacity_factor,
              eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
              use_residual=False, router_aux_loss_coef=moe.aux_loss_coef,
              train_modules=_expert_modules(cfg))


def moe_llava_config(cfg: VLMConfig, mm_image_tower: str,
                     token_ids: Mapping[str, int]) -> dict[str, Any]:
  """config.json of the moe_llava layout: the base LLM's config (transformers 5 fields plus
  the 4.x spellings MoE-LLaVA's pinned transformers reads), `moe`, and the `mm_*` keys."""
  text = cfg.text
  if text.family not in _MOE_LLAVA_FAMILIES:
    raise ConfigError(f"text.family={text.family!r}: MoE-LLaVA has no class for it")
  suffix, cls = _MOE_LLAVA_FAMILIES[text.family]
  base = hf.text_config_to_hf(dataclasses.replace(text, moe=None), **token_ids).to_dict()
  base.update(rope_theta=text.rope_theta, partial_rotary_factor=text.partial_rotary_factor)
  if text.family == "stablelm":  # StableLMEpochConfig spellings
    base.update(rope_pct=text.partial_rotary_factor, norm_eps=text.norm_eps)
  moe = text.moe is not None
  base.update(
      model_type=f"{'moe_llava' if moe else 'llava'}_{suffix}",
      architectures=[f"MoELLaVA{cls}ForCausalLM" if moe else f"Llava{cls}ForCausalLM"],
      mm_image_tower=mm_image_tower, mm_video_tower=None,
      image_projector_type=cfg.projector, mm_hidden_size=cfg.vision.hidden_size,
      mm_vision_select_layer=cfg.vision_feature_layer,
      mm_vision_select_feature=("patch" if cfg.vision_feature_select_strategy == "default"
                                else "cls_patch"),
      image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
      use_mm_proj=True, tune_mm_mlp_adapter=False, tokenizer_padding_side="right",
      # Ours only: MoE-LLaVA marks images with -200 in input_ids, not a vocabulary id.
      image_token_index=cfg.image_token_id)
  if moe:
    base["moe"] = moe_dict(text)
  return base


def _export_moe_llava(model: VLM, out_dir: str, tok: Any, normalization: Optional[str],
                      dtype: Optional[str], mm_image_tower: Optional[str],
                      max_shard_bytes: int) -> None:
  cfg = model.cfg
  tower_dir = os.path.join(out_dir, IMAGE_TOWER_DIR)
  config = moe_llava_config(cfg, mm_image_tower or os.path.abspath(tower_dir), _token_ids(tok))
  text, vision = moe_llava_state(model)
  text, vision = _cast(text, dtype), _cast(vision, dtype)
  # transformers 5 reads `dtype`, MoE-LLaVA's 4.x `torch_dtype`.
  config["dtype"] = config["torch_dtype"] = dtype or str(text["model.embed_tokens.weight"].dtype)
  _write_json(config, os.path.join(out_dir, "config.json"))
  write_safetensors(text, out_dir, max_shard_bytes)
  vision_config = hf.vision_config_to_hf(cfg.vision)
  vision_config.architectures = ["CLIPVisionModel" if cfg.vision.variant == "clip"
                                 else "SiglipVisionModel"]
  vision_config.save_pretrained(tower_dir)
  write_safetensors(vision, tower_dir, max_shard_bytes)
  image_processor(cfg.vision, normalization).save_pretrained(tower_dir)
  if tok is not None:
    tok.save_pretrained(out_dir)


# -------------------------------------------------------------------- import


def import_vlm(path: str, *, dtype: str = "float32",
               image_token_id: Optional[int] = None) -> VLM:
  """A directory written by `export_vlm` (or by transformers / MoE-LLaVA) -> our VLM.

  The architecture comes from config.json. When `moe_vlm_config.json` is there and
  describes the same architecture, its config is used as a whole (dispatch, capacity,
  dtypes, remat come back as exported), so export + import is exact.
  image_token_id: for MoE-LLaVA checkpoints, whose config has none of ours.
  """
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  mt = raw.get("model_type", "")
  if mt == "llava":
    state = hf.fuse_unfused_experts(hf.canonical_llava_keys(hf.load_safetensors(path)))
    derived = hf.vlm_config_from_hf(hf.load_hf_config(path), dtype)
    vprefix = hf._vision_prefix(state, "model.vision_tower.")  # pylint: disable=protected-access
    rules = lambda c: keymap.llava_rules(c, vprefix)
    # SigLIP's pooling head and Qwen2-MoE's size-0 shared expert have no counterpart.
    ignore = [f"{vprefix}head."] + [k for k in state if ".shared_expert" in k]
  elif mt.startswith(("moe_llava_", "llava_")):
    state, derived, vprefix = _read_moe_llava(path, raw, dtype, image_token_id)
    rules = lambda c: (keymap.text_rules(c.text, "llm.", "model.", "lm_head", "moe_llava")
                       + keymap.moe_llava_projector_rules(c.projector)
                       + keymap.vision_rules(c.vision, "vision.", vprefix))
    # A copy of the tower inside the LLM checkpoint is ignored: the reference reloads the
    # tower from mm_image_tower anyway.
    ignore = [f"{vprefix}head.", "model.image_tower."]
  else:
    raise ConversionError(f"{path}: model_type={mt!r}; expected 'llava' or MoE-LLaVA's "
                          "'moe_llava_<family>' / 'llava_<family>'")
  cfg = _prefer_saved(os.path.join(path, CONFIG_FILE), derived)
  if cfg.text.tie_embeddings:
    ignore.append("lm_head.")
  # Built abstractly and filled by the strict loader: no random init to throw away.
  model = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  hf.load_weights(model, state, rules(cfg), ignore)
  return model


def _prefer_saved(saved_path: str, derived: VLMConfig) -> VLMConfig:
  if not os.path.exists(saved_path):
    return derived
  saved = load_config(saved_path)
  if _architecture(saved) != _architecture(derived):
    log.warning("%s describes another architecture than config.json (edited, or a dropped "
                "lm_head bias): using config.json", saved_path)
    return derived
  return saved


def _moe_llava_text_config(raw: Mapping[str, Any], dtype: str) -> TextConfig:
  import transformers

  family = raw["model_type"].split("llava_", 1)[1]
  if family not in _HF_TYPE_OF_MOE_LLAVA:
    raise ConversionError(f"MoE-LLaVA family {family!r} is not supported (Qwen-1 'qwen' uses "
                          f"another key layout); supported: {sorted(_HF_TYPE_OF_MOE_LLAVA)}")
  base = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "moe")
          and not k.startswith(("mm_", "image_", "video_"))}
  if "rope_pct" in base:  # StableLMEpochConfig spellings
    base.setdefault("partial_rotary_factor", base.pop("rope_pct"))
    base.setdefault("layer_norm_eps", base.pop("norm_eps", 1e-5))
  hf_text = transformers.AutoConfig.for_model(_HF_TYPE_OF_MOE_LLAVA[family], **base)
  text = hf.text_config_from_hf(hf_text, dtype)
  moe = raw.get("moe")
  if not moe or not moe.get("moe_enable", True):
    return text
  if moe.get("use_residual"):
    raise ConversionError("moe.use_residual=True (residual MoE) is not supported")
  counts = set(moe["num_experts"]) if isinstance(moe["num_experts"], list) else {moe["num_experts"]}
  if len(counts) != 1:
    raise ConversionError(f"moe.num_experts={moe['num_experts']}: layers with different "
                          "expert counts are not supported")
  top_k = int(moe["top_k_experts"])
  return dataclasses.replace(text, moe=MoEConfig(
      num_experts=counts.pop(), top_k=top_k, moe_layers_idx=tuple(moe["moe_layers_idx"]),
      dispatch="capacity", capacity_factor=float(moe["capacity_factor"]),
      eval_capacity_factor=float(moe["eval_capacity_factor"]),
      min_capacity=int(moe["min_capacity"]), renormalize=top_k == 2,
      aux_loss_coef=float(moe.get("router_aux_loss_coef", 0.01))))


def _tower_dir(path: str, raw: Mapping[str, Any]) -> str:
  local = os.path.join(path, IMAGE_TOWER_DIR)
  if os.path.isdir(local):
    return local
  named = raw.get("mm_image_tower") or ""
  if os.path.isdir(named):
    return named
  raise ConversionError(f"{path}: no {IMAGE_TOWER_DIR}/ and mm_image_tower={named!r} is not a "
                        "local directory; download the vision tower and point mm_image_tower "
                        "at it")


def _image_token_id(path: str, raw: Mapping[str, Any], given: Optional[int]) -> int:
  if given is not None:
    return given
  if raw.get("image_token_index") is not None:
    return int(raw["image_token_index"])
  if any(os.path.exists(os.path.join(path, n)) for n in _TOKENIZER_FILES):
    from moe_vlm.data import tokenizer as tokenizer_lib
    return tokenizer_lib.image_token_id(tokenizer_lib.load_tokenizer(path))
  raise ConversionError(f"{path}: no image_token_index in config.json and no tokenizer with "
                        f"{IMAGE_TOKEN}; pass image_token_id")


def _read_moe_llava(path: str, raw: Mapping[str, Any], dtype: str,
                    image_token_id: Optional[int]) -> tuple[dict, VLMConfig, str]:
  """(state with the tower's tensors under `image_tower.`, config, tower key prefix)."""
  state = hf.load_safetensors(path)
  text = _moe_llava_text_config(raw, dtype)
  # MoE-LLaVA's Phi classes build lm_head without bias; follow the checkpoint.
  text = dataclasses.replace(text, lm_head_bias="lm_head.bias" in state)
  tower = _tower_dir(path, raw)
  vision = hf.vision_config_from_hf(hf.load_hf_config(tower), dtype)
  vstate = hf.load_safetensors(tower)
  vprefix = "image_tower." + hf._vision_prefix(vstate, "")  # pylint: disable=protected-access
  state.update({f"image_tower.{k}": v for k, v in vstate.items()})
  strategy = {"patch": "default", "cls_patch": "full"}[raw.get("mm_vision_select_feature", "patch")]
  cfg = VLMConfig(vision=vision, text=text, projector=raw.get("image_projector_type", "linear"),
                  vision_feature_layer=int(raw["mm_vision_select_layer"]),
                  vision_feature_select_strategy=strategy,
                  image_token_id=_image_token_id(path, raw, image_token_id))
  return state, cfg, vprefix


# ------------------------------------------- our checkpoints (moe-vlm convert)

# A converted checkpoint directory (from_hf's output, to_hf's `ckpt` input):
#   params/              flat params dict (Orbax, checkpoint.save_params)
#   moe_vlm_config.json  its VLMConfig
#   tokenizer/           the tokenizer, when the source had one
#   preprocessor_config.json  the image processor (mean/std), when the source had one


def load_params_model(cfg: VLMConfig, params_dir: str) -> VLM:
  """A VLM from a flat params checkpoint (`<workdir>/stage<k>/final`, or `from_hf`'s)."""
  from moe_vlm.train import checkpoint as ckpt_lib

  codec = ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  return codec.merge(ckpt_lib.load_params(params_dir, codec.shapes))


def experiment_model(c: Any, workdir: str, stage: int,
                     tokenizer_dir: Optional[str] = None) -> tuple[VLMConfig, Any, Optional[str]]:
  """(VLMConfig, tokenizer, image normalisation) of a stage, built as `train` builds them
  from the experiment config, without touching the data (no synthetic generation)."""
  from moe_vlm.data import tokenizer as tokenizer_lib
  from moe_vlm.train import loop

  # The tokenizer lookup of loop.prepare_data.
  data_dir = c.data.dir or os.path.join(workdir, "data")
  tok_dir = (tokenizer_dir or c.data.tokenizer or c.init.hf_llm
             or os.path.join(data_dir, "tokenizer"))
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  dense = loop.model_config(c, tokenizer)  # adds <image> to the tokenizer as training did
  return loop.stage_model_config(c, dense, stage), tokenizer, c.data.get("normalization")


def to_hf(out_dir: str, *, workdir: Optional[str] = None, stage: int = 3, config: Any = None,
          vlm_config: Optional[str] = None, ckpt: Optional[str] = None,
          tokenizer: Optional[str] = None, normalization: Optional[str] = None,
          **export_kw: Any) -> str:
  """Exports `<workdir>/stage<stage>/final` or a converted checkpoint `ckpt`; returns the
  layout written. The config: `vlm_config` (a VLMConfig JSON; `ckpt` has its own), else
  the experiment config `config`, else the `config.json` that `train` wrote in `workdir`."""
  if ckpt:
    params_dir = os.path.join(ckpt, "params")
    vlm_config = vlm_config or os.path.join(ckpt, CONFIG_FILE)
    local = os.path.join(ckpt, "tokenizer")
    tokenizer = tokenizer or (local if os.path.isdir(local) else None)
  elif workdir:
    params_dir = os.path.join(workdir, f"stage{stage}", "final")
  else:
    raise ValueError("to_hf needs a workdir or a converted checkpoint (ckpt)")
  if vlm_config:
    cfg = load_config(vlm_config)
  else:
    if config is None:
      import ml_collections
      path = os.path.join(workdir or "", "config.json")
      if not os.path.exists(path):
        raise ValueError(f"no experiment config given and no {path}: pass one, or a "
                         "VLMConfig JSON")
      with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    cfg, tokenizer, norm = experiment_model(config, workdir or "", stage, tokenizer)
    normalization = normalization or norm
  return export_vlm(load_params_model(cfg, params_dir), out_dir, tokenizer=tokenizer,
                    normalization=normalization, **export_kw)


def from_hf(hf_dir: str, out_dir: str, *, dtype: str = "float32",
            image_token_id: Optional[int] = None) -> VLMConfig:
  """An exported / HF / MoE-LLaVA directory -> a converted checkpoint in `out_dir`."""
  from moe_vlm.train import checkpoint as ckpt_lib

  model = import_vlm(hf_dir, dtype=dtype, image_token_id=image_token_id)
  os.makedirs(out_dir, exist_ok=True)
  ckpt_lib.save_params(os.path.join(out_dir, "params"),
                       ckpt_lib.to_host(ParamCodec(model).flatten(model)))
  save_config(model.cfg, os.path.join(out_dir, CONFIG_FILE))
  names = [n for n in _TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]
  if names:
    os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
    for n in names:
      shutil.copy2(os.path.join(hf_dir, n), os.path.join(out_dir, "tokenizer", n))
  # The image mean/std the model was trained with, for inference on the checkpoint.
  if os.path.exists(os.path.join(hf_dir, PROCESSOR_FILE)):
    shutil.copy2(os.path.join(hf_dir, PROCESSOR_FILE), os.path.join(out_dir, PROCESSOR_FILE))
  return model.cfg
