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
- "qwen2_vl": a `Qwen2VLForConditionalGeneration` directory (a Qwen2-VL model of ours:
  `vision.variant="qwen2_vl"`), with its `Qwen2VLImageProcessor` (the pixel budget).
"auto" takes "qwen2_vl" for a Qwen2-VL model; else "llava" whenever transformers can
express the model, else "moe_llava".

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
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import jax
import numpy as np
from flax import nnx

from moe_vlm import experiment, files
from moe_vlm.convert import hf, keymap, released, safetensors_io
from moe_vlm.convert.hf import ConversionError
from moe_vlm.models import config as config_lib
from moe_vlm.models.config import (ConfigError, MoEConfig, TextConfig,
                                   VisionConfig, VLMConfig)
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement

log = logging.getLogger("moe_vlm")

LAYOUTS = ("auto", "llava", "moe_llava", "qwen2_vl")
# A converted checkpoint's layout belongs to moe_vlm.experiment (params/, tokenizer/, ...).
CONFIG_FILE, PROCESSOR_FILE = experiment.CKPT_CONFIG, experiment.CKPT_PROCESSOR
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
  if vision.native:  # Qwen2-VL's tower reads no image_size (its budget is max_pixels)
    vision = dataclasses.replace(vision, image_size=VisionConfig.image_size)
  return dataclasses.replace(cfg, text=text, vision=vision)


# ------------------------------------------------------------------- layouts


def resolve_layout(cfg: VLMConfig, layout: str = "auto") -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
  if layout == "qwen2_vl" and not cfg.vision.native:
    raise ConfigError(f"layout='qwen2_vl' needs a qwen2_vl vision tower, got vision.variant="
                      f"{cfg.vision.variant!r}")
  if cfg.vision.native and layout not in ("auto", "qwen2_vl"):
    raise ConfigError(f"layout={layout!r}: a Qwen2-VL model (vision.variant='qwen2_vl') "
                      "exports as layout='qwen2_vl'")
  if layout != "auto":
    return layout
  if cfg.vision.native:
    return "qwen2_vl"
  try:
    hf.vlm_config_to_hf(cfg)
    return "llava"
  except ConfigError as e:
    log.info("no native transformers class for this model (%s): using the moe_llava layout", e)
    return "moe_llava"


def _caster(dtype: Optional[str]):
  """array -> array with floating tensors cast to `dtype` (None keeps them as they are)."""
  if not dtype:
    return lambda v: v
  import ml_dtypes  # numpy has no bfloat16 of its own

  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  floating = lambda dt: dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)
  return lambda v: v.astype(target) if floating(v.dtype) else v


def _cast(tensors: Iterable[tuple[str, np.ndarray]],
          dtype: Optional[str]) -> Iterator[tuple[str, np.ndarray]]:
  cast = _caster(dtype)
  return ((k, cast(v)) for k, v in tensors)


def _lm_head_bias_ok(bias: np.ndarray, drop: bool) -> None:
  """LLaVA's lm_head has no bias: a zero bias is dropped (exact), others only on request."""
  if not np.any(bias.astype(np.float32)) or drop:
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


def _unfuse(key: str, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
  """One fused tensor -> transformers 5's per-expert ones (see `unfuse_experts`)."""
  head, sep, tail = key.partition(".mlp.experts.")
  if sep and tail == "gate_up_proj":
    f = value.shape[1] // 2
    for e in range(value.shape[0]):
      yield f"{head}.mlp.experts.{e}.gate_proj.weight", value[e, :f]
      yield f"{head}.mlp.experts.{e}.up_proj.weight", value[e, f:]
  elif sep and tail == "down_proj":
    for e in range(value.shape[0]):
      yield f"{head}.mlp.experts.{e}.down_proj.weight", value[e]
  else:
    yield key, value


def unfuse_experts(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Fused `mlp.experts.gate_up_proj [E, 2F, D]` / `down_proj [E, D, F]` -> one tensor per
  expert and projection, as transformers 5 writes them: the inverse of
  `hf.fuse_unfused_experts`."""
  return dict(kv for key, value in state.items() for kv in _unfuse(key, value))


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


# A tensor source: our parameter name -> its value on the host. Export asks for one
# tensor at a time (a sharded model is gathered tensor by tensor: `params_source`).
Source = Callable[[str], np.ndarray]


def model_source(model: VLM) -> Source:
  flat = hf.flat_params(model)
  return lambda name: placement.host_value(flat[name][...])


def params_source(params: Mapping[str, jax.Array]) -> Source:
  """Flat params, possibly sharded over other processes: every process must consume the
  export stream in the same order (each tensor is all-gathered when it is needed)."""
  return lambda name: placement.host_value(params[name])


def llava_tensors(get: Source, cfg: VLMConfig, *,
                  drop_lm_head_bias: bool = False) -> Iterator[tuple[str, np.ndarray]]:
  """The tensors of `LlavaForConditionalGeneration.save_pretrained`, by on-disk name,
  one at a time."""
  dtype = np.dtype(cfg.text.param_dtype)
  for key, value in hf.export_tensors(get, keymap.llava_rules(cfg)):
    if key == "lm_head.bias":
      _lm_head_bias_ok(value, drop_lm_head_bias)
      continue
    for k, v in _unfuse(key, value):
      yield next(iter(llava_disk_keys({k: v}).items()))
  if cfg.text.moe is not None:
    shared = _empty_shared_experts(cfg.text, "model.language_model.", dtype)
    yield from llava_disk_keys(shared).items()


def llava_state(model: VLM, *, drop_lm_head_bias: bool = False) -> dict[str, np.ndarray]:
  """`llava_tensors` of a model, as a dict."""
  return dict(llava_tensors(model_source(model), model.cfg,
                            drop_lm_head_bias=drop_lm_head_bias))


def moe_llava_rules(cfg: VLMConfig, qwen1: bool = False) -> list[keymap.Rule]:
  """LLM + projector rules of MoE-LLaVA's layout; `qwen1`: its Qwen-1 classes' names
  (`transformer.*`, see `keymap.qwen1_text_rules`)."""
  if qwen1:
    return (keymap.qwen1_text_rules(cfg.text, "llm.")
            + keymap.moe_llava_projector_rules(
                cfg.projector, hf="transformer.mm_projector.image_spatial_proj"))
  return (keymap.text_rules(cfg.text, "llm.", "model.", "lm_head", "moe_llava")
          + keymap.moe_llava_projector_rules(cfg.projector))


def moe_llava_tensors(get: Source, cfg: VLMConfig, part: str,
                      qwen1: bool = False) -> Iterator[tuple[str, np.ndarray]]:
  """part "text": LLM + projector tensors by MoE-LLaVA name; "vision": the vision tower's
  by CLIPVisionModel name, keeping the `vision_model.` prefix that transformers 4.x
  (MoE-LLaVA's) needs and 5.x accepts; "tower_copy": the tower as the released
  checkpoints carry it beside the LLM (`model.image_tower.image_tower.vision_model.*`)."""
  if part == "text":
    rules = moe_llava_rules(cfg, qwen1)
  elif part == "tower_copy":
    base = released.TOWER_COPIES[1] if qwen1 else released.TOWER_COPY
    rules = keymap.vision_rules(cfg.vision, "vision.", base + "vision_model.")
  else:
    rules = keymap.vision_rules(cfg.vision, "vision.", "vision_model.")
  return hf.export_tensors(get, rules)


def moe_llava_state(model: VLM) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """`moe_llava_tensors` of a model: (text + projector, vision tower) dicts."""
  get = model_source(model)
  return (dict(moe_llava_tensors(get, model.cfg, "text")),
          dict(moe_llava_tensors(get, model.cfg, "vision")))


# ----------------------------------------------------------------- file writing


def write_safetensors(state: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      out_dir: str, max_shard_bytes: int = _MAX_SHARD_BYTES) -> list[str]:
  """`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards + the index
  transformers reads when the tensors exceed `max_shard_bytes`. Tensors are streamed to
  disk one at a time. With several processes all consume the stream (the tensors may
  be gathered from all of them) and process 0 writes."""
  if jax.process_index() == 0:
    return safetensors_io.write(state, out_dir, max_shard_bytes)
  for _ in (state.items() if isinstance(state, Mapping) else state):
    pass
  return []


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
  from moe_vlm.data import tiktoken_tokenizer

  if isinstance(tokenizer, (str, os.PathLike)):
    from moe_vlm.data import tokenizer as tokenizer_lib
    tokenizer = tokenizer_lib.load_tokenizer(os.fspath(tokenizer))
  if isinstance(tokenizer, tiktoken_tokenizer.TiktokenTokenizer):
    raise ConversionError(f"the {tokenizer.spec.name} tokenizer is a tiktoken file that "
                          "transformers reads only with remote code: the llava layout cannot "
                          "carry it; export with --layout moe_llava, or pass --tokenizer DIR")
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


def export_vlm(model: VLM, out_dir: str, **kw: Any) -> str:
  """Writes `model` to `out_dir` (see `export_params` for the options); returns the
  layout written."""
  return export_params(model_source(model), model.cfg, out_dir, **kw)


def export_params(get: Source, cfg: VLMConfig, out_dir: str, *, layout: str = "auto",
                  tokenizer: Any = None, normalization: Optional[str] = None,
                  dtype: Optional[str] = None, mm_image_tower: Optional[str] = None,
                  drop_lm_head_bias: bool = False, overwrite: bool = False,
                  source: Optional[released.SourceRecord] = None,
                  max_shard_bytes: int = _MAX_SHARD_BYTES) -> str:
  """Writes the model of config `cfg` whose parameters `get` returns (one at a time) to
  `out_dir` in `layout` (see module docstring); returns the layout.

  tokenizer: a tokenizer or its directory, saved beside the weights: for "llava" with
    `<image>` added (LlavaProcessor needs it); for "moe_llava" a directory's tokenizer
    files are copied unchanged (MoE-LLaVA's loader reads them: vocab.json + merges.txt,
    arcade100k.tiktoken, ...).
  normalization: image mean/std set ("clip" / "siglip"); default: the tower's own.
  dtype: cast floating tensors ("bfloat16", "float16", "float32"); default: keep (with
    `source`: each tensor's dtype on disk in the source).
  mm_image_tower: moe_llava only, the tower name config.json gives MoE-LLaVA (default:
    the source's, else the hub name of a known tower architecture, else the absolute
    path of `<out_dir>/image_tower`, which MoE-LLaVA's builder refuses: see README).
  source: what `from_hf` remembered of a MoE-LLaVA directory (`released.SourceRecord`):
    an unchanged model is written back as it was (layout, config.json, tensors and their
    dtypes, side files).
  overwrite: replace a non-empty `out_dir` (else it is refused). The files are written
    into a temporary directory that becomes `out_dir` only when complete.
  With several processes, all of them call this (each tensor is gathered from the
  shards of all) and process 0 writes.
  """
  if cfg.projector == "perceiver":
    raise ValueError("projector='perceiver' (IDEFICS2 resampler) has no place in the LLaVA "
                     "or MoE-LLaVA layouts; keep its Orbax checkpoint instead")
  layout = resolve_layout(cfg, source.layout if layout == "auto" and source else layout)
  final = os.path.abspath(out_dir)
  with files.output_dir(final, overwrite=overwrite) as tmp:
    if layout == "qwen2_vl":
      _export_qwen2_vl(get, cfg, tmp, tokenizer, normalization, dtype, max_shard_bytes)
    elif layout == "llava":
      tok = None if tokenizer is None else prepare_tokenizer(tokenizer, cfg)
      _export_llava(get, cfg, tmp, tok, normalization, dtype, drop_lm_head_bias,
                    max_shard_bytes)
    else:
      _export_moe_llava(get, cfg, tmp, final, tokenizer, normalization, dtype,
                        mm_image_tower, source, max_shard_bytes)
    if jax.process_index() == 0:
      save_config(cfg, os.path.join(tmp, CONFIG_FILE))
  return layout


def _export_llava(get: Source, cfg: VLMConfig, out_dir: str, tok: Any,
                  normalization: Optional[str], dtype: Optional[str], drop_lm_head_bias: bool,
                  max_shard_bytes: int) -> None:
  write_safetensors(_cast(llava_tensors(get, cfg, drop_lm_head_bias=drop_lm_head_bias), dtype),
                    out_dir, max_shard_bytes)
  if jax.process_index() != 0:
    return
  hf_config = hf.vlm_config_to_hf(cfg, **_token_ids(tok))
  hf_config.architectures = ["LlavaForConditionalGeneration"]
  hf_config.dtype = dtype or cfg.text.param_dtype
  hf_config.save_pretrained(out_dir)
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


_QWEN2_VL_MEMORY_TO_DISK = tuple((mem, disk) for disk, mem in hf._QWEN2_VL_DISK_PREFIXES)  # pylint: disable=protected-access


def qwen2_vl_tensors(get: Source, cfg: VLMConfig) -> Iterator[tuple[str, np.ndarray]]:
  """The tensors of `Qwen2VLForConditionalGeneration.save_pretrained`, by on-disk name
  (`model.*` decoder, `visual.*` tower and merger, `lm_head`), one at a time."""
  for key, value in hf.export_tensors(get, keymap.qwen2_vl_rules(cfg)):
    yield next(iter(hf.rename_prefixes({key: value}, _QWEN2_VL_MEMORY_TO_DISK).items()))


def qwen2_vl_image_processor(vision: VisionConfig, normalization: Optional[str] = None):
  """transformers' Qwen2VLImageProcessor of our patch transform (`data.images`): the
  pixel budget, patch, merge and temporal sizes and the mean/std (default CLIP's, which
  Qwen2-VL uses)."""
  import transformers
  from moe_vlm.data import images as images_lib

  norm = images_lib.get_normalization(normalization or "clip")
  return transformers.Qwen2VLImageProcessor(
      min_pixels=vision.min_pixels, max_pixels=vision.max_pixels,
      patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
      temporal_patch_size=vision.temporal_patch_size, image_mean=list(norm.mean),
      image_std=list(norm.std))


def _export_qwen2_vl(get: Source, cfg: VLMConfig, out_dir: str, tokenizer: Any,
                     normalization: Optional[str], dtype: Optional[str],
                     max_shard_bytes: int) -> None:
  """A directory `Qwen2VLForConditionalGeneration.from_pretrained` loads (no remote code).
  The tokenizer is saved as it is: with Qwen2-VL's own (`<|image_pad|>` = the image id)
  a `Qwen2VLProcessor` is written too, which expands images to their merged-patch count."""
  write_safetensors(_cast(qwen2_vl_tensors(get, cfg), dtype), out_dir, max_shard_bytes)
  if jax.process_index() != 0:
    return
  import transformers
  from moe_vlm.data import tokenizer as tokenizer_lib

  tok = tokenizer
  if isinstance(tokenizer, (str, os.PathLike)):
    tok = tokenizer_lib.load_tokenizer(os.fspath(tokenizer))
  hf_config = hf.qwen2_vl_config_to_hf(cfg, **_token_ids(tok))
  hf_config.architectures = ["Qwen2VLForConditionalGeneration"]
  hf_config.dtype = dtype or cfg.text.param_dtype
  hf_config.save_pretrained(out_dir)
  processor = qwen2_vl_image_processor(cfg.vision, normalization)
  processor.save_pretrained(out_dir)
  if tok is None:
    return
  ids = _token_ids(tok)
  if ids:
    transformers.GenerationConfig(**ids).save_pretrained(out_dir)
  if tok.get_vocab().get("<|image_pad|>") == cfg.image_token_id:
    transformers.Qwen2VLProcessor(image_processor=processor, tokenizer=tok).save_pretrained(
        out_dir)
  else:
    log.info("the tokenizer has no <|image_pad|> at the image id %d: saved without a "
             "Qwen2VLProcessor (expand each image to its merged-patch count of id %d)",
             cfg.image_token_id, cfg.image_token_id)
    tok.save_pretrained(out_dir)


# MoE-LLaVA's names per family: (model_type suffix, class-name part), see its
# moellava/model/language_model/llava_*_moe.py. Qwen2 is its "qwen1_5" (Qwen1.5 = Qwen2
# architecture); its "qwen" classes are Qwen-1, a different key layout that we read, and
# write only back to an unchanged Qwen-1 source (`keymap.qwen1_text_rules`).
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


def _tower_name(cfg: VLMConfig, given: Optional[str],
                source: Optional[released.SourceRecord]) -> Optional[str]:
  """mm_image_tower: `given`, else the source's hub name, else a known tower's name."""
  if given:
    return given
  remembered = (source.config.get("mm_image_tower") or "") if source else ""
  if remembered.startswith(released.HUB_PREFIXES):
    return remembered
  return released.known_tower_name(cfg.vision)


def _same_architecture(raw: Mapping[str, Any], cfg: VLMConfig) -> bool:
  """Whether a MoE-LLaVA config.json describes `cfg`'s LLM, projector and wiring."""
  try:
    text = dataclasses.replace(_moe_llava_text_config(raw, cfg.text.param_dtype),
                               lm_head_bias=cfg.text.lm_head_bias)
  except (ConversionError, ConfigError, KeyError, TypeError, ValueError):
    return False
  strategy = {"patch": "default", "cls_patch": "full"}.get(
      raw.get("mm_vision_select_feature", "patch"))
  theirs = dataclasses.replace(
      cfg, text=text, projector=raw.get("image_projector_type", "linear"),
      vision_feature_layer=raw.get("mm_vision_select_layer"),
      vision_feature_select_strategy=strategy)
  return (_architecture(theirs) == _architecture(cfg)
          and raw.get("mm_hidden_size") == cfg.vision.hidden_size)


def _tokenizer_names(path: str) -> list[str]:
  from moe_vlm.data import tiktoken_tokenizer

  names = list(_TOKENIZER_FILES) + tiktoken_tokenizer.tokenizer_files(path)
  return [n for n in dict.fromkeys(names) if os.path.isfile(os.path.join(path, n))]


def _check_image_row(tok: Any, cfg: VLMConfig) -> None:
  """MoE-LLaVA's tokenizer never produces our image id: it is `<image>` or past it."""
  from moe_vlm.data import tokenizer as tokenizer_lib

  token = tok.get_vocab().get(tokenizer_lib.IMAGE)
  if token is None and cfg.image_token_id < len(tok):
    log.warning("image_token_id=%d is inside the tokenizer's %d ids", cfg.image_token_id,
                len(tok))
  elif token is not None and token != cfg.image_token_id:
    raise ConversionError(f"tokenizer maps {IMAGE_TOKEN} to {token} but the model's "
                          f"image_token_id is {cfg.image_token_id}: not this model's tokenizer")


def _export_moe_llava(get: Source, cfg: VLMConfig, out_dir: str, final: str, tokenizer: Any,
                      normalization: Optional[str], dtype: Optional[str],
                      mm_image_tower: Optional[str], source: Optional[released.SourceRecord],
                      max_shard_bytes: int) -> None:
  from moe_vlm.data import tokenizer as tokenizer_lib

  name = _tower_name(cfg, mm_image_tower, source)
  if name is None:
    name = os.path.join(final, IMAGE_TOWER_DIR)
    log.warning("the vision tower is none of MoE-LLaVA's hub towers (%s): wrote it to %s and "
                "named that path in mm_image_tower, which MoE-LLaVA's build_image_tower "
                "refuses (it takes names starting with %s); pass --mm_image_tower",
                ", ".join(released.KNOWN_TOWERS), name, "/".join(released.HUB_PREFIXES))
  elif not name.startswith(released.HUB_PREFIXES) and not os.path.isdir(name):
    log.warning("mm_image_tower=%r: MoE-LLaVA's build_image_tower takes only names starting "
                "with %s", name, "/".join(released.HUB_PREFIXES))
  same = source is not None and _same_architecture(source.config, cfg)
  # Qwen-1's names only for an unchanged Qwen-1 source (a changed one is written with the
  # model's own config: Qwen1.5's classes).
  qwen1 = same and source.config.get("model_type") == "moe_llava_qwen"
  cast = _caster(dtype)
  disk_dtypes = {} if dtype or source is None else source.dtypes

  def on_disk(tensors):
    for key, value in tensors:
      want = disk_dtypes.get(key)
      yield key, (value.astype(safetensors_io.numpy_dtype(want)) if want else cast(value))

  def weights():
    yield from moe_llava_tensors(get, cfg, "text", qwen1)
    yield from moe_llava_tensors(get, cfg, "tower_copy", qwen1)
    if source is not None:
      yield from source.extra.items()

  write_safetensors(on_disk(weights()), out_dir, max_shard_bytes)
  tower_dir = os.path.join(out_dir, IMAGE_TOWER_DIR)
  if name == os.path.join(final, IMAGE_TOWER_DIR):
    write_safetensors(_cast(moe_llava_tensors(get, cfg, "vision"), dtype), tower_dir,
                      max_shard_bytes)
  if jax.process_index() != 0:
    return
  tok = tokenizer
  if isinstance(tokenizer, (str, os.PathLike)):
    tok = tokenizer_lib.load_tokenizer(os.fspath(tokenizer))
  if tok is not None:
    _check_image_row(tok, cfg)
  if same:
    config = dict(source.config)  # unchanged model: the source's config.json, as it was
    if mm_image_tower or not (config.get("mm_image_tower") or "").startswith(
        released.HUB_PREFIXES):
      config["mm_image_tower"] = name
  else:
    if source is not None:
      log.warning("the model's architecture differs from the source's config.json: "
                  "writing the config of the model, with the source's other fields")
    config = {**(source.config if source else {}),
              **moe_llava_config(cfg, name, _token_ids(tok))}
    # transformers 5 reads `dtype`, MoE-LLaVA's 4.x `torch_dtype`.
    config["dtype"] = config["torch_dtype"] = dtype or cfg.text.param_dtype
  _write_json(config, os.path.join(out_dir, "config.json"))
  for file, content in (source.files if source else {}).items():
    _write_json(content, os.path.join(out_dir, file))
  if os.path.isdir(tower_dir):
    vision_config = hf.vision_config_to_hf(cfg.vision)
    vision_config.architectures = ["CLIPVisionModel" if cfg.vision.variant == "clip"
                                   else "SiglipVisionModel"]
    vision_config.save_pretrained(tower_dir)
    image_processor(cfg.vision, normalization).save_pretrained(tower_dir)
  if isinstance(tokenizer, (str, os.PathLike)):
    # MoE-LLaVA's loader reads the original files (use_fast=False for Phi and Qwen1.5:
    # vocab.json + merges.txt; Arcade100kTokenizer: arcade100k.tiktoken): copy them.
    for n in _tokenizer_names(os.fspath(tokenizer)):
      shutil.copy2(os.path.join(tokenizer, n), os.path.join(out_dir, n))
  elif tok is not None:
    tok.save_pretrained(out_dir)


# -------------------------------------------------------------------- import


def import_vlm(path: str, *, dtype: str = "float32", image_token_id: Optional[int] = None,
               image_tower: Optional[str] = None) -> VLM:
  """A directory written by `export_vlm` (or by transformers / MoE-LLaVA) -> our VLM.

  The architecture comes from config.json. When `moe_vlm_config.json` is there and
  describes the same architecture, its config is used as a whole (dispatch, capacity,
  dtypes, remat come back as exported), so export + import is exact.
  image_token_id: for MoE-LLaVA checkpoints, whose tokenizers have no `<image>` (default:
    the reserved row `len(tokenizer)`, see `moe_vlm.convert.released`).
  image_tower: MoE-LLaVA, a local vision tower directory (default: `mm_image_tower` when it
    is a local directory, else the weights' own copy of the tower).
  """
  return import_with_source(path, dtype=dtype, image_token_id=image_token_id,
                            image_tower=image_tower)[0]


def import_with_source(path: str, *, dtype: str = "float32",
                       image_token_id: Optional[int] = None, image_tower: Optional[str] = None
                       ) -> tuple[VLM, Optional[released.SourceRecord]]:
  """`import_vlm`, plus for a MoE-LLaVA directory what an export needs to write it back
  unchanged (`released.SourceRecord`)."""
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  mt = raw.get("model_type", "")
  source = None
  if mt == "qwen2_vl":
    state = hf.canonical_qwen2_vl_keys(hf.load_safetensors(path))
    derived = hf.qwen2_vl_config_from_hf(hf.load_hf_config(path), dtype,
                                         **hf.pixel_budget(path))
    rules = keymap.qwen2_vl_rules
    ignore = []
  elif mt == "llava":
    state = hf.fuse_unfused_experts(hf.canonical_llava_keys(hf.load_safetensors(path)))
    derived = hf.vlm_config_from_hf(hf.load_hf_config(path), dtype)
    vprefix = hf._vision_prefix(state, "model.vision_tower.")  # pylint: disable=protected-access
    rules = lambda c: keymap.llava_rules(c, vprefix)
    # SigLIP's pooling head and Qwen2-MoE's size-0 shared expert have no counterpart.
    ignore = [f"{vprefix}head."] + [k for k in state if ".shared_expert" in k]
  elif mt.startswith(("moe_llava_", "llava_")):
    state, derived, vprefix, copy_used = _read_moe_llava(path, raw, dtype, image_token_id,
                                                         image_tower)
    qwen1 = mt == "moe_llava_qwen"
    rules = lambda c: (moe_llava_rules(c, qwen1)
                       + keymap.vision_rules(c.vision, "vision.", vprefix))
    # SigLIP's attention-pool head has no counterpart; a copy of the tower inside the
    # checkpoint is not read when the tower comes from a directory.
    ignore = [f"{vprefix}head."] + ([] if copy_used else list(released.TOWER_COPIES))
  else:
    raise ConversionError(f"{path}: model_type={mt!r}; expected 'llava', 'qwen2_vl' or "
                          "MoE-LLaVA's 'moe_llava_<family>' / 'llava_<family>'")
  cfg = _prefer_saved(os.path.join(path, CONFIG_FILE), derived)
  if cfg.text.tie_embeddings:
    ignore.append("lm_head.")
  # Built abstractly and filled by the strict loader: no random init to throw away.
  model = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  hf.load_weights(model, state, rules(cfg), ignore)
  if mt not in ("llava", "qwen2_vl"):
    used = keymap.hf_keys(rules(cfg))
    disk = {k: v for k, v in state.items() if not k.startswith("image_tower.")}
    source = released.SourceRecord(
        layout="moe_llava", config=raw,
        dtypes={k: v.dtype.name for k, v in disk.items()},
        # Tensors on disk the model does not hold. A tower copy not read (the tower came
        # from a directory) is not kept: the export writes the copy from our tower.
        extra={k: v for k, v in disk.items() if k not in used
               and (copy_used or not k.startswith(released.TOWER_COPIES))},
        files=released.read_side_files(path))
  return model, source


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
  if family == "qwen":
    text = _qwen1_text_config(raw, dtype)
  elif family not in _HF_TYPE_OF_MOE_LLAVA:
    raise ConversionError(f"MoE-LLaVA family {family!r} is not supported; supported: "
                          f"{sorted(_HF_TYPE_OF_MOE_LLAVA) + ['qwen']}")
  else:
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


def _qwen1_text_config(raw: Mapping[str, Any], dtype: str) -> TextConfig:
  """QWenConfig (Qwen-1, remote code in transformers) -> TextConfig: the Qwen2 decoder
  computes the same function (RMSNorm, rotate-half rotary, SwiGLU, q/k/v bias) up to
  `seq_length` positions, past which Qwen-1's dynamic NTK and log-n attention scaling
  (`use_dynamic_ntk`, `use_logn_attn`) would change it; ours does neither."""
  try:
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    kv = int(raw.get("kv_channels", hidden // heads))
    no_bias = bool(raw.get("no_bias", True))
    return TextConfig(
        family="qwen2", vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
        # QWenMLP's width is intermediate_size // 2 (w1 and w2 each).
        intermediate_size=int(raw["intermediate_size"]) // 2,
        num_layers=int(raw["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads,
        head_dim=None if kv * heads == hidden else kv, norm="rms",
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)), mlp="gated", activation="silu",
        qkv_bias=True, o_bias=not no_bias, mlp_bias=not no_bias,
        rope_theta=float(raw.get("rotary_emb_base", 10000.0)),
        partial_rotary_factor=float(raw.get("rotary_pct", 1.0)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), dtype=dtype)
  except KeyError as e:
    raise ConversionError(f"Qwen-1 config.json lacks {e.args[0]}") from None


def _tower_dir(path: str, raw: Mapping[str, Any], given: Optional[str]) -> Optional[str]:
  """A local tower directory: `given`, else `mm_image_tower` when it is a local directory,
  else our older exports' `image_tower/`; None when there is none."""
  if given:
    if not os.path.isdir(given):
      raise ConversionError(f"image_tower={given!r} is not a directory")
    return given
  named = raw.get("mm_image_tower") or ""
  if os.path.isdir(named):
    return named
  local = os.path.join(path, IMAGE_TOWER_DIR)
  return local if os.path.isdir(local) else None


def _tokenizer_of(path: str) -> Any:
  from moe_vlm.data import tiktoken_tokenizer
  from moe_vlm.data import tokenizer as tokenizer_lib

  names = _TOKENIZER_FILES + tuple(s.file for s in tiktoken_tokenizer.SPECS)
  if not any(os.path.exists(os.path.join(path, n)) for n in names):
    return None
  return tokenizer_lib.load_tokenizer(path)


def _image_token_id(path: str, raw: Mapping[str, Any], vocab_size: int,
                    given: Optional[int]) -> int:
  if given is None and raw.get("image_token_index") is not None:  # our older exports
    return int(raw["image_token_index"])
  return released.image_token_id(_tokenizer_of(path), vocab_size, given, path)


def _read_moe_llava(path: str, raw: Mapping[str, Any], dtype: str,
                    image_token_id: Optional[int], image_tower: Optional[str]
                    ) -> tuple[dict, VLMConfig, str, bool]:
  """(state with the tower's tensors, config, tower key prefix, whether the tower is the
  weights' own copy)."""
  state = hf.load_safetensors(path)
  text = _moe_llava_text_config(raw, dtype)
  # MoE-LLaVA's Phi classes build lm_head without bias; follow the checkpoint.
  text = dataclasses.replace(text, lm_head_bias="lm_head.bias" in state)
  tower = _tower_dir(path, raw, image_tower)
  if tower is not None:
    vision = hf.vision_config_from_hf(hf.vision_part(hf.load_hf_config(tower)), dtype)
    vstate = hf.load_safetensors(tower)
    vprefix = "image_tower." + hf._vision_prefix(vstate, "")  # pylint: disable=protected-access
    state.update({f"image_tower.{k}": v for k, v in vstate.items()})
    copy_used = False
  elif released.has_tower_copy(state):
    vision = released.tower_from_copy(state, raw.get("mm_image_tower") or "", dtype)
    vprefix, copy_used = released.copy_prefix(state), True
  else:
    raise ConversionError(
        f"{path}: mm_image_tower={raw.get('mm_image_tower')!r} is not a local directory and "
        f"the weights hold no copy of the tower ({released.TOWER_COPY}*); download the "
        "tower and pass its directory (--image_tower DIR)")
  strategy = {"patch": "default", "cls_patch": "full"}[raw.get("mm_vision_select_feature", "patch")]
  cfg = VLMConfig(vision=vision, text=text, projector=raw.get("image_projector_type", "linear"),
                  vision_feature_layer=int(raw["mm_vision_select_layer"]),
                  vision_feature_select_strategy=strategy,
                  image_token_id=_image_token_id(path, raw, text.vocab_size, image_token_id))
  return state, cfg, vprefix, copy_used


# ------------------------------------------- our checkpoints (moe-vlm convert)

# A converted checkpoint directory (from_hf's output, to_hf's `ckpt` input):
#   params/              flat params dict (Orbax, checkpoint.save_params)
#   moe_vlm_config.json  its VLMConfig
#   tokenizer/           the tokenizer, when the source had one
#   preprocessor_config.json  the image processor (mean/std), when the source had one


def _export_mesh(mesh: Optional[jax.sharding.Mesh]) -> Optional[jax.sharding.Mesh]:
  # One process: the default device, as ever. Several: the weights stay sharded (FSDP
  # over every device) and are gathered one tensor at a time while writing.
  if mesh is None and jax.process_count() > 1:
    return mesh_lib.make_mesh({"fsdp": -1})
  return mesh


def to_hf(out_dir: str, *, workdir: Optional[str] = None, stage: int = 3, config: Any = None,
          vlm_config: Optional[str] = None, ckpt: Optional[str] = None,
          tokenizer: Optional[str] = None, normalization: Optional[str] = None,
          mesh: Optional[jax.sharding.Mesh] = None, **export_kw: Any) -> str:
  """Exports a training workdir's stage or a converted checkpoint `ckpt`; returns the
  layout written. The config: `vlm_config` (a VLMConfig JSON; `ckpt` has its own), else
  the experiment config `config`, else the `config.json` that `train` wrote in `workdir`.
  The parameters are restored onto `mesh` (several processes: the training mesh, or
  FSDP over all devices) and written one tensor at a time (see `export_params`)."""
  source = None
  if ckpt:
    cfg = load_config(vlm_config or os.path.join(ckpt, CONFIG_FILE))
    local = os.path.join(ckpt, experiment.CKPT_TOKENIZER)
    tokenizer = tokenizer or (local if os.path.isdir(local) else None)
    source = released.SourceRecord.load(ckpt)
    params = experiment.load_params(os.path.join(ckpt, experiment.CKPT_PARAMS), cfg,
                                    _export_mesh(mesh))
  elif workdir:
    exp = experiment.Experiment.from_workdir(workdir, config)
    if mesh is None and jax.process_count() > 1:
      mesh = exp.mesh()
    cfg = load_config(vlm_config) if vlm_config else exp.model_config(stage)
    if tokenizer is None and not vlm_config:
      # moe_llava: the tokenizer's files as they are (what MoE-LLaVA's loader reads).
      moe_llava = resolve_layout(cfg, export_kw.get("layout", "auto")) == "moe_llava"
      tokenizer = exp.tokenizer_dir if moe_llava else exp.tokenizer
    normalization = normalization or exp.settings.data.normalization
    params = experiment.load_params(exp.final_dir(stage), cfg, mesh)
  else:
    raise ValueError("to_hf needs a workdir or a converted checkpoint (ckpt)")
  return export_params(params_source(params), cfg, out_dir, tokenizer=tokenizer,
                       normalization=normalization, source=source, **export_kw)


def from_hf(hf_dir: str, out_dir: str, *, dtype: str = "float32",
            image_token_id: Optional[int] = None, image_tower: Optional[str] = None,
            overwrite: bool = False) -> VLMConfig:
  """An exported / HF / MoE-LLaVA directory -> a converted checkpoint in `out_dir`
  (written into a temporary directory that becomes `out_dir` when complete; a non-empty
  `out_dir` is replaced only with `overwrite`). A MoE-LLaVA directory's config.json,
  tensor dtypes, unused tensors and side files are remembered (`released.SOURCE_FILE`),
  so `to_hf` writes an unchanged model back as it was. See `import_vlm` for
  `image_token_id` and `image_tower`."""
  from moe_vlm import checkpoint as ckpt_lib

  files.check_output_dir(os.path.abspath(out_dir), overwrite)
  model, source = import_with_source(hf_dir, dtype=dtype, image_token_id=image_token_id,
                                     image_tower=image_tower)
  with files.output_dir(out_dir, overwrite=overwrite) as tmp:
    ckpt_lib.save_params(os.path.join(tmp, experiment.CKPT_PARAMS),
                         ParamCodec(model).flatten(model))
    if jax.process_index() == 0:
      save_config(model.cfg, os.path.join(tmp, CONFIG_FILE))
      if source is not None:
        source.save(tmp)
      names = _tokenizer_names(hf_dir)
      if names:
        os.makedirs(os.path.join(tmp, experiment.CKPT_TOKENIZER))
        for n in names:
          shutil.copy2(os.path.join(hf_dir, n), os.path.join(tmp, experiment.CKPT_TOKENIZER, n))
      # The image mean/std the model was trained with, for inference on the checkpoint.
      if os.path.exists(os.path.join(hf_dir, PROCESSOR_FILE)):
        shutil.copy2(os.path.join(hf_dir, PROCESSOR_FILE), os.path.join(tmp, PROCESSOR_FILE))
  return model.cfg
