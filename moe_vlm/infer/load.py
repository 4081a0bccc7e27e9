"""A trained model, its tokenizer and its prompt format, rebuilt from a workdir or from
a converted checkpoint.

Everything that turns a training workdir's stage (through `moe_vlm.experiment`) or a
`moe-vlm convert from-hf` output directory back into something that answers questions
lives here, so the `generate` / `chat` commands and evaluation code share it. With a
mesh, the parameters are restored straight onto their shardings (every process reads
only its shards), which a model too large for one device, or a multi-host run, needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from moe_vlm.data import images as images_lib
from moe_vlm.data import templates
from moe_vlm.data import tokenizer as tokenizer_lib
from moe_vlm.experiment import Experiment, load_params
from moe_vlm.models.config import VLMConfig
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement

# End-of-turn markers of common chat templates: with `hf_chat` they end an answer too.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


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

  def encode(self, conversations: Sequence[dict[str, str]], *,
             with_router_mask: bool = False, image: Optional[images_lib.ImageInput] = None
             ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Turns ending with a human turn -> prompt ids ending where the answer begins (and
    with `with_router_mask` the router span, `templates.encode_prompt`). `image`: the
    conversation's image, whose size sets its token count for Qwen2-VL."""
    return templates.encode_prompt(conversations, self.tokenizer, self.template,
                                   num_image_tokens=self.image_tokens(image),
                                   image_token_id=self.cfg.image_token_id,
                                   add_bos=self.add_bos, with_router_mask=with_router_mask)

  @property
  def patches(self) -> Optional[images_lib.PatchConfig]:
    """Qwen2-VL's image transform (native resolution), None for square-image towers."""
    return images_lib.PatchConfig.of(self.cfg.vision) if self.cfg.vision.native else None

  def image_tokens(self, source: Optional[images_lib.ImageInput]) -> int:
    """Image ids an image takes in the prompt: `num_image_tokens`, or for Qwen2-VL its
    merged-patch count (from its size)."""
    if self.patches is None or source is None:
      return self.cfg.num_image_tokens
    return self.patches.num_tokens(*images_lib.image_size_of(source))

  def grid(self, source: Optional[images_lib.ImageInput]) -> Optional[np.ndarray]:
    """Qwen2-VL: the image's patch grid int32 [3] (zeros for None); None otherwise."""
    if self.patches is None:
      return None
    if source is None:
      return np.zeros(3, np.int32)
    return np.asarray(self.patches.grid(*images_lib.image_size_of(source)), np.int32)

  def image(self, source: Optional[images_lib.ImageInput]) -> np.ndarray:
    """The model's [H, W, 3] input for an image (Qwen2-VL: its patches on the budget,
    [max_patches, patch_dim]); zeros (ignored) for None."""
    if self.patches is not None:
      if source is None:
        return np.zeros((self.patches.max_patches, self.patches.patch_dim), np.float32)
      return images_lib.qwen2_vl_patches(images_lib.load_image(source), self.patches,
                                         self.normalization)[0]
    size = self.cfg.vision.image_size
    if source is None:
      return np.zeros((size, size, 3), np.float32)
    return images_lib.load_and_transform(source, image_size=size,
                                         normalization=self.normalization)

  def decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def load(workdir: str, stage: int = 3,
         config: Optional[ml_collections.ConfigDict] = None,
         mesh: Optional[jax.sharding.Mesh] = None) -> InferenceModel:
  """Stage `stage`'s model of a training workdir (its config.json, or `config`), on
  `mesh` when given."""
  exp = Experiment.from_workdir(workdir, config)
  if stage not in (1, 2, 3):
    raise ValueError(f"stage={stage}: MoE-Tuning has stages 1, 2 and 3")
  if mesh is None and jax.process_count() > 1:
    mesh = exp.mesh()  # several processes hold one model: the training layout
  data = exp.settings.data
  check_tokenizer(exp.tokenizer, exp.model_config(stage),
                  f"{workdir} with the tokenizer in {exp.tokenizer_dir}")
  return InferenceModel(model=exp.load_model(stage, mesh), cfg=exp.model_config(stage),
                        tokenizer=exp.tokenizer, template=exp.stage(stage).template,
                        normalization=data.normalization, add_bos=data.add_bos, mesh=mesh)


class TokenizerMismatch(ValueError):
  """The tokenizer does not belong to the model (a stale or foreign tokenizer dir)."""


def check_tokenizer(tokenizer: Any, cfg: VLMConfig, where: str) -> None:
  """Every id the tokenizer can produce must be an embedding row of the model, and its
  `<image>` (when it has one) must be the model's image token: otherwise generation
  would run on ids past the vocabulary or splice images in the wrong place."""
  n = len(tokenizer)
  if n > cfg.text.vocab_size:
    raise TokenizerMismatch(
        f"{where}: the tokenizer has {n} tokens but the model has {cfg.text.vocab_size} "
        "embedding rows: not this model's tokenizer (pass the right one with --tokenizer)")
  image = tokenizer.get_vocab().get(tokenizer_lib.IMAGE)
  if image is not None and image != cfg.image_token_id:
    raise TokenizerMismatch(
        f"{where}: the tokenizer maps {tokenizer_lib.IMAGE} to {image} but the model's "
        f"image token is {cfg.image_token_id}: not this model's tokenizer")


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
                    tokenizer: Optional[str] = None, add_bos: bool = False,
                    mesh: Optional[jax.sharding.Mesh] = None) -> InferenceModel:
  """A converted checkpoint (`moe-vlm convert from-hf` output: params/,
  moe_vlm_config.json, tokenizer/, preprocessor_config.json) ready to answer.

  template: the conversation template (default: `default_template`);
  tokenizer: a tokenizer directory (default: `<ckpt>/tokenizer`);
  mesh: where the parameters go (default: one device; with several processes, FSDP
    over all devices).
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
  check_tokenizer(tok, cfg, f"{ckpt} with the tokenizer in {tok_dir}")
  template = template or default_template(tok, cfg)
  if template not in templates.TEMPLATES:
    raise ValueError(f"template={template!r}: expected one of {', '.join(templates.TEMPLATES)}")
  if mesh is None and jax.process_count() > 1:
    mesh = mesh_lib.make_mesh({"fsdp": -1})
  params = load_params(os.path.join(ckpt, "params"), cfg, mesh)
  return InferenceModel(model=placement.abstract_codec(cfg).merge(params), cfg=cfg,
                        tokenizer=tok, template=template,
                        normalization=checkpoint_normalization(ckpt, cfg), add_bos=add_bos,
                        mesh=mesh)
