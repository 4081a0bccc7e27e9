"""The experiment config schema: one frozen dataclass per block of an experiment file.

Experiment files (`configs/*.py`) are ml_collections ConfigDicts, so any field can be
set on the command line (`--config.moe.ep_impl=shard_map`). They are built from these
dataclasses with `config_dict`, so every field of the model's own configs
(`MoEConfig`, `TextConfig`, `VisionConfig`, ...) and of the stage settings exists in
the ConfigDict with its type, even where the file keeps the default. `parse` reads a
ConfigDict (or the `config.json` a run wrote) back into the dataclasses: an unknown
name, a value of the wrong type or out of range is an error that names the field,
before anything is computed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Optional

import ml_collections
from ml_collections import config_dict as config_dict_lib

from moe_vlm.data.templates import TEMPLATES
from moe_vlm.models.config import (ConfigError, HyperExpertConfig, LoRAMoEConfig, MoEConfig,
                                   PerceiverConfig, TextConfig, VisionConfig, from_dict)

STAGES = (1, 2, 3)


@dataclasses.dataclass(frozen=True)
class StageSettings:
  """One MoE-Tuning stage: what it trains, on what data, for how long, how fast."""

  train: str = "projector"          # a preset of moe_vlm.train.stages (checked there)
  extra_modules: tuple[str, ...] = ()  # extra parameter-name substrings to train
  frozen_modules: tuple[str, ...] = ()  # ... and substrings to keep frozen (wins)
  data: str = ""                    # comma-separated LLaVA JSON files (or tfds name:split)
  template: str = "plain"
  batch_size: int = 32              # global, over all processes
  steps: int = 0                    # 0: `epochs` passes over the data instead
  epochs: int = 1
  learning_rate: float = 1e-3
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  grad_accum: int = 1
  clip_norm: float = 1.0            # 0: no clipping
  # The LM head runs on this fraction of each row's positions, gathered where the loss
  # targets are (0: all positions). Rows with more targets take the full head (the
  # metric head_full), so it never changes the loss - only the step's cost.
  head_fraction: float = 0.0

  def validate(self, field: str) -> None:
    if self.template not in TEMPLATES:
      raise ConfigError(f"{field}.template={self.template!r}: expected one of {TEMPLATES}")
    _at_least(field, self, batch_size=1, grad_accum=1, steps=0, epochs=0)
    if self.steps == 0 and self.epochs == 0:
      raise ConfigError(f"{field}: steps=0 and epochs=0 train nothing; set one of them")
    if self.batch_size % self.grad_accum:
      raise ConfigError(f"{field}.batch_size={self.batch_size} is not divisible by "
                        f"{field}.grad_accum={self.grad_accum}")
    if not self.learning_rate > 0:
      raise ConfigError(f"{field}.learning_rate={self.learning_rate}: expected > 0")
    if not 0 <= self.warmup_ratio <= 1:
      raise ConfigError(f"{field}.warmup_ratio={self.warmup_ratio}: expected 0..1")
    if self.weight_decay < 0 or self.clip_norm < 0:
      raise ConfigError(f"{field}: weight_decay={self.weight_decay} and "
                        f"clip_norm={self.clip_norm} must be >= 0")
    if not 0 <= self.head_fraction <= 1:
      raise ConfigError(f"{field}.head_fraction={self.head_fraction}: expected 0..1")


@dataclasses.dataclass(frozen=True)
class StagesSettings:
  stage1: StageSettings = StageSettings(train="projector")
  stage2: StageSettings = StageSettings(train="projector_llm")
  stage3: StageSettings = StageSettings(train="moe_layers")

  def get(self, k: int) -> StageSettings:
    return getattr(self, f"stage{k}")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The VLM around the decoder. `text` is a TextConfig without `moe` / `lora_moe`
  (those are the experiment's `moe` and `lora_moe` blocks, added in stage 3). With
  `init.hf_vision` / `init.hf_llm`, the architecture fields of `vision` / `text` come
  from the checkpoint and only the execution fields (`EXECUTION_FIELDS`) are read."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  projector: Literal["linear", "mlp2x_gelu", "perceiver", "qwen2_vl_merger"] = "mlp2x_gelu"
  vision_feature_layer: int = -2
  vision_feature_select_strategy: Literal["default", "full"] = "default"
  perceiver: Optional[PerceiverConfig] = None
  visual_expert: Optional[HyperExpertConfig] = None


# TextConfig / VisionConfig fields that say how to run the model, not what it is: they
# apply to checkpoint-defined architectures too.
EXECUTION_FIELDS = {
    "text": ("dtype", "param_dtype", "remat", "attention_causal_blocks", "attention_impl",
             "attention_block_size", "language_expert"),
    # Qwen2-VL's pixel budget is the run's choice, not the checkpoint's.
    "vision": ("dtype", "param_dtype", "min_pixels", "max_pixels"),
}
# Blocks of the experiment that live elsewhere in the model config.
_TEXT_EXCLUDED = ("moe", "lora_moe")


@dataclasses.dataclass(frozen=True)
class InitSettings:
  """Pretrained starting points: local HF directories (config.json + safetensors), or
  `ckpt`, a converted checkpoint (`moe-vlm convert from-hf` output, e.g. a released
  MoE-LLaVA model): the architecture is then the checkpoint's (MoE layers included,
  stage 3 does not upcycle them again) and the run's first stage starts from its
  parameters. `params`: a flat parameter directory of this experiment's own dense
  model (another run's `<workdir>/stage2/final`), where the first stage starts: the
  pretrained base of a LoRA recipe (Awaker2.5-VL's stage I) on the synthetic model."""

  hf_vision: str = ""
  hf_llm: str = ""
  hf_llava: str = ""
  ckpt: str = ""
  params: str = ""

  @property
  def pretrained_llm(self) -> str:
    """Where a pretrained LLM comes from ("" when the LLM starts random)."""
    return self.hf_llava or self.hf_llm or self.ckpt or self.params

  def validate(self) -> None:
    given = [f for f in ("hf_vision", "hf_llm", "hf_llava") if getattr(self, f)]
    whole = [f for f in ("ckpt", "params") if getattr(self, f)]
    if whole and (given or len(whole) > 1):
      raise ConfigError(f"init.{whole[0]} and init.{(given + whole[1:])[0]} both set: "
                        f"init.{whole[0]} holds the whole model; give one of them")
    if self.hf_llava and given != ["hf_llava"]:
      raise ConfigError("init.hf_llava holds the whole model: init.hf_vision / init.hf_llm "
                        "must stay empty")


@dataclasses.dataclass(frozen=True)
class DataSettings:
  kind: Literal["synthetic", "llava_json", "tfds"] = "synthetic"
  dir: str = ""              # LLaVA JSON files + images; default <workdir>/data
  image_root: str = ""       # images' root if not `dir`
  tokenizer: str = ""        # default: init.hf_llm, else <data dir>/tokenizer
  # Synthetic only (moe_vlm/data/synthetic.py): training images per stage, 0 = a new
  # image for every sample the stage draws (steps x batch_size, never repeated); N > 0 =
  # a pool of N images repeated over epochs. Held-out images (eval.json, pope.json),
  # image side in pixels, and the grid x grid cells the objects sit in (2 or 3).
  num_images: int = 0
  num_eval_images: int = 150
  image_size: int = 32
  grid: int = 2
  max_length: int = 2048
  # How samples fill rows (moe_vlm/data/packing.py): "none" = one sample per row padded
  # to max_length; "first_fit" = several samples per row (segment ids: attention,
  # positions, images and per-sample guides stay per sample), padding only at row ends;
  # "length_buckets" = one sample per row, each batch padded to the smallest of 4
  # lengths (max_length x i / 4) holding its longest sample, samples grouped by length
  # (the fallback where packing cannot apply).
  packing: Literal["none", "first_fit", "length_buckets"] = "none"
  # first_fit: image slots per row (the vision tower encodes all of them; unused slots
  # are zeros); 0 = max_length // (image tokens + 1), what a row can hold.
  images_per_row: int = 0
  normalization: Literal["clip", "siglip"] = "clip"
  add_bos: bool = False
  worker_count: int = 0
  max_bad_fraction: float = 0.05
  eval_file: str = ""
  pope_file: str = ""

  def validate(self) -> None:
    _at_least("data", self, max_length=2, worker_count=0, images_per_row=0)
    if self.kind == "synthetic":
      _at_least("data", self, num_images=0, num_eval_images=1, image_size=8)
      if self.grid not in (2, 3):
        raise ConfigError(f"data.grid={self.grid}: expected 2 or 3")
      if self.image_size < 6 * self.grid:
        raise ConfigError(f"data.image_size={self.image_size} is too small for a "
                          f"{self.grid}x{self.grid} grid (at least {6 * self.grid})")
    if not 0 <= self.max_bad_fraction <= 1:
      raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction}: expected 0..1")


@dataclasses.dataclass(frozen=True)
class VisionPretrainSettings:
  """A short pre-training of the randomly initialised vision tower, run before stage 1:
  the stand-in for CLIP's pre-training (MoE-LLaVA starts from a pretrained CLIP or
  SigLIP tower). The tower learns to caption `data` (the `plain` template) through a
  throwaway decoder: the LLM's architecture with `decoder_layers` layers and a fresh
  `mlp2x_gelu` projector, all trained. Only the tower is kept: stage 1 starts from it
  (`<workdir>/vision_pretrain/final`) and stages 1-3 keep it frozen. Checkpointed and
  resumed like a stage (logged as stage 0). steps=0: off (a random tower, or the
  `init` checkpoint's); refused beside init.hf_vision, init.hf_llava or init.ckpt."""

  steps: int = 0
  batch_size: int = 64
  learning_rate: float = 1e-3
  warmup_ratio: float = 0.05
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  data: str = "captions"      # a synthetic mix, or LLaVA JSON files of captions
  decoder_layers: int = 1
  head_fraction: float = 0.0  # as StageSettings.head_fraction

  def validate(self) -> None:
    _at_least("vision_pretrain", self, steps=0, batch_size=1, decoder_layers=1)
    if not self.learning_rate > 0:
      raise ConfigError(f"vision_pretrain.learning_rate={self.learning_rate}: expected > 0")
    if not 0 <= self.warmup_ratio <= 1:
      raise ConfigError(f"vision_pretrain.warmup_ratio={self.warmup_ratio}: expected 0..1")
    if self.weight_decay < 0 or self.clip_norm < 0:
      raise ConfigError(f"vision_pretrain: weight_decay={self.weight_decay} and "
                        f"clip_norm={self.clip_norm} must be >= 0")
    if not 0 <= self.head_fraction <= 1:
      raise ConfigError(f"vision_pretrain.head_fraction={self.head_fraction}: expected 0..1")

  def stage(self) -> StageSettings:
    """The pre-training as the trainer's stage settings (preset `vision_pretrain`)."""
    return StageSettings(train="vision_pretrain", data=self.data, template="plain",
                         batch_size=self.batch_size, steps=self.steps, epochs=0,
                         learning_rate=self.learning_rate, warmup_ratio=self.warmup_ratio,
                         weight_decay=self.weight_decay, clip_norm=self.clip_norm,
                         head_fraction=self.head_fraction)


@dataclasses.dataclass(frozen=True)
class DcnSettings:
  """How the process grid splits over the mesh axes (MaxText's dcn_*_parallelism): all 1
  lets `jax.make_mesh` order the devices; otherwise each axis is this many groups of
  whole processes times what stays inside a process, and the product of these must be
  the process count."""

  data: int = 1
  fsdp: int = 1
  model: int = 1
  expert: int = 1


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """Device mesh sizes; one axis may be -1 (all remaining devices)."""

  data: int = -1
  fsdp: int = 1
  model: int = 1
  expert: int = 1
  dcn: DcnSettings = DcnSettings()


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  every_steps: int = 500
  keep: int = 2
  async_save: bool = True

  def validate(self) -> None:
    _at_least("checkpoint", self, every_steps=1, keep=1)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  batch_size: int = 64
  max_new_tokens: int = 16
  max_examples: int = 0           # 0: all
  run_after_training: bool = False
  routing_plots: bool = True

  def validate(self) -> None:
    _at_least("eval", self, batch_size=1, max_new_tokens=1, max_examples=0)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole experiment: model, the three stages, data, mesh, checkpoints, evaluation."""

  seed: int = 0
  variant: str = ""
  model: ModelSettings = ModelSettings()
  # Stage 3's MoE (MoE-LLaVA upcycling) or Awaker's LoRA experts (`stage3_kind="lora"`).
  moe: MoEConfig = MoEConfig()
  stage3_kind: Literal["moe", "lora"] = "moe"
  lora_moe: Optional[LoRAMoEConfig] = None
  init: InitSettings = InitSettings()
  data: DataSettings = DataSettings()
  mesh: MeshSettings = MeshSettings()
  vision_pretrain: VisionPretrainSettings = VisionPretrainSettings()
  stages: StagesSettings = StagesSettings()
  checkpoint: CheckpointSettings = CheckpointSettings()
  log_every: int = 25
  eval: EvalSettings = EvalSettings()

  def validate(self) -> None:
    """Checks that need no tokenizer, checkpoint or device (`train.loop.check_stages`
    does the rest before the first stage trains)."""
    for k in STAGES:
      self.stages.get(k).validate(f"stages.stage{k}")
    self.data.validate()
    self.init.validate()
    self.vision_pretrain.validate()
    tower = self.init.hf_vision or self.init.hf_llava or self.init.ckpt or self.init.params
    if self.vision_pretrain.steps and tower:
      raise ConfigError(
          f"vision_pretrain.steps={self.vision_pretrain.steps}: the vision tower comes from "
          f"{tower} (init); its pre-training stands in for a pretrained tower, so set "
          "vision_pretrain.steps=0")
    if self.data.kind == "synthetic" and not self.data.num_images:
      runs = [(f"stages.stage{k}", self.stages.get(k).steps) for k in STAGES]
      runs.append(("vision_pretrain", self.vision_pretrain.steps or 1))
      for where, steps in runs:
        if not steps:
          raise ConfigError(f"{where}.steps=0 (epochs) with data.num_images=0: the "
                            "synthetic data has a new image per sample, no epochs; set "
                            f"{where}.steps or data.num_images")
    self.checkpoint.validate()
    self.eval.validate()
    _at_least("", self, log_every=1)
    self._validate_lora()
    for name in _TEXT_EXCLUDED:
      if getattr(self.model.text, name) is not None:
        raise ConfigError(f"model.text.{name}: set the experiment's `{name}` block instead")


  def _validate_lora(self) -> None:
    """LoRA presets (Awaker2.5-VL, `train.stages.LORA_FORMS`) against the lora_moe block."""
    from moe_vlm.train.stages import LORA_FORMS
    lora = [k for k in STAGES if self.stages.get(k).train in LORA_FORMS]
    if self.stage3_kind == "lora" and self.lora_moe is None:
      raise ConfigError("stage3_kind='lora' needs a lora_moe block")
    if lora and self.lora_moe is None:
      raise ConfigError(f"stages.stage{lora[0]}.train={self.stages.get(lora[0]).train!r} "
                        "trains LoRA: it needs a lora_moe block")
    if self.stage3_kind == "lora" and 3 not in lora:
      raise ConfigError(f"stage3_kind='lora': stages.stage3.train="
                        f"{self.stages.stage3.train!r} is not a LoRA preset (one of "
                        f"{sorted(LORA_FORMS)})")
    if self.stage3_kind == "moe" and 3 in lora:
      raise ConfigError(f"stages.stage3.train={self.stages.stage3.train!r} is a LoRA preset "
                        "but stage3_kind='moe' (MoE-LLaVA upcycling): set stage3_kind='lora'")
    if self.lora_moe is not None and self.lora_moe.single:
      raise ConfigError("lora_moe.single: a stage's preset sets it (lora_single); leave it "
                        "false in the experiment's lora_moe block")
    forms = [LORA_FORMS[self.stages.get(k).train] for k in lora]
    after = [k for k in STAGES if lora and k > lora[0] and k not in lora]
    if after:
      raise ConfigError(f"stages.stage{after[0]}.train={self.stages.get(after[0]).train!r} "
                        f"follows the LoRA stage {lora[0]}: LoRA stages must come last (a "
                        "trained LoRA is not dropped; fold it with "
                        "convert.lora.merge_lora_experts)")
    if "experts" in forms and forms[forms.index("experts"):].count("single"):
      raise ConfigError(f"stages {lora}: a lora_single stage after a routed-experts one "
                        "(experts are not folded back into one LoRA)")


def _at_least(block: str, obj: Any, **bounds: int) -> None:
  for name, low in bounds.items():
    value = getattr(obj, name)
    if value < low:
      where = f"{block}.{name}" if block else name
      raise ConfigError(f"{where}={value}: expected >= {low}")


# ------------------------------------------------------------- dataclass <-> ConfigDict


def parse(c: Mapping[str, Any] | ml_collections.ConfigDict) -> ExperimentConfig:
  """The typed, validated experiment; raises ConfigError naming the bad field."""
  cfg = from_dict(ExperimentConfig, _plain(c))
  cfg.validate()
  return cfg


def _plain(c: Any) -> Any:
  if isinstance(c, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in c.items()}
  if isinstance(c, Mapping):
    return {k: _plain(v) for k, v in c.items()}
  return c


def config_dict(obj: Any) -> ml_collections.ConfigDict:
  """The ConfigDict of a schema dataclass, every field present: an unset optional
  scalar becomes a typed placeholder, so the command line can still set it."""
  hints = typing.get_type_hints(type(obj))
  out = {}
  for f in dataclasses.fields(obj):
    if isinstance(obj, TextConfig) and f.name in _TEXT_EXCLUDED:
      continue
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      out[f.name] = config_dict(value)
    elif value is None:
      out[f.name] = _placeholder(hints[f.name])
    else:
      out[f.name] = value
  return ml_collections.ConfigDict(out)


def _placeholder(tp: Any) -> Any:
  args = [a for a in typing.get_args(tp) if a is not type(None)]
  inner = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
  if dataclasses.is_dataclass(inner):
    return None  # an optional block: a config file sets it whole
  base = typing.get_origin(inner) or inner
  if base is Literal:
    base = type(typing.get_args(inner)[0])
  return config_dict_lib.placeholder(base)


def block(cls: type, **fields: Any) -> ml_collections.ConfigDict:
  """`config_dict(cls(**fields))`, nested blocks given as mappings."""
  return config_dict(from_dict(cls, fields, cls.__name__))
