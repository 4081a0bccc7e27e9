"""Pre-flight: compile a stage's train step on abstract inputs and check its memory.

Before a pod slice spends hours loading data and checkpoints, build the exact step the
loop would run (same model config, trainable set, optimizer, shardings, batch shapes,
gradient accumulation), `jax.jit(...).lower(...).compile()` it without allocating a
single parameter, and read XLA's per-device memory numbers. A step that does not fit
the HBM budget fails here, with the numbers and what to change:

  python -m moe_vlm.train.preflight --config configs/moe_llava.py:phi2 --stage all \
      --hbm_gib 16 --config.mesh.fsdp=16 --config.mesh.data=1 ...

`launch/train.sh --preflight` runs this on every worker of the slice first.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moe_vlm.models.config import VLMConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import stages as stages_lib
from moe_vlm.train import step as step_lib

log = logging.getLogger("moe_vlm")
GiB = 1024 ** 3


class HBMBudgetError(MemoryError):
  """The compiled train step needs more memory per device than the budget allows."""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """XLA's per-device numbers for one compiled step (bytes)."""
  arguments: int
  outputs: int
  aliased: int      # outputs that reuse donated argument buffers
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    """Live at the peak, as XLA's buffer assignment sees it: inputs, outputs that do not
    alias a donated input, temporaries and the program itself."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  def describe(self) -> str:
    g = format_bytes
    return (f"{g(self.total)} per device (arguments {g(self.arguments)}, outputs "
            f"{g(self.outputs)} of which {g(self.aliased)} reuse donated inputs, "
            f"temporaries {g(self.temporaries)}, code {g(self.code)})")


def format_bytes(n: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def abstract_batch(cfg: VLMConfig, batch_size: int, seq_len: int) -> dict[str, Any]:
  """ShapeDtypeStructs of the model inputs (the pipeline's batch contract; Qwen2-VL:
  the patch budget and each row's grid)."""
  s = cfg.vision.image_size
  ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids,
           "pixel_values": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32)}
  if cfg.vision.native:
    v = cfg.vision
    batch["pixel_values"] = jax.ShapeDtypeStruct((batch_size, v.max_patches, v.patch_dim),
                                                 jnp.float32)
    batch["image_grid_thw"] = jax.ShapeDtypeStruct((batch_size, 3), jnp.int32)
  return batch


def compile_train_step(cfg: VLMConfig, mesh: Mesh, *, batch_size: int, seq_len: int,
                       train: str = "projector_llm", extra_modules: Sequence[str] = (),
                       frozen_modules: Sequence[str] = (),
                       step_cfg: step_lib.StepConfig = step_lib.StepConfig(),
                       rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES):
  """The loop's jitted train step, lowered and compiled on abstract state and batch."""
  return lower_train_step(cfg, mesh, batch_size=batch_size, seq_len=seq_len, train=train,
                          extra_modules=extra_modules, frozen_modules=frozen_modules,
                          step_cfg=step_cfg, rules=rules).compile()


def lower_train_step(cfg: VLMConfig, mesh: Mesh, *, batch_size: int, seq_len: int,
                     train: str = "projector_llm", extra_modules: Sequence[str] = (),
                     frozen_modules: Sequence[str] = (),
                     step_cfg: step_lib.StepConfig = step_lib.StepConfig(),
                     rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES):
  """`compile_train_step` before `.compile()`: tracing is serial (the activation-sharding
  context is global), XLA compilation of several lowered steps may run in parallel."""
  mesh_lib.check_model_fits_mesh(cfg, mesh, batch_size)
  if batch_size % step_cfg.grad_accum:
    raise ValueError(f"batch {batch_size} is not divisible by grad_accum "
                     f"{step_cfg.grad_accum}")
  codec = ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  trainable = stages_lib.trainable_fn(train, tuple(extra_modules), tuple(frozen_modules))
  tx = step_lib.make_optimizer(step_cfg.optim)
  shardings = step_lib.state_shardings(codec, trainable, mesh, tx, rules)
  state = jax.eval_shape(lambda: step_lib.init_state(
      {n: jnp.zeros(v.shape, v.dtype) for n, v in codec.shapes.items()}, trainable, tx))
  batch = abstract_batch(cfg, batch_size, seq_len)
  fn = step_lib.jit_train_step(step_lib.make_train_step(codec, step_cfg, tx), mesh,
                               shardings, batch, rules)
  return fn.lower(state, batch)


def memory_report(compiled) -> MemoryReport:
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"{jax.default_backend()} reports no memory analysis for the step")
  return MemoryReport(arguments=stats.argument_size_in_bytes,
                      outputs=stats.output_size_in_bytes, aliased=stats.alias_size_in_bytes,
                      temporaries=stats.temp_size_in_bytes,
                      code=stats.generated_code_size_in_bytes)


def check_budget(report: MemoryReport, hbm_budget_bytes: Optional[float],
                 where: str = "train step") -> None:
  if hbm_budget_bytes is not None and report.total > hbm_budget_bytes:
    raise HBMBudgetError(
        f"{where} needs {report.describe()}, over the budget of "
        f"{format_bytes(hbm_budget_bytes)} per device. Shard more (mesh.fsdp / mesh.expert "
        "/ mesh.model), lower the per-device micro-batch (stages.stageK.grad_accum), use "
        "model.text.remat=full, or a larger slice.")


def preflight_step(cfg: VLMConfig, mesh: Mesh, *, batch_size: int, seq_len: int,
                   hbm_budget_bytes: Optional[float] = None, where: str = "train step",
                   print_fn=print, **kw) -> MemoryReport:
  """Compiles the step, prints its per-device memory, raises `HBMBudgetError` when it
  exceeds `hbm_budget_bytes` (None: report only)."""
  try:
    compiled = compile_train_step(cfg, mesh, batch_size=batch_size, seq_len=seq_len, **kw)
  except Exception as e:  # XLA:TPU refuses to compile a program that cannot fit in HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise HBMBudgetError(f"{where}: XLA cannot fit the step in device memory: "
                         f"{str(e).strip().splitlines()[0]}") from e
  report = memory_report(compiled)
  budget = "" if hbm_budget_bytes is None else f" (budget {format_bytes(hbm_budget_bytes)})"
  print_fn(f"{where}: {report.describe()}{budget}")
  check_budget(report, hbm_budget_bytes, where)
  return report


def preflight_config(c: ml_collections.ConfigDict, stages: Sequence[int] = (1, 2, 3), *,
                     hbm_budget_bytes: Optional[float] = None, workdir: Optional[str] = None,
                     mesh: Optional[Mesh] = None, print_fn=print) -> dict[int, MemoryReport]:
  """Every requested stage of an experiment config, as `loop.train` would build it.

  The tokenizer (vocabulary size, `<image>` id) comes from `data.tokenizer` / the LLM
  checkpoint; a synthetic config without one gets its data generated in `workdir`
  (a temporary directory when None)."""
  from moe_vlm.experiment import Experiment
  from moe_vlm.train import loop

  with tempfile.TemporaryDirectory() as tmp:
    exp = Experiment(c, workdir or tmp)
    exp.prepare_data()
    cfgs = {k: exp.model_config(k) for k in stages}
  mesh = mesh or exp.mesh()
  reports = {}
  for k in stages:
    s = exp.stage(k)
    step_cfg = loop.step_config(exp.settings.moe, s, max(1, s.steps))
    reports[k] = preflight_step(
        cfgs[k], mesh, batch_size=s.batch_size,
        seq_len=exp.settings.data.max_length, hbm_budget_bytes=hbm_budget_bytes,
        where=f"stage {k} ({s.train}, batch {s.batch_size}, grad_accum {s.grad_accum}, "
              f"mesh {dict(mesh.shape)})",
        print_fn=print_fn, train=s.train, extra_modules=tuple(s.extra_modules),
        frozen_modules=tuple(s.frozen_modules),
        step_cfg=step_cfg)
  return reports


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from moe_vlm.commands.common import start

  del argv
  f = flags.FLAGS
  if f.config is None:
    raise flags.UsageError("preflight needs --config")
  start()
  budget = f.hbm_gib * GiB if f.hbm_gib else None
  try:
    preflight_config(f.config, parse_stages(f.stage), hbm_budget_bytes=budget,
                     workdir=f.workdir,
                     print_fn=lambda s: print(f"[process {jax.process_index()}] {s}",
                                              flush=True))
  except HBMBudgetError as e:
    print(f"PREFLIGHT FAILED: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  print("preflight ok", flush=True)


def parse_stages(text: str) -> tuple[int, ...]:
  try:
    stages = (1, 2, 3) if text == "all" else tuple(int(s) for s in text.split(",") if s)
  except ValueError:
    stages = ()
  if not stages or any(s not in (1, 2, 3) for s in stages):
    raise ValueError(f"--stage={text!r}: expected 1, 2, 3, a comma list or 'all'")
  return stages


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                  lock_config=True)
  flags.DEFINE_string("stage", "all", "1, 2, 3, a comma list, or all")
  flags.DEFINE_float("hbm_gib", 0.0, "HBM budget per device in GiB (0: report only)")
  flags.DEFINE_string("workdir", None, "where a synthetic config's data goes (default: "
                      "a temporary directory)")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
