"""A trained model, its tokenizer and its prompt format, rebuilt from a workdir or from
a converted checkpoint.

Everything that turns `<workdir>/stage<k>/final` (or a `moe-vlm convert from-hf`
output directory) back into something that answers questions lives here, so the `generate` / `chat` commands and evaluation code share it:
the model config comes from the experiment config exactly as training derived it
(`loop.model_config` / `loop.stage_model_config`), the tokenizer from where training
found it, and the conversation template from the stage's config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from moe_vlm.data import images as images_lib
from moe_vlm.data import templates
from moe_vlm.data import tokenizer as tokenizer_lib
from moe_vlm.models.config import VLMConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.train import checkpoint as ckpt_lib

# End-of-turn markers of common chat templates: with `hf_chat` they end an answer too.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def load_config(workdir: str,
                config: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The experiment config: `config` when given, else the `config.json` training wrote."""
  if config is not None:
    return config
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; pass the experiment config (--config)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def tokenizer_dir(c: ml_collections.ConfigDict, workdir: str) -> str:
  """Where training loaded the tokenizer from (mirrors `loop.prepare_data`, which would
  also generate the synthetic data set: inference must not)."""
  data_dir = c.data.dir or os.path.join(workdir, "data")
  return c.data.tokenizer or c.init.hf_llm or os.path.join(data_dir, "tokenizer")


def load_stage_model(workdir: str, stage: int, cfg: VLMConfig) -> VLM:
  """`<workdir>/stage<stage>/final` as a VLM of config `cfg`."""
  final = os.path.join(workdir, f"stage{stage}", "final")
  if not ckpt_lib.has_params(final):
    raise FileNotFoundError(f"{final} holds no parameters: stage {stage} has not finished "
                            "in this workdir")
  codec = ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  return codec.merge(ckpt_lib.load_params(final, codec.shapes))


@dataclasses.dataclass
class InferenceModel:
  """A model plus what is needed to talk to it: tokenizer, template, image transform."""

  model: VLM
  cfg: VLMConfig
  tokenizer: Any
  template: str
  normalization: str | images_lib.Normalization
  add_bos: bool = False
  # Set when the model's parameters were placed on a mesh (generate.shard_model):
  # generation then shards its batch over the mesh's batch axes too.
  mesh: Optional[jax.sharding.Mesh] = None

  @property
  def pad_id(self) -> int:
    return templates.pad_id(self.tokenizer)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """eos, plus the chat template's end-of-turn marker(s) for `hf_chat`."""
    ids = {int(self.tokenizer.eos_token_id)}
    if self.template == "hf_chat":
      vocab = self.tokenizer.get_vocab()
      ids |= {vocab[t] for t in _END_OF_TURN if t in vocab}
    return tuple(sorted(ids))

  def encode(self, conversations: Sequence[dict[str, str]]) -> np.ndarray:
    """Turns ending with a human turn -> prompt ids ending where the answer begins."""
    return templates.encode_prompt(conversations, self.tokenizer, self.template,
                                   num_image_tokens=self.cfg.num_image_tokens,
                                   image_token_id=self.cfg.image_token_id,
                                   add_bos=self.add_bos)

  def image(self, source: Optional[images_lib.ImageInput]) -> np.ndarray:
    """The model's [H, W, 3] input for an image; zeros (ignored) for None."""
    size = self.cfg.vision.image_size
    if source is None:
      return np.zeros((size, size, 3), np.float32)
    return images_lib.load_and_transform(source, image_size=size,
                                         normalization=self.normalization)

  def decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def load(workdir: str, stage: int = 3,
         config: Optional[ml_collections.ConfigDict] = None) -> InferenceModel:
  """Rebuilds stage `stage`'s model from a workdir (config: see `load_config`)."""
  from moe_vlm.train import loop  # the training driver owns config -> model config

  if stage not in (1, 2, 3):
    raise ValueError(f"stage={stage}: MoE-Tuning has stages 1, 2 and 3")
  c = load_config(workdir, config)
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir(c, workdir))
  cfg = loop.stage_model_config(c, loop.model_config(c, tokenizer), stage)
  return InferenceModel(model=load_stage_model(workdir, stage, cfg), cfg=cfg,
                        tokenizer=tokenizer, template=c.stages[f"stage{stage}"].template,
                        normalization=c.data.normalization,
                        add_bos=bool(c.data.get("add_bos", False)))


# MoE-LLaVA picks the conversation template by the LLM family (its `conv_mode`).
_FAMILY_TEMPLATES = {"phi": "phi", "stablelm": "stablelm", "qwen2": "qwen", "qwen2_moe": "qwen"}


def default_template(tokenizer: Any, cfg: VLMConfig) -> str:
  """The template of a checkpoint that does not record one: MoE-LLaVA's for its
  families, else the tokenizer's own chat template."""
  if cfg.text.family in _FAMILY_TEMPLATES:
    return _FAMILY_TEMPLATES[cfg.text.family]
  if getattr(tokenizer, "chat_template", None):
    return "hf_chat"
  raise ValueError(f"no conversation template known for text family {cfg.text.family!r} "
                   "and the tokenizer has no chat_template; pass one of "
                   f"{', '.join(templates.TEMPLATES)} (--template)")


def checkpoint_normalization(ckpt: str, cfg: VLMConfig) -> images_lib.Normalization:
  """The image mean/std of the checkpoint's processor file, else the tower's default."""
  from moe_vlm.convert import export

  path = os.path.join(ckpt, export.PROCESSOR_FILE)
  if not os.path.exists(path):
    return images_lib.get_normalization(cfg.vision.variant)
  with open(path) as f:
    raw = json.load(f)
  try:
    return images_lib.Normalization(mean=tuple(raw["image_mean"]), std=tuple(raw["image_std"]))
  except KeyError as e:
    raise ValueError(f"{path}: no {e.args[0]} field; expected image_mean and image_std "
                     "lists") from None


def load_checkpoint(ckpt: str, *, template: Optional[str] = None,
                    tokenizer: Optional[str] = None, add_bos: bool = False) -> InferenceModel:
  """A converted checkpoint (`moe-vlm convert from-hf` output: params/,
  moe_vlm_config.json, tokenizer/, preprocessor_config.json) ready to answer.

  template: the conversation template (default: `default_template`);
  tokenizer: a tokenizer directory (default: `<ckpt>/tokenizer`).
  """
  from moe_vlm.convert import export

  config_path = os.path.join(ckpt, export.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: {ckpt} is not a converted checkpoint "
                            "(make one with `moe-vlm convert from-hf`; for a training "
                            "workdir use --workdir)")
  cfg = export.load_config(config_path)
  tok_dir = tokenizer or os.path.join(ckpt, "tokenizer")
  if not os.path.isdir(tok_dir):
    raise FileNotFoundError(f"{tok_dir} not found: the checkpoint carries no tokenizer; "
                            "pass one (--tokenizer DIR)")
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  template = template or default_template(tok, cfg)
  if template not in templates.TEMPLATES:
    raise ValueError(f"template={template!r}: expected one of {', '.join(templates.TEMPLATES)}")
  model = export.load_params_model(cfg, os.path.join(ckpt, "params"))
  return InferenceModel(model=model, cfg=cfg, tokenizer=tok, template=template,
                        normalization=checkpoint_normalization(ckpt, cfg), add_bos=add_bos)
