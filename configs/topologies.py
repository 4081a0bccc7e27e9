"""Mesh presets per Cloud TPU topology for the MoE-LLaVA configs (plain Python, no jax).

Each preset names the slice (chips, hosts, HBM per chip, the TPU VM runtime image) and
the `data x fsdp x model x expert` mesh that `configs/moe_llava.py` variants train on,
plus the micro-batch each chip should see. `launch/train.sh` turns a preset into
`--config.mesh.*` and `--config.stages.stageK.grad_accum` overrides:

  python3 configs/topologies.py flags v5litepod-16          # the overrides, one a line
  python3 configs/topologies.py memory v5e-16 --model phi2  # rough GiB per chip and stage
  python3 configs/topologies.py list

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
`estimate_memory` is a back-of-envelope formula; `moe_vlm.train.preflight` compiles the
real step and reads XLA's numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from typing import Optional, Sequence

GiB = 1024 ** 3
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
  hbm_gib: float         # HBM per chip
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
  def batch_ways(self) -> int:
    return self.mesh["data"] * self.mesh["fsdp"] * self.mesh["expert"]


def _t(name, accel, chips, hosts, hbm, physical, data, fsdp, model, expert, per_chip):
  return Topology(name, accel, chips, hosts, hbm, physical,
                  dict(data=data, fsdp=fsdp, model=model, expert=expert), per_chip)


TOPOLOGIES = {t.name: t for t in (
    #   name       accelerator      chips hosts HBM  grid     data fsdp model expert batch
    _t("v4-8", "v4-8", 4, 1, 32, "2x2x1", 1, 4, 1, 1, 4),
    _t("v4-32", "v4-32", 16, 4, 32, "2x2x4", 1, 4, 1, 4, 4),
    _t("v5e-16", "v5litepod-16", 16, 4, 16, "4x4", 1, 16, 1, 1, 2),
    _t("v5e-64", "v5litepod-64", 64, 16, 16, "8x8", 1, 16, 1, 4, 2),
    _t("v5e-256", "v5litepod-256", 256, 64, 16, "16x16", 1, 32, 2, 4, 1),
    _t("v5p-128", "v5p-128", 64, 16, 95, "4x4x4", 4, 4, 1, 4, 4),
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


@dataclasses.dataclass(frozen=True)
class ModelDims:
  """What the memory formula needs of a MoE-LLaVA variant (from the HF config.json)."""
  vocab: int
  hidden: int
  intermediate: int
  layers: int
  heads: int
  ffn_mats: int         # 3 gated (Llama, Qwen, StableLM), 2 plain (Phi)
  vision_hidden: int
  vision_intermediate: int
  vision_layers: int


_CLIP_L = dict(vision_hidden=1024, vision_intermediate=4096, vision_layers=24)
_SIGLIP = dict(vision_hidden=1152, vision_intermediate=4304, vision_layers=27)
MODELS = {
    "stablelm": ModelDims(100352, 2048, 5632, 24, 32, 3, **_CLIP_L),
    "qwen": ModelDims(151936, 2048, 5504, 24, 16, 3, **_CLIP_L),
    "phi2": ModelDims(51200, 2560, 10240, 32, 32, 2, **_CLIP_L),
    "phi2_siglip": ModelDims(51200, 2560, 10240, 32, 32, 2, **_SIGLIP),
}


def param_counts(m: ModelDims, num_experts: int = 4) -> dict[str, int]:
  """Parameter counts: dense LLM (stage 1-2), experts + routers (stage 3), the rest."""
  ffn = m.ffn_mats * m.hidden * m.intermediate
  attn = 4 * m.hidden * m.hidden
  moe_layers = math.ceil(m.layers / 2)  # MoE-LLaVA "sparse": every other layer
  v = m.vision_hidden
  return dict(
      llm=2 * m.vocab * m.hidden + m.layers * (attn + ffn),
      experts=moe_layers * (num_experts * ffn + m.hidden * num_experts),
      replaced_ffn=moe_layers * ffn,  # the dense FFNs that become experts in stage 3
      vision=m.vision_layers * (4 * v * v + 2 * v * m.vision_intermediate),
      projector=v * m.hidden + m.hidden * m.hidden)


def estimate_memory(model: str | ModelDims, topology: str | Topology, stage: int, *,
                    global_batch: Optional[int] = None, seq_len: int = 2048,
                    num_experts: int = 4, remat: str = "full", param_bytes: int = 4,
                    act_bytes: int = 2) -> dict[str, float]:
  """Rough GiB per chip: parameters, optimizer (grads + AdamW moments of the trainable
  part, all fp32), activations of one micro-batch. Non-expert weights are sharded over
  fsdp x model, experts also over expert; activations count the block inputs that full
  remat saves, one recomputed block, attention scores and fp32 logits (+ gradients)."""
  m = MODELS[model] if isinstance(model, str) else model
  t = get(topology) if isinstance(topology, str) else topology
  fsdp, tp, ep = t.mesh["fsdp"], t.mesh["model"], t.mesh["expert"]
  n = param_counts(m, num_experts)
  if stage == 3:
    dense = n["llm"] - n["replaced_ffn"] + n["vision"] + n["projector"]
    experts, trainable_dense, trainable_experts = n["experts"], 0, n["experts"]
  else:
    dense, experts = n["llm"] + n["vision"] + n["projector"], 0
    trainable_dense = n["projector"] + (n["llm"] if stage == 2 else 0)
    trainable_experts = 0
  per_chip = lambda dense_n, expert_n: dense_n / (fsdp * tp) + expert_n / (fsdp * tp * ep)
  params = per_chip(dense, experts) * param_bytes
  optimizer = per_chip(trainable_dense, trainable_experts) * 3 * param_bytes
  b = per_chip_batch(t, global_batch or MOE_LLAVA_BATCH[stage])
  tokens = b * seq_len
  block = tokens * (4 * m.hidden + m.ffn_mats * m.intermediate / tp) * act_bytes
  scores = b * (m.heads / tp) * seq_len ** 2 * 4
  saved = (m.layers * tokens * m.hidden * act_bytes if remat == "full"
           else m.layers * (3 * block + scores))
  logits = tokens * m.vocab / tp * 4
  activations = saved + 2 * (block + scores + logits)
  total = params + optimizer + activations
  return {k: v / GiB for k, v in dict(params=params, optimizer=optimizer,
                                      activations=activations, total=total,
                                      hbm=t.hbm_gib * GiB).items()}


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
  mem.add_argument("--model", default="phi2", choices=sorted(MODELS))
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
                    HOSTS=t.hosts, HBM_GIB=t.hbm_gib, RUNTIME=t.runtime_version)
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
