"""MoE-Tuning driver: runs the stages, hands parameters from stage to stage, resumes.

Layout of a workdir:
  data/                  synthetic data + tokenizer (when the config asks for them)
  stage<k>/checkpoints/  Orbax TrainState checkpoints (+ data iterator state, counters)
  stage<k>/final/        the stage's parameters, input of stage k+1
  stage<k>/tb/           TensorBoard event files; stage<k>/metrics.jsonl the same as JSON
  stage<k>/bad_samples.json   skipped samples by reason
A stage whose `final/` exists is done and skipped; one with checkpoints resumes from
the latest (same data order), so a killed run loses nothing past its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_vlm.data import pipeline as pipeline_lib
from moe_vlm.data import synthetic, tokenizer as tokenizer_lib
from moe_vlm.data.llava import LlavaJsonSource
from moe_vlm.models import config as config_lib
from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import checkpoint as ckpt_lib
from moe_vlm.train import stages as stages_lib
from moe_vlm.train import step as step_lib
from moe_vlm.train.optim import OptimConfig
from moe_vlm.train.upcycle import upcycle, with_moe

log = logging.getLogger("moe_vlm")


class DataQualityError(RuntimeError):
  """Too many bad samples: the data set (or its paths) is likely broken."""


class Preempted(RuntimeError):
  """SIGTERM arrived; a checkpoint was saved. Rerun the same command to resume."""


# ------------------------------------------------------------------ config -> objects


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


def model_config(c: ml_collections.ConfigDict, tokenizer: Any) -> VLMConfig:
  """The dense (stage 1-2) model config. Parts loaded from HF checkpoints (`c.init`) take
  their architecture from the checkpoint's config.json; otherwise `c.model` says it."""
  from moe_vlm.convert import hf

  text_cfg = dict(c.model.text)
  if c.init.hf_llm:
    text = hf.text_config_from_hf(hf.load_hf_config(c.init.hf_llm), text_cfg["dtype"])
    # Execution settings the checkpoint's config.json does not carry come from c.model.
    text = dataclasses.replace(
        text, remat=text_cfg.get("remat", "none"),
        attention_causal_blocks=text_cfg.get("attention_causal_blocks",
                                             TextConfig.attention_causal_blocks))
  else:
    if not text_cfg.get("vocab_size"):
      text_cfg["vocab_size"] = -(-len(tokenizer) // 64) * 64  # padded: shards evenly
    text = config_lib.from_dict(TextConfig, text_cfg, "model.text")
  if c.init.hf_vision:
    vision = hf.vision_config_from_hf(_vision_part(hf.load_hf_config(c.init.hf_vision)),
                                      c.model.vision.get("dtype", "float32"))
  else:
    vision = VisionConfig(**dict(c.model.vision))
  if c.init.hf_llm and c.model.text.get("language_expert"):
    text = dataclasses.replace(text, language_expert=config_lib.from_dict(
        config_lib.HyperExpertConfig, dict(c.model.text.language_expert),
        "model.text.language_expert"))
  # Optional parts of the other seed designs (absent keys keep the MoE-LLaVA defaults).
  optional = {}
  if c.model.get("perceiver"):
    optional["perceiver"] = config_lib.from_dict(config_lib.PerceiverConfig,
                                                 dict(c.model.perceiver), "model.perceiver")
  if c.model.get("visual_expert"):
    optional["visual_expert"] = config_lib.from_dict(
        config_lib.HyperExpertConfig, dict(c.model.visual_expert), "model.visual_expert")
  return VLMConfig(vision=vision, text=text, projector=c.model.projector,
                   vision_feature_layer=c.model.vision_feature_layer,
                   vision_feature_select_strategy=c.model.vision_feature_select_strategy,
                   image_token_id=ensure_image_token(tokenizer, text.vocab_size), **optional)


def _vision_part(hf_config: Any) -> Any:
  # CLIPModel / SiglipModel directories hold text and vision towers: take the vision one.
  return getattr(hf_config, "vision_config", None) or hf_config


def moe_config(c: ml_collections.ConfigDict) -> MoEConfig:
  moe = dict(c.moe)
  if moe.get("moe_layers_idx") is not None:
    moe["moe_layers_idx"] = tuple(moe["moe_layers_idx"])
  return MoEConfig(**moe)


# What stage 3 adds to the stage-2 model (`c.stage3_kind`): MoE-LLaVA's upcycled MoE
# layers, Awaker2.5-VL's LoRA experts on the frozen model (`c.lora_moe`), or nothing
# (HyperLLaVA is a two-stage method: run stages 1-2).
STAGE3_KINDS = ("moe", "lora")


def stage3_kind(c: ml_collections.ConfigDict) -> str:
  kind = c.get("stage3_kind", "moe")
  if kind not in STAGE3_KINDS:
    raise ValueError(f"stage3_kind={kind!r}: expected one of {STAGE3_KINDS}")
  return kind


def lora_moe_config(c: ml_collections.ConfigDict) -> config_lib.LoRAMoEConfig:
  if not c.get("lora_moe"):
    raise ValueError("stage3_kind='lora' needs a `lora_moe` config block")
  return config_lib.from_dict(config_lib.LoRAMoEConfig, dict(c.lora_moe), "lora_moe")


def stage_model_config(c: ml_collections.ConfigDict, dense: VLMConfig, k: int) -> VLMConfig:
  if k != 3:
    return dense
  if stage3_kind(c) == "lora":
    return dataclasses.replace(dense, text=dataclasses.replace(
        dense.text, lora_moe=lora_moe_config(c)))
  return with_moe(dense, moe_config(c))


def add_new_params(params: dict, cfg: VLMConfig, seed: int) -> dict[str, np.ndarray]:
  """`params` completed with freshly initialised parameters for what `cfg` adds (e.g.
  LoRA experts, whose zero B keeps the model's function unchanged)."""
  fresh = VLM(cfg, rngs=nnx.Rngs(seed))
  full = ckpt_lib.to_host(ParamCodec(fresh).flatten(fresh))
  unknown = sorted(set(params) - set(full))
  if unknown:
    raise ValueError(f"parameters {unknown[:3]} do not exist in the new model config")
  return {**full, **{k: np.asarray(v) for k, v in params.items()}}


def prepare_data(c: ml_collections.ConfigDict, workdir: str) -> tuple[str, Any]:
  """Data directory and tokenizer; generates the synthetic set on first use."""
  data_dir = c.data.dir or os.path.join(workdir, "data")
  tok_dir = c.data.tokenizer or c.init.hf_llm or os.path.join(data_dir, "tokenizer")
  if c.data.kind == "synthetic":
    # Process 0 writes the data and tokenizer; the others wait for it (the data dir must
    # be on a shared file system, or generated on each host beforehand).
    if jax.process_index() == 0:
      if not os.path.exists(os.path.join(data_dir, "meta.json")):
        log.info("generating the synthetic data set in %s", data_dir)
        synthetic.generate(data_dir, num_images=c.data.num_images,
                           image_size=c.data.image_size, seed=c.seed)
      if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tokenizer_lib.train_tokenizer(synthetic.corpus(data_dir), tok_dir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("moe_vlm: synthetic data ready")
  elif c.data.kind not in ("llava_json", "tfds"):
    raise ValueError(f"data.kind={c.data.kind!r}: expected 'synthetic', 'llava_json' or "
                     "'tfds'")
  return data_dir, tokenizer_lib.load_tokenizer(tok_dir)


class ConcatSource:
  """Several LLaVA JSON files as one random-access source (stage 2 mixes five)."""

  def __init__(self, sources: Sequence[LlavaJsonSource]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(x) for x in self.sources])
    self.skipped: dict[str, int] = {}
    for x in self.sources:
      for reason, n in x.skipped.items():
        self.skipped[reason] = self.skipped.get(reason, 0) + n

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int):
    i = int(np.searchsorted(self.offsets, index, side="right")) - 1
    return self.sources[i][index - int(self.offsets[i])]


def stage_source(c: ml_collections.ConfigDict, files: str, data_dir: str):
  """A stage's data: one or more comma-separated LLaVA JSON files under the data dir, or
  with `data.kind="tfds"` a `name:split` read through `tfds.data_source` (random access,
  examples with an encoded `image` and a JSON `conversations` string)."""
  if c.data.kind == "tfds":
    import tensorflow_datasets as tfds
    from moe_vlm.data.llava import TfdsSource
    name, _, split = files.partition(":")
    source = TfdsSource(tfds.data_source(name, split=split or "train",
                                         data_dir=c.data.dir or None))
    source.skipped = {}  # malformed TFDS examples are counted per batch instead
    return source
  root = c.data.get("image_root") or data_dir
  paths = [os.path.join(data_dir, f.strip()) for f in files.split(",") if f.strip()]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"stage data files not found: {missing} (data.dir={data_dir})")
  sources = [LlavaJsonSource(p, image_root=root) for p in paths]
  return sources[0] if len(sources) == 1 else ConcatSource(sources)


def preprocess_config(c: ml_collections.ConfigDict, cfg: VLMConfig,
                      template: str) -> pipeline_lib.PreprocessConfig:
  return pipeline_lib.PreprocessConfig(
      template=template, max_length=c.data.max_length,
      num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id,
      image_size=cfg.vision.image_size, normalization=c.data.normalization)


def initial_params(c: ml_collections.ConfigDict, cfg: VLMConfig) -> dict[str, np.ndarray]:
  """Stage-1 starting point: random init, overwritten by any pretrained HF parts."""
  model = VLM(cfg, rngs=nnx.Rngs(c.seed))
  if c.init.hf_llava:
    from moe_vlm.convert import hf
    model = hf.import_llava(hf.load_safetensors(c.init.hf_llava),
                            hf.load_hf_config(c.init.hf_llava))
  params = ckpt_lib.to_host(ParamCodec(model).flatten(model))
  if c.init.hf_vision or c.init.hf_llm:
    from moe_vlm.convert import hf
    for prefix, path in (("vision.", c.init.hf_vision), ("llm.", c.init.hf_llm)):
      if not path:
        continue
      part, _ = hf.import_pretrained(path)
      for name, value in ParamCodec(part).flatten(part).items():
        key = prefix + name
        if key not in params or params[key].shape != value.shape:
          raise ValueError(f"{path}: parameter {name} {tuple(value.shape)} does not fit the "
                           f"configured model ({key}); align config.model with the checkpoint")
        params[key] = np.asarray(value)
  return params


def upcycle_params(dense_params: dict, dense_cfg: VLMConfig, moe: MoEConfig,
                   seed: int) -> dict[str, np.ndarray]:
  codec = ParamCodec.abstract(lambda: VLM(dense_cfg, rngs=nnx.Rngs(0)))
  model = upcycle(codec.merge(dense_params), moe, seed=seed)
  return ckpt_lib.to_host(ParamCodec(model).flatten(model))


# ------------------------------------------------------------------------ one stage


@dataclasses.dataclass
class Counters:
  samples: int = 0
  bad: dict = dataclasses.field(default_factory=dict)
  truncated: int = 0
  tokens: int = 0

  def add_batch(self, batch: dict) -> None:
    self.samples += int(batch["ok"].shape[0])
    for reason, n in pipeline_lib.summarize_bad(batch).items():
      if reason != "ok" and n:
        self.bad[reason] = self.bad.get(reason, 0) + int(n)
    self.truncated += int(np.sum(batch["truncated"]))
    self.tokens += int(np.sum(batch["attention_mask"]))


class _SigtermFlag:
  """Turns SIGTERM (TPU preemption notice) into a flag the loop checks between steps."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, preemption ends the process
      self._previous = None
    return self

  def _handle(self, *_):
    self.raised = True

  def agreed(self, step: int) -> bool:
    """Whether to stop after `step`. On several hosts all must stop at the same step (the
    checkpoint save is collective), so the flags are OR-ed across processes each step."""
    if jax.process_count() == 1:
      return self.raised
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.raised, np.int32))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricsWriter:
  """TensorBoard events + a JSONL mirror, written by process 0 only.

  Object stores (gs://) cannot append, so the JSONL is rewritten whole there.
  """

  def __init__(self, directory: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter
      path = ckpt_lib.as_path(directory)
      path.mkdir(parents=True, exist_ok=True)
      self.tb = SummaryWriter(str(path / "tb"))
      self.jsonl = path / "metrics.jsonl"
      self.lines = self.jsonl.read_text().splitlines() if self.jsonl.exists() else []

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.lines.append(json.dumps({"step": step, **scalars}))
    self.jsonl.write_text("\n".join(self.lines) + "\n")

  def close(self) -> None:
    if self.enabled:
      self.tb.close()


def step_config(c: ml_collections.ConfigDict, s: ml_collections.ConfigDict,
                total_steps: int) -> step_lib.StepConfig:
  """The train step's settings for stage config `s` (`c.stages.stageK`)."""
  head_fraction = s.get("head_fraction", 0.0)  # 0: the LM head on every position
  return step_lib.StepConfig(
      optim=OptimConfig(learning_rate=s.learning_rate, warmup_ratio=s.warmup_ratio,
                        total_steps=total_steps, weight_decay=s.weight_decay,
                        clip_norm=s.clip_norm),
      grad_accum=s.grad_accum, aux_loss_coef=c.moe.aux_loss_coef,
      z_loss_coef=c.moe.z_loss_coef, head_fraction=head_fraction or None)


def _scalars(metrics: dict, counters: Counters, rate: float) -> dict[str, float]:
  out = {k: float(metrics[k]) for k in ("loss", "aux_loss", "z_loss", "grad_norm", "lr")}
  out["tokens_per_s"] = rate
  out["head_full"] = float(metrics["head_full"])  # share of steps that ran the full LM head
  out["bad_samples"] = float(sum(counters.bad.values()))
  out["truncated_samples"] = float(counters.truncated)
  if "moe/tokens_per_expert" in metrics:
    for name in ("tokens_per_expert", "tokens_per_expert_image", "tokens_per_expert_text"):
      load = np.asarray(metrics[f"moe/{name}"], np.float64)
      frac = load / np.maximum(load.sum(-1, keepdims=True), 1)
      for layer, row in enumerate(frac):
        for e, v in enumerate(row):
          out[f"moe/{name}/layer{layer}/expert{e}"] = float(v)
    out["moe/dropped_fraction"] = float(np.mean(metrics["moe/dropped_fraction"]))
  return out


def _check_bad(counters: Counters, skipped_at_load: dict, limit: float, where: str) -> None:
  bad = sum(counters.bad.values()) + sum(skipped_at_load.values())
  seen = counters.samples + sum(skipped_at_load.values())
  if seen >= 50 and bad / seen > limit:
    raise DataQualityError(
        f"{where}: {bad} of {seen} samples were bad ({dict(counters.bad)}, malformed at load: "
        f"{skipped_at_load}), above data.max_bad_fraction={limit}. Check the JSON and the "
        "image folder.")


def run_stage(k: int, c: ml_collections.ConfigDict, workdir: str, dense_cfg: VLMConfig,
              tokenizer: Any, data_dir: str, mesh, init: Callable[[], dict],
              *, stop_after: Optional[int] = None) -> dict[str, np.ndarray]:
  """Trains stage k and returns its final params (host). `stop_after` ends the run after
  that many steps without finishing the stage (tests use it to simulate a kill)."""
  s = c.stages[f"stage{k}"]
  stage_dir = os.path.join(workdir, f"stage{k}")
  cfg = stage_model_config(c, dense_cfg, k)
  codec = ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  final_dir = os.path.join(stage_dir, "final")
  if ckpt_lib.has_params(final_dir):
    log.info("stage %d already finished (%s); skipping", k, final_dir)
    return ckpt_lib.load_params(final_dir, codec.shapes)

  source = stage_source(c, s.data, data_dir)
  nproc = jax.process_count()
  if s.batch_size % nproc:
    raise ValueError(f"stages.stage{k}.batch_size={s.batch_size} not divisible by "
                     f"{nproc} processes")
  steps = s.steps or max(1, s.epochs * len(source) // s.batch_size)
  mesh_lib.check_model_fits_mesh(cfg, mesh, s.batch_size)
  trainable = stages_lib.trainable_fn(s.train, tuple(s.extra_modules))
  step_cfg = step_config(c, s, steps)
  tx = step_lib.make_optimizer(step_cfg.optim)
  shardings = step_lib.state_shardings(codec, trainable, mesh, tx)
  data = pipeline_lib.make_pipeline(
      source, pipeline_lib.Preprocess(tokenizer, preprocess_config(c, cfg, s.template)),
      batch_size=s.batch_size // nproc, seed=c.seed + k, process_index=jax.process_index(),
      process_count=nproc, worker_count=c.data.worker_count)
  it = iter(data)
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(stage_dir, "checkpoints"),
                                    keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
  counters = Counters()
  if ckpts.latest_step() is not None:
    like = jax.eval_shape(lambda: step_lib.init_state(
        {n: jnp.zeros(v.shape, v.dtype) for n, v in codec.shapes.items()}, trainable, tx))
    state, extras = ckpts.restore(like, shardings)
    it.set_state(extras["data_iter"])
    counters = Counters(**extras["counters"])
    log.info("stage %d: resumed from step %d", k, int(state.step))
  else:
    state = step_lib.init_state(init(), trainable, tx, shardings, seed=c.seed + k)
  log.info("stage %d: %s, %d steps, batch %d, %s", k, s.train, steps, s.batch_size,
           stages_lib.describe(codec.names, trainable))

  writer = MetricsWriter(stage_dir)
  first = next(it)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(codec, step_cfg, tx), mesh,
                                       shardings, first)
  bsh = step_lib.batch_shardings(mesh, first)
  start = int(state.step)
  progress = _progress(steps, start, k)
  t0, tokens0, batch = time.perf_counter(), counters.tokens, first
  in_flight = None  # the previous step's loss: block on it so the host stays one step ahead

  def extras() -> dict:
    return {"data_iter": it.get_state(), "counters": dataclasses.asdict(counters)}

  try:
    with _SigtermFlag() as sigterm:
      for step in range(start, steps):
        if step > start:
          batch = next(it)
        counters.add_batch(batch)
        _check_bad(counters, source.skipped, c.data.max_bad_fraction, f"stage {k}")
        device_batch = {key: jax.make_array_from_process_local_data(bsh[key], batch[key])
                        for key in step_lib.MODEL_INPUTS}
        state, metrics = train_step(state, device_batch)
        if in_flight is not None:
          in_flight.block_until_ready()  # progress and tokens/s then measure real work
        in_flight = metrics["loss"]
        done = step + 1
        if done % c.log_every == 0 or done == steps:
          metrics = jax.device_get(metrics)
          rate = (counters.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
          scalars = _scalars(metrics, counters, rate)
          writer.write(done, scalars)
          progress.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{rate:.0f}")
          _write_json(os.path.join(stage_dir, "bad_samples.json"),
                      {"samples": counters.samples, "bad": counters.bad,
                       "malformed_at_load": source.skipped, "truncated": counters.truncated})
          t0, tokens0 = time.perf_counter(), counters.tokens
        progress.update(1)
        stop = sigterm.agreed(done)
        if done % c.checkpoint.every_steps == 0 or stop:
          ckpts.save(done, state, extras(), force=stop)
        if stop:
          ckpts.wait()
          raise Preempted(f"stage {k}: SIGTERM at step {done}; checkpoint saved, rerun the "
                          "same command to resume")
        if stop_after is not None and done >= stop_after:
          ckpts.wait()
          return {}
      if ckpts.latest_step() != steps:
        ckpts.save(steps, state, extras(), force=True)
  finally:
    progress.close()
    writer.close()
    ckpts.close()
  params = ckpt_lib.to_host({**state.frozen, **state.params})
  ckpt_lib.save_params(final_dir, params)
  return params


def _progress(total: int, initial: int, k: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=f"stage {k}", unit="step",
              disable=jax.process_index() != 0, dynamic_ncols=True)


def _write_json(path: str, obj: Any) -> None:
  """Process 0 writes; local files are replaced atomically, object stores write whole."""
  if jax.process_index() != 0:
    return
  if "://" in path:
    ckpt_lib.as_path(path).write_text(json.dumps(obj, indent=2))
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


# ------------------------------------------------------------------------ all stages


def train(c: ml_collections.ConfigDict, workdir: str, stages: Sequence[int] = (1, 2, 3),
          *, stop_after: Optional[int] = None) -> dict[int, dict[str, np.ndarray]]:
  """Runs the requested stages in order; each starts from the previous stage's final."""
  ckpt_lib.as_path(workdir).mkdir(parents=True, exist_ok=True)
  _write_json(os.path.join(workdir, "config.json"), json.loads(c.to_json_best_effort()))
  data_dir, tokenizer = prepare_data(c, workdir)
  dense_cfg = model_config(c, tokenizer)
  mesh = mesh_lib.make_mesh(dict(c.mesh))
  results: dict[int, dict[str, np.ndarray]] = {}

  def previous(k: int) -> dict[str, np.ndarray]:
    if k - 1 in results:
      return results[k - 1]
    prev_cfg = stage_model_config(c, dense_cfg, k - 1)
    codec = ParamCodec.abstract(lambda: VLM(prev_cfg, rngs=nnx.Rngs(0)))
    final = os.path.join(workdir, f"stage{k - 1}", "final")
    if not ckpt_lib.has_params(final):
      raise FileNotFoundError(f"stage {k} starts from stage {k - 1}'s parameters, but "
                              f"{final} does not exist: run stage {k - 1} first")
    return ckpt_lib.load_params(final, codec.shapes)

  for k in stages:
    if k == 1:
      init = lambda: initial_params(c, dense_cfg)
    elif k == 2:
      init = lambda: previous(2)
    elif k == 3:
      if stage3_kind(c) == "lora":
        init = lambda: add_new_params(previous(3), stage_model_config(c, dense_cfg, 3), c.seed)
      else:
        init = lambda: upcycle_params(previous(3), dense_cfg, moe_config(c), c.seed)
    else:
      raise ValueError(f"stage {k}: MoE-Tuning has stages 1, 2 and 3")
    results[k] = run_stage(k, c, workdir, dense_cfg, tokenizer, data_dir, mesh, init,
                           stop_after=stop_after)
    if stop_after is not None:
      break
  return results
