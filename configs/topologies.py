"""Mesh presets per Cloud TPU topology for the MoE-LLaVA configs (plain Python, no jax).

Each preset names the slice (chips, hosts, HBM per chip, the TPU VM runtime image) and
the `data x fsdp x model x expert` mesh that `configs/moe_llava.py` variants train on,
plus the micro-batch each chip should see. `launch/train.sh` turns a preset into
`--config.mesh.*` and `--config.stages.stageK.grad_accum` overrides:

  python3 configs/topologies.py flags v5litepod-16          # the overrides, one a line
  python3 configs/topologies.py memory v5e-16 --model phi2  # rough GiB per chip and stage
  python3 configs/topologies.py list

`list`, `flags` and `shell` need plain Python only; `memory` builds the model's abstract
parameter tree, so it needs the package's environment (jax, flax).

How the meshes were chosen (MoE-LLaVA: 4 experts, batch 256 / 128 / 128, length 2048):
* the batch is split over data x fsdp x expert (`moe_vlm/parallel/mesh.py`), so those
  ways must divide 128: on 256 chips the model axis takes the remaining factor 2;
* stage 2 trains the whole LLM with AdamW (16 bytes per parameter with fp32 params),
  so non-expert weights need fsdp sharding before they fit 16 GiB (v5e) chips;
* `expert` (<= 4, it must divide the expert count) adds expert parallelism in stage 3
  and is a batch axis for the dense layers and stages;
* `per_chip_batch` bounds activations; larger stage batches use gradient accumulation.
Names follow the accelerator types: v5e-N is `v5litepod-N`; v4-N and v5p-N count
TensorCores (2 per chip), so v4-32 has 16 chips and v5p-128 has 64.
`estimate_memory` is the back-of-envelope formula of the package's cost model
(`moe_vlm.cost.memory_per_device`, which also holds the chips' HBM);
`moe_vlm.train.preflight` compiles the real step and reads XLA's numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import Optional, Sequence

if not __package__:  # run as a script, or imported as `topologies` from configs/
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_vlm import cost  # noqa: E402  (no jax: only `memory` needs it)

GiB = cost.GiB
MESH_AXES = ("data", "fsdp", "model", "expert")
# The MoE-LLaVA paper's global batch per stage (configs/moe_llava.py).
MOE_LLAVA_BATCH = {1: 256, 2: 128, 3: 128}
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str              # v4-8, v5e-16, ...
  accelerator_type: str  # what gcloud's --accelerator-type takes
  chips: int             # JAX devices (one per chip; v4/v5p megacore)
  hosts: int             # TPU VM workers = JAX processes
  physical: str          # the slice's chip grid
  mesh: dict             # data / fsdp / model / expert
  per_chip_batch: int    # sequences of 2048 tokens per chip per micro-batch

  @property
  def generation(self) -> str:
    return self.name.split("-")[0]

  @property
  def runtime_version(self) -> str:
    return RUNTIME_VERSIONS[self.generation]

  @property
  def hbm_gib(self) -> float:
    """HBM per chip (`moe_vlm.cost.CHIPS`)."""
    return cost.CHIPS[self.generation].hbm_gib

  @property
  def batch_ways(self) -> int:
    return self.mesh["data"] * self.mesh["fsdp"] * self.mesh["expert"]


def _t(name, accel, chips, hosts, physical, data, fsdp, model, expert, per_chip):
  return Topology(name, accel, chips, hosts, physical,
                  dict(data=data, fsdp=fsdp, model=model, expert=expert), per_chip)


TOPOLOGIES = {t.name: t for t in (
    #   name       accelerator      chips hosts grid     data fsdp model expert batch
    _t("v4-8", "v4-8", 4, 1, "2x2x1", 1, 4, 1, 1, 4),
    _t("v4-32", "v4-32", 16, 4, "2x2x4", 1, 4, 1, 4, 4),
    _t("v5e-16", "v5litepod-16", 16, 4, "4x4", 1, 16, 1, 1, 2),
    _t("v5e-64", "v5litepod-64", 64, 16, "8x8", 1, 16, 1, 4, 2),
    _t("v5e-256", "v5litepod-256", 256, 64, "16x16", 1, 32, 2, 4, 1),
    _t("v5p-128", "v5p-128", 64, 16, "4x4x4", 4, 4, 1, 4, 4),
)}


def get(name_or_accelerator: str) -> Topology:
  """A preset by name (`v5e-16`) or accelerator type (`v5litepod-16`)."""
  key = name_or_accelerator.strip()
  key = "v5e-" + key[len("v5litepod-"):] if key.startswith("v5litepod-") else key
  if key not in TOPOLOGIES:
    raise KeyError(f"no mesh preset for {name_or_accelerator!r}; presets: "
                   f"{', '.join(TOPOLOGIES)} (or pass --config.mesh.* yourself)")
  return TOPOLOGIES[key]


def generation_of(accelerator_type: str) -> str:
  """v4 / v5e / v5p / v6e from an accelerator type, for the default runtime image."""
  prefix = accelerator_type.split("-")[0]
  prefix = {"v5litepod": "v5e", "v6e": "v6e"}.get(prefix, prefix)
  if prefix not in RUNTIME_VERSIONS:
    raise KeyError(f"unknown TPU generation in {accelerator_type!r}; pass --runtime-version")
  return prefix


def grad_accum(topology: Topology, global_batch: int) -> int:
  """Smallest accumulation count that brings each chip's micro-batch to at most
  `per_chip_batch` (and divides the per-chip share)."""
  ways = topology.batch_ways
  if global_batch % ways:
    raise ValueError(f"{topology.name}: global batch {global_batch} is not divisible by "
                     f"data x fsdp x expert = {ways}")
  share = global_batch // ways
  for a in range(1, share + 1):
    if share % a == 0 and share // a <= topology.per_chip_batch:
      return a
  return share


def per_chip_batch(topology: Topology, global_batch: int) -> int:
  """Sequences each chip holds in one micro-batch."""
  return global_batch // topology.batch_ways // grad_accum(topology, global_batch)


def config_overrides(topology: Topology,
                     batch_sizes: Optional[dict] = None) -> list[str]:
  """`--config.*` flags for `moe-vlm train`: the mesh and each stage's accumulation."""
  flags = [f"--config.mesh.{a}={topology.mesh[a]}" for a in MESH_AXES]
  for k, b in sorted((batch_sizes or MOE_LLAVA_BATCH).items()):
    flags.append(f"--config.stages.stage{k}.grad_accum={grad_accum(topology, b)}")
  return flags


# ----------------------------------------------------------------- memory estimate


def estimate_memory(variant: str, topology: str | Topology, stage: int, *,
                    global_batch: Optional[int] = None, seq_len: int = 2048,
                    num_experts: int = 4, remat: str = "full", param_bytes: int = 4,
                    act_bytes: int = 2) -> dict[str, float]:
  """Rough GiB per chip of a MoE-LLaVA variant's stage on a preset, and the chip's HBM:
  `moe_vlm.cost.memory_per_device` for the stage's model and trainable set, this
  preset's mesh and the micro-batch each chip holds."""
  t = get(topology) if isinstance(topology, str) else topology
  moe = cost.moe_llava_moe(num_experts) if stage == 3 else None
  cfg = cost.real_config(variant, moe, remat=remat)
  b = per_chip_batch(t, global_batch or MOE_LLAVA_BATCH[stage])
  out = cost.memory_per_device(cfg, cost.STAGE_TRAIN[stage], t.mesh, b, seq_len,
                               bytes_per_param=param_bytes, act_bytes=act_bytes)
  return {**{k: v / GiB for k, v in out.items()}, "hbm": t.hbm_gib}


# ---------------------------------------------------------------------------- CLI


def _batch_sizes(text: str) -> dict[int, int]:
  sizes = [int(x) for x in text.split(",")]
  if len(sizes) != 3:
    raise argparse.ArgumentTypeError("--batch-sizes takes three numbers: stage 1,2,3")
  return {k + 1: b for k, b in enumerate(sizes)}


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  sub.add_parser("list")
  f = sub.add_parser("flags", help="--config overrides for moe-vlm train")
  s = sub.add_parser("shell", help="shell assignments for the launch scripts")
  mem = sub.add_parser("memory", help="rough GiB per chip per stage")
  for q in (f, s, mem):
    q.add_argument("topology", help="preset name or accelerator type")
  for q in (f, mem):
    q.add_argument("--batch-sizes", type=_batch_sizes, default=dict(MOE_LLAVA_BATCH),
                   help="global batch of stages 1,2,3 (default 256,128,128)")
  mem.add_argument("--model", default="phi2", choices=sorted(cost.VARIANTS))
  a = p.parse_args(argv)
  try:
    if a.cmd == "list":
      for t in TOPOLOGIES.values():
        print(f"{t.name:8s} {t.accelerator_type:14s} chips={t.chips:<4d} hosts={t.hosts:<3d} "
              f"hbm={t.hbm_gib:g}GiB mesh={t.mesh} per_chip_batch={t.per_chip_batch}")
      return 0
    t = get(a.topology)
    if a.cmd == "flags":
      print("\n".join(config_overrides(t, a.batch_sizes)))
    elif a.cmd == "shell":
      values = dict(TOPOLOGY=t.name, ACCELERATOR=t.accelerator_type, CHIPS=t.chips,
                    HOSTS=t.hosts, HBM_GIB=f"{t.hbm_gib:g}", RUNTIME=t.runtime_version)
      print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in values.items()))
    else:
      for k, b in sorted(a.batch_sizes.items()):
        e = estimate_memory(a.model, t, k, global_batch=b)
        print(f"stage {k}: batch {b} = {t.batch_ways} ways x {per_chip_batch(t, b)} per chip "
              f"x {grad_accum(t, b)} accumulation; params {e['params']:.1f} + optimizer "
              f"{e['optimizer']:.1f} + activations {e['activations']:.1f} = "
              f"{e['total']:.1f} GiB of {e['hbm']:g}")
  except (KeyError, ValueError) as e:
    print(f"topologies.py: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
