"""MoE-LLaVA's released checkpoint directories as they are on disk, read offline, and
what a conversion must remember to write them back unchanged.

A released directory (LanguageBind/MoE-LLaVA-{StableLM-1.6B,Qwen-1.8B,Phi2-2.7B}-4e[-384])
differs from what `moe-vlm convert to-hf` used to write in three ways:

- `mm_image_tower` is a hub id ("openai/clip-vit-large-patch14-336",
  "google/siglip-so400m-patch14-384"), but the weights carry a copy of that tower under
  `model.image_tower.image_tower.vision_model.*`. `tower_from_copy` reads it: the shapes
  give the sizes, the named tower's published config gives what shapes cannot tell
  (attention heads, layer-norm eps, activation, SigLIP's 384 px for 27 x 27 patches).
  (Qwen-1's classes put it, like the projector, under `transformer.`.)
- The tokenizer has no `<image>`: MoE-LLaVA splices IMAGE_TOKEN_INDEX = -200, an id
  outside the vocabulary, into the prompt ids and replaces that position with the image
  features. Our model replaces positions holding `image_token_id` and looks every id up
  in its embedding table, so the image gets a reserved id inside the table that the
  tokenizer never produces: `len(tokenizer)`, the first row past the tokenizer's ids
  (the released embedding tables are padded: Phi-2 51200 rows for 50296 tokens, StableLM-2
  100352 for 100289, Qwen 151936 for 151851 / 151647), the id training gives an added
  `<image>` too. The row's weights are never read (the image features replace it) and
  generation never emits it (`infer.generate` masks it), so the logits over the real
  vocabulary are those of the original. It is kept in moe_vlm_config.json
  (`image_token_id`); the templates insert it where `<image>` stands in a prompt.
- config.json holds fields we have no use for (`auto_map`, `max_position_embeddings`,
  `tokenizer_model_max_length`, dropout rates, ...). `SourceRecord` remembers the
  whole file, each tensor's dtype, the tensors our model does not hold (SigLIP's
  attention-pool head in the tower copy) and side files (generation_config.json), so an
  export of an unchanged model reproduces the directory: same config.json, same
  tensors bit for bit, the original tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping, Optional

import numpy as np

from moe_vlm.convert import safetensors_io
from moe_vlm.convert.hf import ConversionError
from moe_vlm.models.config import VisionConfig

log = logging.getLogger("moe_vlm")

# The weights' copy of the tower (CLIPVisionTower / SiglipVisionTower.image_tower) under
# the LLaVA meta-model: `model.` for most families, `transformer.` for Qwen-1.
TOWER_COPY = "model.image_tower.image_tower."
TOWER_COPIES = (TOWER_COPY, "transformer.image_tower.image_tower.")
SOURCE_FILE = "moe_vlm_source.json"
EXTRA_FILE = "moe_vlm_source_extra.safetensors"
SIDE_FILES = ("generation_config.json",)

# The towers MoE-LLaVA names, with their published configs (config.json on the hub).
KNOWN_TOWERS: dict[str, VisionConfig] = {
    "openai/clip-vit-large-patch14-336": VisionConfig(
        variant="clip", image_size=336, patch_size=14, hidden_size=1024,
        intermediate_size=4096, num_layers=24, num_heads=16, norm_eps=1e-5,
        activation="quick_gelu"),
    "openai/clip-vit-large-patch14": VisionConfig(
        variant="clip", image_size=224, patch_size=14, hidden_size=1024,
        intermediate_size=4096, num_layers=24, num_heads=16, norm_eps=1e-5,
        activation="quick_gelu"),
    "google/siglip-so400m-patch14-384": VisionConfig(
        variant="siglip", image_size=384, patch_size=14, hidden_size=1152,
        intermediate_size=4304, num_layers=27, num_heads=16, norm_eps=1e-6,
        activation="gelu_pytorch_tanh"),
}
# MoE-LLaVA's build_image_tower accepts only names with these prefixes.
HUB_PREFIXES = ("openai", "laion", "google")


def _architecture(v: VisionConfig) -> VisionConfig:
  return dataclasses.replace(v, dtype="float32", param_dtype="float32")


def known_tower_name(vision: VisionConfig) -> Optional[str]:
  """The hub name of a tower whose architecture is one of KNOWN_TOWERS, else None."""
  for name, known in KNOWN_TOWERS.items():
    if _architecture(known) == _architecture(vision):
      return name
  return None


def has_tower_copy(state: Mapping[str, Any]) -> bool:
  return any(k.startswith(TOWER_COPIES) for k in state)


def copy_prefix(state: Mapping[str, Any]) -> str:
  base = next((b for b in TOWER_COPIES if any(k.startswith(b) for k in state)), TOWER_COPY)
  nested = base + "vision_model."
  return nested if any(k.startswith(nested) for k in state) else base


def tower_from_copy(state: Mapping[str, np.ndarray], name: str,
                    dtype: str = "float32") -> VisionConfig:
  """The VisionConfig of the weights' tower copy. Sizes come from the tensor shapes; the
  head count, eps and activation (which shapes cannot tell) from the named tower's
  published config, so the name must be one of KNOWN_TOWERS."""
  p = copy_prefix(state)
  if name not in KNOWN_TOWERS:
    raise ConversionError(
        f"mm_image_tower={name!r} is neither a local directory nor a tower whose config we "
        f"know ({', '.join(KNOWN_TOWERS)}); the weights' copy of the tower ({p}*) does not "
        "tell its attention heads, eps or activation. Download the tower and pass its "
        "directory (--image_tower DIR)")
  known = KNOWN_TOWERS[name]
  try:
    patch = state[f"{p}embeddings.patch_embedding.weight"].shape  # [H, C, p, p]
    positions = state[f"{p}embeddings.position_embedding.weight"].shape[0]
    intermediate = state[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0]
  except KeyError as e:
    raise ConversionError(f"the tower copy under {p} lacks {e.args[0]}") from None
  variant = "clip" if f"{p}embeddings.class_embedding" in state else "siglip"
  if variant != known.variant:
    raise ConversionError(f"mm_image_tower={name!r} is a {known.variant} tower but the "
                          f"weights' copy under {p} is a {variant} one")
  layers = {int(m.group(1)) for k in state
            if (m := re.match(re.escape(f"{p}encoder.layers.") + r"(\d+)\.", k))}
  side = int(round((positions - int(variant == "clip")) ** 0.5))
  size = patch[2]
  image_size = known.image_size if known.image_size // size == side else side * size
  vision = dataclasses.replace(
      known, image_size=image_size, patch_size=size, num_channels=patch[1],
      hidden_size=patch[0], intermediate_size=intermediate, num_layers=len(layers),
      dtype=dtype)
  if vision.hidden_size % vision.num_heads:
    raise ConversionError(f"the tower copy has hidden size {vision.hidden_size}, not a "
                          f"multiple of {name}'s {vision.num_heads} attention heads")
  return vision


# ------------------------------------------------------------------ image token


def image_token_id(tokenizer: Any, vocab_size: int, given: Optional[int] = None,
                   where: str = "") -> int:
  """The id the image takes in our prompts (see module docstring): `given`, else the
  tokenizer's `<image>`, else the reserved row `len(tokenizer)`."""
  from moe_vlm.data import tokenizer as tokenizer_lib

  if given is not None:
    if not 0 <= given < vocab_size:
      raise ConversionError(f"image_token_id={given} is outside the {vocab_size} embedding "
                            "rows")
    if tokenizer is not None and given < len(tokenizer) and \
        tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE) != given:
      log.warning("image_token_id=%d is an id the tokenizer (%d ids) may produce: a prompt "
                  "whose text tokenizes to it is refused", given, len(tokenizer))
    return given
  if tokenizer is None:
    raise ConversionError(
        f"{where}: no tokenizer and no image_token_index in config.json. MoE-LLaVA marks "
        "images with -200, outside the vocabulary; we need an embedding row the tokenizer "
        "never produces: pass --image_token_id (e.g. the tokenizer's length)")
  token = tokenizer.get_vocab().get(tokenizer_lib.IMAGE)
  if token is not None:
    return int(token)
  reserved = len(tokenizer)
  if reserved >= vocab_size:
    raise ConversionError(
        f"{where}: the tokenizer has {reserved} ids and the embedding table {vocab_size} "
        "rows, so no row is free for the image (MoE-LLaVA uses -200, outside the table); "
        "pass --image_token_id with a row the tokenizer never produces")
  return reserved


# ------------------------------------------------------------- what to remember


@dataclasses.dataclass
class SourceRecord:
  """What an export needs to write a converted directory back as it was."""

  layout: str  # "moe_llava"
  config: dict[str, Any]  # config.json, verbatim
  dtypes: dict[str, str]  # tensor name -> dtype name on disk
  extra: dict[str, np.ndarray]  # tensors on disk our model does not hold
  files: dict[str, Any]  # side files (generation_config.json), parsed JSON

  def save(self, out_dir: str) -> None:
    meta = dict(layout=self.layout, config=self.config, dtypes=self.dtypes,
                files=self.files, extra=sorted(self.extra))
    with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    if self.extra:
      tmp = os.path.join(out_dir, ".extra")
      (name,) = safetensors_io.write(self.extra, tmp, 2**62)
      os.replace(os.path.join(tmp, name), os.path.join(out_dir, EXTRA_FILE))
      os.rmdir(tmp)

  @classmethod
  def load(cls, ckpt: str) -> Optional["SourceRecord"]:
    path = os.path.join(ckpt, SOURCE_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      meta = json.load(f)
    extra = {}
    if meta.get("extra"):
      extra = safetensors_io.read(os.path.join(ckpt, EXTRA_FILE))
    return cls(layout=meta["layout"], config=meta["config"], dtypes=meta["dtypes"],
               extra=extra, files=meta.get("files", {}))


def read_side_files(path: str) -> dict[str, Any]:
  out = {}
  for name in SIDE_FILES:
    file = os.path.join(path, name)
    if os.path.exists(file):
      with open(file) as f:
        out[name] = json.load(f)
  return out
