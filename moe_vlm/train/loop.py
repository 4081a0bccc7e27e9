"""MoE-Tuning driver: runs the stages, hands parameters from stage to stage, resumes.

The workdir layout belongs to `moe_vlm.experiment.Experiment`. A stage whose `final/`
exists is done and skipped; one with checkpoints resumes from the latest (same data
order), so a killed run loses nothing past its last checkpoint.

Every stage's parameters stay sharded over the mesh from start to end: stage 1 starts
from a random init made under jit on the parameters' shardings (plus pretrained parts
read tensor by tensor onto them), each stage's `final/` is written by Orbax with every
process saving its own shards, the next stage restores it onto its own shardings, and
stage 3's experts are upcycled under jit straight onto the expert-sharded layout. No
step gathers a model on one host. All stages are validated before the first one
trains (`check_stages`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_vlm import checkpoint as ckpt_lib
from moe_vlm import schema
from moe_vlm.data import images as images_lib
from moe_vlm.data import packing as packing_lib
from moe_vlm.data import pipeline as pipeline_lib
from moe_vlm.data.llava import LlavaJsonSource
from moe_vlm.experiment import Experiment, settings_of
from moe_vlm.files import write_json
from moe_vlm.models.config import ConfigError, MoEConfig, VLMConfig
from moe_vlm.models.params import Params
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement
from moe_vlm.train import stages as stages_lib
from moe_vlm.train import step as step_lib
from moe_vlm.train.optim import OptimConfig
from moe_vlm.train.upcycle import lora_upcycle_params, upcycle_check, upcycle_params

log = logging.getLogger("moe_vlm")


class DataQualityError(RuntimeError):
  """Too many bad samples: the data set (or its paths) is likely broken."""


class Preempted(RuntimeError):
  """SIGTERM arrived; a checkpoint was saved. Rerun the same command to resume."""


class StageSettingsError(ConfigError):
  """A stage cannot run as configured; raised before any stage trains."""


class ConcatSource:
  """Several LLaVA JSON files as one random-access source (stage 2 mixes five)."""

  def __init__(self, sources: Sequence[LlavaJsonSource]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(x) for x in self.sources])
    self.skipped: dict[str, int] = {}
    self.errors: list[tuple[int, str]] = []  # (index in its file, message naming it)
    for x in self.sources:
      for reason, n in x.skipped.items():
        self.skipped[reason] = self.skipped.get(reason, 0) + n
      self.errors += x.errors

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int):
    i = int(np.searchsorted(self.offsets, index, side="right")) - 1
    return self.sources[i][index - int(self.offsets[i])]


def stage_files(files: str, data_dir: str) -> list[str]:
  """The LLaVA JSON files of a stage's `data` (comma-separated, under the data dir)."""
  return [os.path.join(data_dir, f.strip()) for f in files.split(",") if f.strip()]


def stage_source(c: ml_collections.ConfigDict | schema.ExperimentConfig, files: str,
                 data_dir: str, image_root: Optional[str] = None):
  """A stage's data: one or more comma-separated LLaVA JSON files under the data dir, or
  with `data.kind="tfds"` a `name:split` read through `tfds.data_source` (random access,
  examples with an encoded `image` and a JSON `conversations` string)."""
  data = settings_of(c).data
  if data.kind == "tfds":
    import tensorflow_datasets as tfds
    from moe_vlm.data.llava import TfdsSource
    name, _, split = files.partition(":")
    source = TfdsSource(tfds.data_source(name, split=split or "train",
                                         data_dir=data.dir or None))
    source.skipped = {}  # malformed TFDS examples are counted per batch instead
    return source
  paths = stage_files(files, data_dir)
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"stage data files not found: {missing} (data.dir={data_dir})")
  root = image_root or data.image_root or data_dir
  sources = [LlavaJsonSource(p, image_root=root) for p in paths]
  return sources[0] if len(sources) == 1 else ConcatSource(sources)


def synthetic_source(c: ml_collections.ConfigDict | schema.ExperimentConfig,
                     s: schema.StageSettings, k: int):
  """Stage k's synthetic data (`data.kind="synthetic"`): the mix `s.data`, computed per
  sample index; a new image for every sample the stage draws (steps x batch_size), or a
  pool of `data.num_images` repeated over epochs. Each stage draws its own images."""
  from moe_vlm.data import synthetic
  settings = settings_of(c)
  data = settings.data
  return synthetic.SyntheticSource(
      s.data, data.num_images or s.steps * s.batch_size, seed=settings.seed,
      image_size=data.image_size, grid=data.grid, stream=synthetic.stream_of(s.data, k))


def packing_config(data: schema.DataSettings,
                   cfg: VLMConfig) -> Optional[packing_lib.PackingConfig]:
  """`data.packing` as the pipeline's packing settings (None: one sample per row)."""
  if data.packing == "none":
    return None
  slots = data.images_per_row or packing_lib.default_images_per_row(data.max_length,
                                                                   cfg.num_image_tokens)
  return packing_lib.PackingConfig(mode=data.packing, max_length=data.max_length,
                                   images_per_row=slots)


def stage_data(source, exp: Experiment, cfg: VLMConfig, s: schema.StageSettings, k: int,
               mesh: jax.sharding.Mesh):
  """(steps, this process's pipeline) of a stage: `s.steps`, or `s.epochs` passes over
  the source in batches of rows (one sample each, or packed: `data.packing`)."""
  settings = exp.settings
  transform = pipeline_lib.Preprocess(exp.tokenizer,
                                      preprocess_config(settings.data, cfg, s.template))
  packing = packing_config(settings.data, cfg)
  plan = None
  rows_per_epoch = len(source)
  if packing is not None:
    plan = pipeline_lib.make_plan(source, transform, packing, batch_size=s.batch_size,
                                  seed=settings.seed + k)
    rows_per_epoch = plan.rows_in_epoch(0)
    log.info("stage %d: %s, %d samples in %d rows of %d tokens per epoch, padding %.1f%%",
             k, settings.data.packing, len(source), rows_per_epoch, packing.max_length,
             100 * plan.pad_fraction(0))
  steps = s.steps or max(1, s.epochs * rows_per_epoch // s.batch_size)
  # Global batch t is the same samples on any number of processes; each loads its rows.
  rows = mesh_lib.process_rows(mesh, s.batch_size)
  data = pipeline_lib.make_pipeline(source, transform, batch_size=s.batch_size, rows=rows,
                                    seed=settings.seed + k,
                                    worker_count=settings.data.worker_count, plan=plan)
  return steps, rows, data


def preprocess_config(data: schema.DataSettings, cfg: VLMConfig,
                      template: str) -> pipeline_lib.PreprocessConfig:
  return pipeline_lib.PreprocessConfig(
      template=template, max_length=data.max_length,
      num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id,
      image_size=cfg.vision.image_size, normalization=data.normalization,
      add_bos=data.add_bos,
      patches=images_lib.PatchConfig.of(cfg.vision) if cfg.vision.native else None)


# ------------------------------------------------------------ where stages start


def initial_params(exp: Experiment, mesh: jax.sharding.Mesh) -> Params:
  """Stage 1's start, on `mesh`: the pretrained parts named in `init` (read tensor by
  tensor onto their shardings) or the tower of `vision_pretrain`, a random init (under
  jit, on its shardings) for the rest."""
  from moe_vlm.convert import hf

  cfg, init = exp.dense_config, exp.settings.init
  if init.ckpt:  # a converted checkpoint holds the whole model
    return exp.init_checkpoint_params(mesh)
  if init.params:  # this experiment's dense model, trained elsewhere
    return exp.load_dense_params(init.params, mesh)
  codec = placement.abstract_codec(cfg)
  shardings = placement.shardings(cfg, mesh)
  params: Params = {}
  for part, path in (("llava", init.hf_llava), ("vision", init.hf_vision),
                     ("llm", init.hf_llm)):
    if path:
      params.update(hf.import_pretrained_params(path, cfg, part, codec.shapes, shardings))
  if exp.pretrains_vision:  # the tower of `vision_pretrain` (run before stage 1)
    from moe_vlm.train import pretrain_vision
    params.update(pretrain_vision.tower(exp, mesh))
  rest = [n for n in codec.names if n not in params]
  if rest:
    params.update(placement.init_params(cfg, mesh, exp.settings.seed, rest))
  return params


def add_new_params(params: Params, cfg: VLMConfig, mesh: jax.sharding.Mesh,
                   seed: int) -> Params:
  """`params` completed with freshly initialised ones (on their shardings) for what
  `cfg` adds, e.g. LoRA experts, whose zero B keeps the model's function unchanged."""
  names = placement.abstract_codec(cfg).names
  unknown = sorted(set(params) - set(names))
  if unknown:
    raise ValueError(f"parameters {unknown[:3]} do not exist in the new model config")
  shardings = placement.shardings(cfg, mesh)
  fresh = placement.init_params(cfg, mesh, seed, [n for n in names if n not in params])
  return {**fresh, **{k: jax.device_put(v, shardings[k]) for k, v in params.items()}}


def stage_start(exp: Experiment, k: int, params: Params, prev_cfg: VLMConfig,
                mesh: jax.sharding.Mesh) -> Params:
  """Stage k's starting parameters from `params`, those of a model of config `prev_cfg`
  (the previous stage's, or the dense start): MoE-LLaVA's upcycling into stage 3's MoE
  layers; for Awaker2.5-VL fresh LoRA on a model without (B at zero: same function),
  and at stage II its stage-I LoRA copied into every expert (`lora_upcycle_params`);
  otherwise the parameters as they are."""
  settings, cfg = exp.settings, exp.model_config(k)
  seed = settings.seed
  if cfg.text.moe is not None and prev_cfg.text.moe is None:
    return upcycle_params(params, prev_cfg, settings.moe, seed=seed, mesh=mesh)
  prev_lm, lm = prev_cfg.text.lora_moe, cfg.text.lora_moe
  if lm is not None and prev_lm is None:
    return add_new_params(params, cfg, mesh, seed)
  if lm is not None and prev_lm.single and not lm.single:
    return lora_upcycle_params(params, prev_cfg, cfg, seed=seed, mesh=mesh)
  return params


# ------------------------------------------------------------------------ one stage


MAX_NAMED_BAD = 100  # bad records named in bad_samples.json (the counts cover all)
LOGGED_BAD = 5  # ... and in the run log


@dataclasses.dataclass
class Counters:
  """A stage's sample counts over all processes, checkpointed with the state."""

  samples: int = 0
  bad: dict = dataclasses.field(default_factory=dict)
  truncated: int = 0
  tokens: int = 0
  # The first MAX_NAMED_BAD bad records: {"id", "image", "reason", "detail"}.
  bad_records: list = dataclasses.field(default_factory=list)

  def add_batch(self, batch: dict, sigterm: bool = False) -> bool:
    """Adds this process's rows of a global batch, summed with every other process's
    (one small all-gather), and names new bad records. Returns whether any process has
    seen SIGTERM (all must stop at the same step: checkpoints are collective)."""
    from moe_vlm.distributed import gather_json, sum_over_processes
    reasons = pipeline_lib.BAD_REASONS
    by_reason = pipeline_lib.summarize_bad(batch)
    local = [int(sigterm), pipeline_lib.num_samples(batch), int(np.sum(batch["truncated"])),
             int(np.sum(batch["attention_mask"]))] + [by_reason[r] for r in reasons]
    total = sum_over_processes(np.asarray(local, np.int64))
    self.samples += int(total[1])
    self.truncated += int(total[2])
    self.tokens += int(total[3])
    new_bad = 0
    for reason, n in zip(reasons, total[4:]):
      if reason != "ok" and n:
        self.bad[reason] = self.bad.get(reason, 0) + int(n)
        new_bad += int(n)
    if new_bad and len(self.bad_records) < MAX_NAMED_BAD:
      mine = [{**r, "reason": reasons[r["reason"]]} for r in pipeline_lib.bad_samples(batch)]
      for records in gather_json(mine):
        self.bad_records.extend(records[:MAX_NAMED_BAD - len(self.bad_records)])
    return bool(total[0])

  def summary(self, source: "Source") -> dict:
    """bad_samples.json: totals by reason, the named bad records, and the records the
    data files held that could not be read at all (malformed at load)."""
    return {"samples": self.samples, "bad": self.bad, "truncated": self.truncated,
            "bad_records": self.bad_records,
            "bad_records_named": f"first {len(self.bad_records)} of {sum(self.bad.values())}",
            "malformed_at_load": dict(getattr(source, "skipped", {})),
            "malformed_records": [{"index": i, "detail": m}
                                  for i, m in getattr(source, "errors", [])]}


Source = object  # a random-access data source (LlavaJsonSource, ConcatSource, TFDS)


def bad_sample_limit(seen: int, fraction: float) -> float:
  """How many bad samples out of `seen` still fit `data.max_bad_fraction`: the expected
  count plus four binomial standard deviations, so the check can apply from the first
  batch (8 samples of a data set at the limit rarely hold more than 2 bad ones) and
  tightens to the plain fraction as samples accumulate (a short run with 31% bad
  samples still stops)."""
  return fraction * seen + 4.0 * math.sqrt(fraction * (1.0 - fraction) * seen)


def _check_bad(counters: Counters, limit: float, where: str, log_path: str) -> None:
  bad = sum(counters.bad.values())
  if bad and bad > bad_sample_limit(counters.samples, limit):
    named = "; ".join(f"{r['id']} ({r['reason']}: {r['detail']})"
                      for r in counters.bad_records[:LOGGED_BAD])
    raise DataQualityError(
        f"{where}: {bad} of {counters.samples} samples were bad ({dict(counters.bad)}), "
        f"more than data.max_bad_fraction={limit} allows. First: {named}. All named in "
        f"{log_path}. Check the JSON and the image folder.")


def check_source(source: Source, limit: float, where: str) -> None:
  """The records a data file held that could not be used at all, against the limit."""
  skipped = sum(getattr(source, "skipped", {}).values())
  if skipped:
    total = len(source) + skipped
    first = "; ".join(m for _, m in getattr(source, "errors", [])[:LOGGED_BAD])
    log.warning("%s: %d of %d records are malformed and skipped, e.g. %s", where, skipped,
                total, first)
    if skipped > bad_sample_limit(total, limit):
      raise DataQualityError(f"{where}: {skipped} of {total} records are malformed, more "
                             f"than data.max_bad_fraction={limit} allows. First: {first}")


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

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricsWriter:
  """TensorBoard events + a JSONL mirror, written by process 0 only. A resumed run
  continues metrics.jsonl from the restored step: lines of the steps it redoes go.

  Object stores (gs://) cannot append, so the JSONL is rewritten whole there.
  """

  def __init__(self, directory: str, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter
      path = ckpt_lib.as_path(directory)
      path.mkdir(parents=True, exist_ok=True)
      self.tb = SummaryWriter(str(path / "tb"))
      self.jsonl = path / "metrics.jsonl"
      lines = self.jsonl.read_text().splitlines() if self.jsonl.exists() else []
      self.lines = [l for l in lines if l.strip() and json.loads(l)["step"] <= start_step]

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


def step_config(moe: MoEConfig, s: schema.StageSettings,
                total_steps: int) -> step_lib.StepConfig:
  """The train step's settings for a stage (`s`) of an experiment whose MoE is `moe`."""
  return step_lib.StepConfig(
      optim=OptimConfig(learning_rate=s.learning_rate, warmup_ratio=s.warmup_ratio,
                        total_steps=total_steps, weight_decay=s.weight_decay,
                        clip_norm=s.clip_norm),
      grad_accum=s.grad_accum, aux_loss_coef=moe.aux_loss_coef,
      z_loss_coef=moe.z_loss_coef, head_fraction=s.head_fraction or None)


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


def run_stage(k: int, exp: Experiment, mesh: jax.sharding.Mesh, init: Callable[[], Params],
              *, stop_after: Optional[int] = None) -> Optional[Params]:
  """Trains stage k and returns its final params (global arrays on `mesh`). `stop_after`
  ends the run after that many steps without finishing the stage (tests use it to
  simulate a kill); it then returns None."""
  s, settings = exp.stage(k), exp.settings
  stage_dir = exp.stage_dir(k)
  cfg = exp.model_config(k)
  codec = placement.abstract_codec(cfg)
  ckpts = ckpt_lib.StageCheckpoints(exp.checkpoint_dir(k), keep=settings.checkpoint.keep,
                                    async_save=settings.checkpoint.async_save)
  if exp.has_final(k):
    finished_at = ckpts.latest_step()
    ckpts.close()
    if s.steps and finished_at not in (None, s.steps):
      raise StageSettingsError(
          f"stage {k} finished at step {finished_at} ({exp.final_dir(k)}) but "
          f"stages.stage{k}.steps={s.steps} now: move {exp.stage_dir(k)} away to train it "
          "again, or set the steps it ran")
    log.info("stage %d already finished (%s); skipping", k, exp.final_dir(k))
    return exp.load_params(k, mesh)

  source = (synthetic_source(settings, s, k) if settings.data.kind == "synthetic" else
            stage_source(settings, s.data, exp.data_dir, exp.image_root))
  check_source(source, settings.data.max_bad_fraction, f"stage {k} data ({s.data})")
  steps, rows, data = stage_data(source, exp, cfg, s, k, mesh)
  if (ckpts.latest_step() or 0) > steps:
    raise StageSettingsError(
        f"stage {k}: {exp.checkpoint_dir(k)} holds step {ckpts.latest_step()} but the stage "
        f"now has {steps} steps (stages.stage{k}.steps / epochs); a resume would label the "
        "later state with an earlier step. Restore the setting, or move the directory away")
  trainable = stages_lib.stage_trainable(s)
  step_cfg = step_config(settings.moe, s, steps)
  tx = step_lib.make_optimizer(step_cfg.optim)
  shardings = step_lib.state_shardings(codec, trainable, mesh, tx)
  it = iter(data)
  counters = Counters()
  if ckpts.latest_step() is not None:
    like = jax.eval_shape(lambda: step_lib.init_state(
        {n: jnp.zeros(v.shape, v.dtype) for n, v in codec.shapes.items()}, trainable, tx))
    state, extras = ckpts.restore_newest(like, shardings)
    it.set_state(extras["data_iter"])
    counters = Counters(**extras["counters"])
    log.info("stage %d: resumed from step %d", k, int(state.step))
  else:
    state = step_lib.init_state(init(), trainable, tx, shardings, seed=settings.seed + k)
  log.info("stage %d: %s, %d steps, batch %d, %s", k, s.train, steps, s.batch_size,
           stages_lib.describe(codec.names, trainable))

  start = int(state.step)
  writer = MetricsWriter(stage_dir, start)
  first = next(it)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(codec, step_cfg, tx), mesh,
                                       shardings, first)
  progress = _progress(steps, start, k)
  t0, tokens0, batch = time.perf_counter(), counters.tokens, first
  in_flight = None  # the previous step's loss: block on it so the host stays one step ahead
  bad_log = os.path.join(stage_dir, "bad_samples.json")
  logged_bad = len(counters.bad_records)

  def extras() -> dict:
    return {"data_iter": it.get_state(), "counters": dataclasses.asdict(counters)}

  try:
    with _SigtermFlag() as sigterm:
      for step in range(start, steps):
        if step > start:
          batch = next(it)
        stop = counters.add_batch(batch, sigterm.raised)
        for r in counters.bad_records[logged_bad:LOGGED_BAD]:
          log.warning("stage %d: skipping bad sample %s (image %s): %s: %s", k, r["id"],
                      r["image"] or "-", r["reason"], r["detail"])
        logged_bad = len(counters.bad_records)
        _check_bad(counters, settings.data.max_bad_fraction, f"stage {k}", bad_log)
        device_batch = {key: mesh_lib.assemble_batch(batch[key], rows, s.batch_size, mesh)
                        for key in step_lib.model_inputs(batch)}
        state, metrics = train_step(state, device_batch)
        if in_flight is not None:
          in_flight.block_until_ready()  # progress and tokens/s then measure real work
        in_flight = metrics["loss"]
        done = step + 1
        if done % settings.log_every == 0 or done == steps:
          metrics = jax.device_get(metrics)  # replicated scalars (out_shardings P())
          rate = (counters.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
          scalars = _scalars(metrics, counters, rate)
          writer.write(done, scalars)
          progress.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{rate:.0f}")
          write_json(bad_log, counters.summary(source))
          t0, tokens0 = time.perf_counter(), counters.tokens
        progress.update(1)
        if done % settings.checkpoint.every_steps == 0 or stop:
          ckpts.save(done, state, extras(), force=stop)
        if stop:
          ckpts.wait()
          raise Preempted(f"stage {k}: SIGTERM at step {done}; checkpoint saved, rerun the "
                          "same command to resume")
        if stop_after is not None and done >= stop_after:
          ckpts.wait()
          return None
      if ckpts.latest_step() != steps:
        ckpts.save(steps, state, extras(), force=True)
  finally:
    progress.close()
    writer.close()
    ckpts.close()
  params = {**state.frozen, **state.params}
  ckpt_lib.save_params(exp.final_dir(k), params)  # every process writes its own shards
  return params


def _progress(total: int, initial: int, k: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=f"stage {k}", unit="step",
              disable=jax.process_index() != 0, dynamic_ncols=True)


# ------------------------------------------------------------------------ all stages


def check_stages(exp: Experiment, stages: Sequence[int], mesh: jax.sharding.Mesh) -> None:
  """Every requested stage, checked before the first one trains: its model config
  (e.g. `moe.top_k` against `moe.num_experts`), the mesh (experts, heads, every weight
  dimension, the batch), the trainable set, the data files and where it starts from.
  Raises StageSettingsError naming the stage and the field."""
  settings = exp.settings
  ways = mesh_lib.axis_size(mesh, mesh_lib.BATCH_AXES)
  for k in stages:
    s = exp.stage(k)
    try:
      if k not in schema.STAGES:
        raise ValueError(f"MoE-Tuning has stages {schema.STAGES}")
      if k == 1 and s.train in stages_lib.LORA_FORMS and not settings.init.pretrained_llm:
        raise ConfigError(f"stages.stage1.train={s.train!r} trains LoRA on a frozen base, "
                          "but no pretrained model is given: set init.hf_llava, init.hf_llm, "
                          "init.ckpt or init.params (e.g. another run's "
                          "<workdir>/stage2/final)")
      cfg = exp.model_config(k)
      if k == 3 and settings.stage3_kind == "moe" and exp.dense_config.text.moe is None:
        upcycle_check(exp.dense_config, settings.moe)
      mesh_lib.check_model_fits_mesh(cfg, mesh, s.batch_size)
      micro = s.batch_size // s.grad_accum
      if micro % ways:
        raise mesh_lib.MeshError(
            f"stages.stage{k}: a micro-batch of batch_size / grad_accum = {micro} rows is "
            f"not divisible by data x fsdp x expert = {ways}")
      if s.batch_size % jax.process_count():
        raise mesh_lib.MeshError(f"stages.stage{k}.batch_size={s.batch_size} is not "
                                 f"divisible by the {jax.process_count()} processes")
      codec = placement.abstract_codec(cfg)
      placement.shardings(cfg, mesh)  # every weight dimension divides its mesh axes
      if s.train not in stages_lib.PRESETS:
        raise stages_lib.StageConfigError(
            f"stages.stage{k}.train={s.train!r}: expected one of {stages_lib.PRESETS}")
      step_lib.split_params(codec.shapes, stages_lib.stage_trainable(s))
      step_config(settings.moe, s, 1).head_capacity(settings.data.max_length)
      if settings.data.kind == "synthetic":
        from moe_vlm.data import synthetic
        if s.data not in synthetic.MIXES:
          raise ValueError(f"stages.stage{k}.data={s.data!r}: with data.kind='synthetic' "
                           f"a stage's data is one of the mixes {synthetic.MIXES}")
      elif settings.data.kind != "tfds":
        missing = [p for p in stage_files(s.data, exp.data_dir) if not os.path.exists(p)]
        if missing:
          raise FileNotFoundError(f"stages.stage{k}.data: {missing} not found "
                                  f"(data.dir={exp.data_dir})")
      if (k > 1 and k - 1 not in stages and not exp.has_final(k - 1)
          and not settings.init.ckpt and not settings.init.params):
        raise FileNotFoundError(f"stage {k} starts from stage {k - 1}'s parameters, but "
                                f"{exp.final_dir(k - 1)} does not exist: run stage {k - 1} "
                                "first")
    except (ConfigError, ValueError, FileNotFoundError) as e:
      raise StageSettingsError(f"stage {k}: {e}") from e


def train(c: ml_collections.ConfigDict, workdir: str, stages: Sequence[int] = (1, 2, 3),
          *, stop_after: Optional[int] = None) -> Experiment:
  """Runs the requested stages in order; each starts from the previous stage's final.
  Every stage is checked first, so a bad setting of stage 3 stops the run before stage
  1 trains. Returns the experiment (its `load_params(k)` reads a stage's result)."""
  exp = Experiment(c, workdir)
  ckpt_lib.as_path(workdir).mkdir(parents=True, exist_ok=True)
  exp.write_config()
  exp.prepare_data()
  mesh = exp.mesh()
  log.info("process %d of %d; mesh %s", jax.process_index(), jax.process_count(),
           mesh_lib.describe(mesh))
  check_stages(exp, stages, mesh)
  settings = exp.settings
  latest: dict[int, Params] = {}  # the last finished stage's params, for the next one
  if 1 in stages and exp.pretrains_vision and not exp.has_final(1):
    from moe_vlm.train import pretrain_vision  # the tower stage 1 starts from
    pretrain_vision.check(exp, mesh)
    if not pretrain_vision.run(exp, mesh, stop_after=stop_after):
      return exp  # stop_after

  def previous(k: int) -> tuple[Params, VLMConfig]:
    """What stage k starts from, and the config of its model."""
    if k - 1 in latest:
      return latest.pop(k - 1), exp.model_config(k - 1)  # handed over (and donated)
    if k == 1 or (not exp.has_final(k - 1) and (settings.init.ckpt or settings.init.params)):
      return initial_params(exp, mesh), exp.dense_config  # e.g. fine-tuning a checkpoint
    return exp.load_params(k - 1, mesh), exp.model_config(k - 1)

  for k in stages:
    init = lambda: stage_start(exp, k, *previous(k), mesh)
    params = run_stage(k, exp, mesh, init, stop_after=stop_after)
    if params is None:  # stop_after
      break
    latest = {k: params}
  return exp
