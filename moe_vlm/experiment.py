"""One owner of an experiment: its config, its workdir, its tokenizer, its models.

`train`, `generate`/`chat`, `eval` and `convert` all reach a run through `Experiment`,
so this is the one place that knows the workdir layout:

  config.json              the experiment config the run was started with
  data/                    synthetic held-out set and tokenizer (`data.kind="synthetic"`)
  vision_pretrain/         the vision tower's pre-training (`vision_pretrain`), laid out
                           like a stage (checkpoints/, final/, tb/, metrics.jsonl;
                           "stage 0" in the code and the logs) + tower/, the tower
                           alone, where stage 1 starts from
  stage<k>/checkpoints/    Orbax TrainState checkpoints (+ data iterator state, counters)
  stage<k>/final/          the stage's parameters (Orbax, written by every process from
                           its own shards), the start of stage k+1 and of inference
  stage<k>/tb/             TensorBoard events; stage<k>/metrics.jsonl the same as JSON
  stage<k>/bad_samples.json  skipped samples: counts and the first records by reason
  report.md, report.json   the stage-2 vs stage-3 evaluation (+ routing_*.png)

and how each stage's model config follows from the experiment config: stages 1-2 run
the dense model (`model`, or the architectures of the `init` checkpoints), stage 3 adds
the `moe` block (MoE-LLaVA upcycling); a stage whose preset trains LoRA (Awaker2.5-VL,
`train.stages.LORA_FORMS`) adds the `lora_moe` block in that preset's form.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections

from moe_vlm import checkpoint as ckpt_lib
from moe_vlm import schema
from moe_vlm.data import tokenizer as tokenizer_lib
from moe_vlm.files import sync, write_json
from moe_vlm.models.config import ConfigError, VLMConfig, from_dict
from moe_vlm.models.params import Params
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement
from moe_vlm.train.stages import LORA_FORMS

log = logging.getLogger("moe_vlm")

CONFIG_FILE = "config.json"
STAGES = schema.STAGES
PRETRAIN = 0  # the vision tower's pre-training, run as "stage 0" before stage 1

Settings = schema.ExperimentConfig


def settings_of(c: ml_collections.ConfigDict | Settings) -> Settings:
  """The typed, validated settings of an experiment config (ConfigDict or parsed)."""
  return c if isinstance(c, Settings) else schema.parse(c)


# ---------------------------------------------------------------- model configs


def ensure_image_token(tokenizer: Any, vocab_size: int) -> int:
  """Id of `<image>`, added as a special token when the tokenizer lacks it. Pretrained LLMs
  have spare embedding rows past the tokenizer (Phi-2 51200 vs 50295 tokens, Qwen1.5
  151936 vs 151646, StableLM-2 100352 vs 100289): the new id lands in one of them."""
  if tokenizer_lib.IMAGE not in tokenizer.get_vocab():
    tokenizer.add_special_tokens({"additional_special_tokens": [tokenizer_lib.IMAGE]},
                                 replace_extra_special_tokens=False)
  token = tokenizer_lib.image_token_id(tokenizer)
  if token >= vocab_size:
    raise ValueError(f"<image> got id {token}, outside the model's {vocab_size} embedding "
                     "rows; use a model with spare rows or a larger vocab_size")
  return token


# Qwen2-VL's image placeholder token in its tokenizer.
QWEN2_VL_IMAGE = "<|image_pad|>"


def _from_checkpoint(block: str, ours: Any, theirs: Any, path: str) -> Any:
  """The checkpoint's architecture with our execution fields; an architecture field set
  in the experiment config (not its default) would be silently ignored: refuse it."""
  default = type(ours)()
  execution = schema.EXECUTION_FIELDS[block]
  clash = [f.name for f in dataclasses.fields(ours) if f.name not in execution
           and f.name not in ("moe", "lora_moe")
           and getattr(ours, f.name) != getattr(default, f.name)]
  if clash:
    raise ConfigError(f"model.{block}.{clash[0]} is set in the config, but the {block} "
                      f"architecture comes from the checkpoint {path} (init); remove "
                      f"model.{block}.{', '.join(clash)} or the checkpoint")
  return dataclasses.replace(theirs, **{f: getattr(ours, f) for f in execution})


def model_config(c: ml_collections.ConfigDict | Settings, tokenizer: Any) -> VLMConfig:
  """The dense (stage 1-2) model config. Parts loaded from HF checkpoints (`init`) take
  their architecture from the checkpoint's config.json; otherwise `model` says it.
  Adds `<image>` to `tokenizer` when it lacks it (see `ensure_image_token`)."""
  from moe_vlm.convert import hf

  s = settings_of(c)
  m = s.model
  # A checkpoint of the whole VLM (a LLaVA directory, or a converted checkpoint of ours)
  # fixes every architecture field; the config keeps only the execution ones.
  whole, whole_path = None, s.init.hf_llava or s.init.ckpt
  if s.init.hf_llava:  # a LlavaForConditionalGeneration or Qwen2-VL directory
    whole = hf.vlm_config_from_hf(hf.load_hf_config(s.init.hf_llava))
  elif s.init.ckpt:
    whole = converted_config(s.init.ckpt)
  if whole is not None:
    text = _from_checkpoint("text", m.text, whole.text, whole_path)
  elif s.init.hf_llm:
    text = _from_checkpoint("text", m.text,
                            hf.text_config_from_hf(hf.load_hf_config(s.init.hf_llm)),
                            s.init.hf_llm)
  elif m.text.vocab_size == 0:  # the tokenizer's size, padded so the vocab shards evenly
    text = dataclasses.replace(m.text, vocab_size=-(-len(tokenizer) // 64) * 64)
  else:
    text = m.text
  if whole is not None:
    vision = _from_checkpoint("vision", m.vision, whole.vision, whole_path)
  elif s.init.hf_vision:
    theirs = hf.vision_config_from_hf(hf.vision_part(hf.load_hf_config(s.init.hf_vision)))
    vision = _from_checkpoint("vision", m.vision, theirs, s.init.hf_vision)
  else:
    vision = m.vision
  optional = {"perceiver": m.perceiver} if m.perceiver is not None else {}
  wiring = dict(projector=m.projector, vision_feature_layer=m.vision_feature_layer,
                vision_feature_select_strategy=m.vision_feature_select_strategy,
                visual_expert=m.visual_expert)
  if whole is not None:
    wiring = dict(projector=whole.projector, vision_feature_layer=whole.vision_feature_layer,
                  vision_feature_select_strategy=whole.vision_feature_select_strategy,
                  visual_expert=whole.visual_expert)
    optional = {"perceiver": whole.perceiver}
  if s.init.ckpt:
    # The checkpoint's image id stands (a released MoE-LLaVA model's lies on a reserved
    # row its tokenizer does not produce); a tokenizer with another <image> is not its.
    image_token_id = whole.image_token_id
    theirs = tokenizer.get_vocab().get(tokenizer_lib.IMAGE)
    if theirs is not None and theirs != image_token_id:
      raise ConfigError(f"the tokenizer maps <image> to {theirs} but {s.init.ckpt} uses "
                        f"{image_token_id}: set data.tokenizer to the checkpoint's tokenizer")
  elif whole is not None and whole.vision.native and (
      tokenizer.get_vocab().get(QWEN2_VL_IMAGE) == whole.image_token_id):
    # Qwen2-VL's own tokenizer: its <|image_pad|> is the image id (the templates expand
    # `<image>` to image ids themselves, the tokenizer never sees it).
    image_token_id = whole.image_token_id
  else:
    image_token_id = ensure_image_token(tokenizer, text.vocab_size)
  if s.init.hf_llava and image_token_id != whole.image_token_id:
    raise ConfigError(f"the tokenizer ({s.data.tokenizer or s.init.hf_llava}) maps <image> "
                      f"to {image_token_id} but {s.init.hf_llava} uses {whole.image_token_id};"
                      " set data.tokenizer to the LLaVA checkpoint's tokenizer")
  cfg = VLMConfig(vision=vision, text=text, image_token_id=image_token_id, **wiring,
                  **optional)
  cfg.validate()
  return cfg


def pretrain_model_config(c: ml_collections.ConfigDict | Settings,
                          dense: VLMConfig) -> VLMConfig:
  """The vision tower's captioning model (`vision_pretrain`): the dense model's tower,
  feature layer and image tokens, a fresh `mlp2x_gelu` projector (Qwen2-VL: a fresh
  patch merger) and the LLM's
  architecture cut to `vision_pretrain.decoder_layers` plain layers."""
  s = settings_of(c)
  text = dataclasses.replace(dense.text, num_layers=s.vision_pretrain.decoder_layers,
                             moe=None, lora_moe=None, language_expert=None)
  # Qwen2-VL's tower comes with its own projector (the merger reads its merge groups).
  projector = dense.projector if dense.vision.native else "mlp2x_gelu"
  cfg = VLMConfig(vision=dense.vision, text=text, projector=projector,
                  vision_feature_layer=dense.vision_feature_layer,
                  vision_feature_select_strategy=dense.vision_feature_select_strategy,
                  image_token_id=dense.image_token_id)
  cfg.validate()
  return cfg


def stage_model_config(c: ml_collections.ConfigDict | Settings, dense: VLMConfig,
                       k: int) -> VLMConfig:
  """Stage k's model: the dense one, plus the LoRA of its preset (Awaker2.5-VL's single
  LoRA or LoRA experts) or in stage 3 the MoE layers; "stage 0" is the vision tower's
  pre-training (`pretrain_model_config`)."""
  s = settings_of(c)
  if k == PRETRAIN:
    return pretrain_model_config(s, dense)
  if k not in STAGES:
    raise ValueError(f"stage {k}: MoE-Tuning has stages 1, 2 and 3")
  form = LORA_FORMS.get(s.stages.get(k).train)
  if form is not None:  # Awaker2.5-VL: the LoRA's form is the stage preset's
    lora = dataclasses.replace(s.lora_moe, single=form == "single")
    text = dataclasses.replace(dense.text, lora_moe=lora)
  elif k != 3:
    return dense
  elif dense.text.moe is not None:
    # A checkpoint with MoE layers already (init.ckpt, e.g. a released MoE-LLaVA model):
    # no upcycling; its experts stay what they are and the `moe` block sets how they run.
    text = dataclasses.replace(dense.text, moe=dataclasses.replace(
        s.moe, **{f: getattr(dense.text.moe, f) for f in MOE_ARCHITECTURE}))
  else:
    text = dataclasses.replace(dense.text, moe=s.moe)
  cfg = dataclasses.replace(dense, text=text)
  cfg.validate()
  return cfg


# MoEConfig fields that say what the experts are (from a checkpoint that has them),
# the others how tokens are routed to them (from the experiment's `moe` block).
MOE_ARCHITECTURE = ("num_experts", "top_k", "moe_mode", "moe_layers_idx", "renormalize",
                    "expert_intermediate_size")

# A converted checkpoint (`moe-vlm convert from-hf` output), the other model directory
# this project reads: the one place that spells its layout.
CKPT_PARAMS, CKPT_CONFIG, CKPT_TOKENIZER = "params", "moe_vlm_config.json", "tokenizer"
CKPT_PROCESSOR = "preprocessor_config.json"


def converted_config(ckpt: str) -> VLMConfig:
  """The VLMConfig a converted checkpoint was written with."""
  path = os.path.join(ckpt, CKPT_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {ckpt} is not a converted checkpoint (make "
                            "one with `moe-vlm convert from-hf`)")
  with open(path) as f:
    return from_dict(VLMConfig, json.load(f), CKPT_CONFIG)


# ------------------------------------------------------------------ the experiment


class Experiment:
  """An experiment config bound to its workdir (local path or gs://)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.settings = schema.parse(config)
    self.workdir = os.fspath(workdir)

  @classmethod
  def from_workdir(cls, workdir: str,
                   config: Optional[ml_collections.ConfigDict] = None) -> "Experiment":
    """The experiment a workdir was trained with: `config` when given, else the
    `config.json` that `train` wrote there."""
    if config is None:
      path = ckpt_lib.as_path(workdir) / CONFIG_FILE
      if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir "
                                "(pass the experiment config with --config, or a "
                                "converted checkpoint with --ckpt)")
      config = ml_collections.ConfigDict(json.loads(path.read_text()))
    return cls(config, workdir)

  # ---------------------------------------------------------------- layout

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  @property
  def config_path(self) -> str:
    return self.path(CONFIG_FILE)

  @property
  def data_dir(self) -> str:
    return self.settings.data.dir or self.path("data")

  @property
  def image_root(self) -> str:
    return self.settings.data.image_root or self.data_dir

  @property
  def tokenizer_dir(self) -> str:
    s = self.settings
    if s.init.ckpt and not s.data.tokenizer:
      return os.path.join(s.init.ckpt, CKPT_TOKENIZER)
    return (s.data.tokenizer or s.init.hf_llm or s.init.hf_llava
            or os.path.join(self.data_dir, "tokenizer"))

  def stage_dir(self, k: int) -> str:
    """stage<k>/, and vision_pretrain/ for k = PRETRAIN."""
    return self.path("vision_pretrain" if k == PRETRAIN else f"stage{k}")

  def checkpoint_dir(self, k: int) -> str:
    return os.path.join(self.stage_dir(k), "checkpoints")

  def final_dir(self, k: int) -> str:
    return os.path.join(self.stage_dir(k), "final")

  def has_final(self, k: int) -> bool:
    return ckpt_lib.has_params(self.final_dir(k))

  @property
  def pretrains_vision(self) -> bool:
    """Whether stage 1 starts from the tower of `vision_pretrain` (steps > 0)."""
    return self.settings.vision_pretrain.steps > 0

  def stage(self, k: int) -> schema.StageSettings:
    if k == PRETRAIN:
      return self.settings.vision_pretrain.stage()
    return self.settings.stages.get(k)

  def stage_config(self, k: int) -> ml_collections.ConfigDict:
    """`stages.stage<k>` of the ConfigDict (what older code paths read)."""
    return self.config.stages[f"stage{k}"]

  def write_config(self) -> None:
    """config.json, by process 0, replaced atomically."""
    write_json(self.config_path, json.loads(self.config.to_json_best_effort()))

  # ---------------------------------------------------------------- data

  def prepare_data(self) -> None:
    """Writes the synthetic held-out set (training samples are computed per index, see
    `moe_vlm.data.synthetic`) and the tokenizer on first use (process 0 writes; the
    others wait for it: the data dir must be on a shared file system)."""
    s = self.settings
    if s.data.kind != "synthetic":
      return
    from moe_vlm.data import synthetic
    if jax.process_index() == 0:
      if not os.path.exists(os.path.join(self.data_dir, "meta.json")):
        log.info("writing the synthetic held-out set to %s", self.data_dir)
        synthetic.generate(self.data_dir, num_eval_images=s.data.num_eval_images,
                           image_size=s.data.image_size, seed=s.seed, grid=s.data.grid)
      if not os.path.exists(os.path.join(self.tokenizer_dir, "tokenizer.json")):
        tokenizer_lib.train_tokenizer(synthetic.corpus(self.data_dir), self.tokenizer_dir)
    sync("moe_vlm: synthetic data ready")

  @functools.cached_property
  def _dense_and_tokenizer(self) -> tuple[VLMConfig, Any]:
    tokenizer = tokenizer_lib.load_tokenizer(self.tokenizer_dir)
    return model_config(self.settings, tokenizer), tokenizer

  @property
  def tokenizer(self) -> Any:
    """The tokenizer, `<image>` added as training adds it (see `ensure_image_token`)."""
    return self._dense_and_tokenizer[1]

  # ---------------------------------------------------------------- models

  @property
  def dense_config(self) -> VLMConfig:
    """The stage 1-2 model config."""
    return self._dense_and_tokenizer[0]

  def model_config(self, k: int) -> VLMConfig:
    """Stage k's VLMConfig."""
    return stage_model_config(self.settings, self.dense_config, k)

  def mesh(self) -> jax.sharding.Mesh:
    """The training mesh of `mesh` (over all processes' devices)."""
    m = self.settings.mesh
    shape = {a: getattr(m, a) for a in mesh_lib.MESH_AXES}
    dcn = {a: getattr(m.dcn, a) for a in mesh_lib.MESH_AXES}
    return mesh_lib.make_mesh(shape, dcn=dcn)

  def load_params(self, k: int, mesh: Optional[jax.sharding.Mesh] = None) -> Params:
    """Stage k's final parameters, each restored straight onto its sharding on `mesh`
    (every process reads only its shards); without a mesh, onto the default device."""
    final = self.final_dir(k)
    if not ckpt_lib.has_params(final):
      raise FileNotFoundError(f"{final} holds no parameters: stage {k} has not finished "
                              "in this workdir")
    return load_params(final, self.model_config(k), mesh)

  def load_dense_params(self, directory: str,
                        mesh: Optional[jax.sharding.Mesh] = None) -> Params:
    """A flat params directory of this experiment's dense model (`init.params`), onto
    `mesh`."""
    if not ckpt_lib.has_params(directory):
      raise FileNotFoundError(f"init.params={directory} holds no parameters (expected a "
                              "flat params directory, e.g. another run's stage2/final)")
    return load_params(directory, self.dense_config, mesh)

  def init_checkpoint_params(self, mesh: Optional[jax.sharding.Mesh] = None) -> Params:
    """The parameters of `init.ckpt` (a converted checkpoint), onto `mesh`: where the
    run's first stage starts when it has no predecessor in this workdir."""
    ckpt = self.settings.init.ckpt
    if not ckpt:
      raise ValueError("init.ckpt is not set")
    return load_params(os.path.join(ckpt, CKPT_PARAMS), self.dense_config, mesh)

  def load_model(self, k: int, mesh: Optional[jax.sharding.Mesh] = None) -> VLM:
    """Stage k's trained model (see `load_params`)."""
    cfg = self.model_config(k)
    return placement.abstract_codec(cfg).merge(self.load_params(k, mesh))


def load_params(directory: str, cfg: VLMConfig,
                mesh: Optional[jax.sharding.Mesh] = None) -> Params:
  """A flat params checkpoint (a stage's `final/`, a converted `params/`) of a model of
  config `cfg`, onto `mesh` by the parameters' logical axes (or the default device)."""
  codec = placement.abstract_codec(cfg)
  shardings = None if mesh is None else placement.shardings(cfg, mesh)
  return ckpt_lib.load_params(directory, codec.shapes, shardings)
