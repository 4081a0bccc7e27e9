"""Hours and on-demand cost of each MoE-Tuning stage per TPU topology (an estimate).

  python launch/estimate.py                          # every variant, stage and preset
  python launch/estimate.py --variants phi2 --mfu 0.4 --price v5e=1.0

For each MoE-LLaVA variant of configs/moe_llava.py and each stage, with the paper's
recipe (one epoch over the stage's data, global batch 256 / 128 / 128, sequences padded
to data.max_length = 2048 tokens as our pipeline does, one image each):

  steps          = samples // batch
  FLOPs per step = model FLOPs of the stage's train step (`stage_step_flops`)
  hours          = steps x FLOPs per step / (chips x peak bf16 FLOP/s x MFU) / 3600
  cost           = hours x chips x on-demand price per chip-hour

FLOPs, chip peaks and prices come from the package's cost model, `moe_vlm.cost`
(matmuls only; frozen weights get no weight gradient, and nothing below the lowest
trainable weight runs a backward). The MFU is an assumption, not a measurement:
nothing here has run on a TPU yet. Prices and peaks are the assumptions in
`moe_vlm.cost.CHIPS`; pass --price / --mfu to use yours.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

if __name__ == "__main__":  # `python launch/estimate.py` from anywhere: the repo on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import moe_llava, topologies  # noqa: E402
from moe_vlm import cost  # noqa: E402
from moe_vlm.models.config import MoEConfig, VLMConfig, from_dict  # noqa: E402

# Model-FLOPs utilisation assumed for our train step (bf16, full remat, capacity
# dispatch, XLA attention): recomputation and capacity padding execute ~1.3-1.5x the
# model FLOPs, so 35% MFU means the MXUs are busy about half of the time.
DEFAULT_MFU = 0.35
# Training samples per stage, as the paper lists the data (MoE-LLaVA Table 2 / docs/TRAIN.md):
# LLaVA-PT 558k (558,128 captions); Hybrid-FT 964k (MIMIC-IT 256k + LRV 331k + LVIS 220k
# + SViT 157k; the small NLP file the scripts add is not counted); LLaVA-mix-665k
# (665,298 conversations).
PAPER_SAMPLES = {1: 558_128, 2: 964_000, 3: 665_298}


def stage_model_config(variant: str, stage: int) -> VLMConfig:
  """Stage k's model of a configs/moe_llava.py variant: the checkpoints' dimensions
  (`moe_vlm.cost.real_config`) with the config file's dtypes and remat; stage 3
  upcycles with the file's MoE settings."""
  c = moe_llava.get_config(variant)
  moe = from_dict(MoEConfig, c.moe.to_dict(), "moe") if stage == 3 else None
  return cost.real_config(variant, moe, dtype=c.model.text.dtype, remat=c.model.text.remat)


def stage_step_flops(cfg: VLMConfig, train: str, batch: int, seq: int) -> float:
  """Model FLOPs of one train step of a stage that trains `train` (a stage preset), on
  TPU: `moe_vlm.cost.train_step_flops`, the LM head on every position."""
  return cost.train_step_flops(cfg, train, batch, seq, backend="tpu")["model"]


@dataclasses.dataclass(frozen=True)
class StageCost:
  variant: str
  stage: int
  steps: int
  batch: int
  flops_per_step: float
  topology: str
  chips: int
  hours: float
  cost: float

  @property
  def flops(self) -> float:
    return self.steps * self.flops_per_step


def stage_cost(flops_per_step: float, steps: int, topology: topologies.Topology,
               mfu: float, chips: Mapping[str, cost.Chip] = cost.CHIPS
               ) -> tuple[float, float]:
  """(hours, USD) of `steps` steps on a slice at the given MFU."""
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu={mfu}: expected a fraction in (0, 1]")
  chip = chips[topology.generation]
  hours = steps * flops_per_step / (topology.chips * chip.peak_flops * mfu) / 3600
  return hours, hours * topology.chips * chip.price_per_chip_hour


def estimate(variants: Sequence[str] = tuple(moe_llava.VARIANTS),
             topology_names: Sequence[str] = tuple(topologies.TOPOLOGIES),
             mfu: float = DEFAULT_MFU, chips: Mapping[str, cost.Chip] = cost.CHIPS,
             samples: Mapping[int, int] = PAPER_SAMPLES) -> list[StageCost]:
  rows = []
  for variant in variants:
    c = moe_llava.get_config(variant)
    for k in (1, 2, 3):
      s = c.stages[f"stage{k}"]
      steps = max(1, s.epochs * samples[k] // s.batch_size)
      fl = stage_step_flops(stage_model_config(variant, k), s.train, s.batch_size,
                            c.data.max_length)
      for name in topology_names:
        t = topologies.get(name)
        hours, usd = stage_cost(fl, steps, t, mfu, chips)
        rows.append(StageCost(variant, k, steps, s.batch_size, fl, t.name, t.chips, hours,
                              usd))
  return rows


def format_table(rows: Sequence[StageCost]) -> list[str]:
  """Per variant: one line per topology, hours and USD per stage and in total."""
  out = []
  for variant in dict.fromkeys(r.variant for r in rows):
    mine = [r for r in rows if r.variant == variant]
    first = {r.stage: r for r in mine}
    out.append("")
    out.append(f"{variant}: " + "; ".join(
        f"stage {k} {r.steps} steps x {r.batch} x {r.flops_per_step / 1e15:.1f} PFLOP = "
        f"{r.flops / 1e18:.1f} EFLOP" for k, r in sorted(first.items())))
    out.append("| topology | chips | stage 1 | stage 2 | stage 3 | all stages |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in dict.fromkeys(r.topology for r in mine):
      by_stage = {r.stage: r for r in mine if r.topology == name}
      cells = [f"{r.hours:.1f} h ${r.cost:,.0f}" for _, r in sorted(by_stage.items())]
      h = sum(r.hours for r in by_stage.values())
      usd = sum(r.cost for r in by_stage.values())
      out.append(f"| {name} | {by_stage[1].chips} | " + " | ".join(cells) +
                 f" | {h:.1f} h ${usd:,.0f} |")
  return out


def _prices(text: str) -> dict[str, float]:
  out = {}
  for item in text.split(","):
    gen, _, value = item.partition("=")
    if gen not in cost.CHIPS or not value:
      raise argparse.ArgumentTypeError(f"--price {item!r}: expected GEN=USD with GEN one "
                                       f"of {', '.join(cost.CHIPS)}")
    out[gen] = float(value)
  return out


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default=",".join(moe_llava.VARIANTS),
                 help="comma list of configs/moe_llava.py variants")
  p.add_argument("--topologies", default=",".join(topologies.TOPOLOGIES),
                 help="comma list of configs/topologies.py presets")
  p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                 help="assumed model-FLOPs utilisation (default %(default)s)")
  p.add_argument("--price", type=_prices, default={},
                 help="USD per chip-hour overrides, e.g. v5e=1.0,v5p=3.5")
  a = p.parse_args(argv)
  if not 0 < a.mfu <= 1:
    p.error(f"--mfu={a.mfu}: expected a fraction in (0, 1]")
  variants = [v for v in a.variants.split(",") if v]
  unknown = [v for v in variants if v not in moe_llava.VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {unknown}; expected some of {list(moe_llava.VARIANTS)}")
  try:
    names = [topologies.get(t).name for t in a.topologies.split(",") if t]
  except KeyError as e:
    p.error(str(e.args[0]))
  chips = {g: dataclasses.replace(c, price_per_chip_hour=a.price.get(g, c.price_per_chip_hour))
           for g, c in cost.CHIPS.items()}
  rows = estimate(variants, names, a.mfu, chips)
  out(f"# assumed: MFU {a.mfu:.0%} of peak bf16; " + "; ".join(
      f"{g} {c.peak_flops / 1e12:.0f} TFLOP/s ${c.price_per_chip_hour:.2f}/chip-hour"
      for g, c in chips.items()) + " (on-demand list prices, 2024)")
  out(f"# one epoch: stage 1 {PAPER_SAMPLES[1]:,}, stage 2 {PAPER_SAMPLES[2]:,}, stage 3 "
      f"{PAPER_SAMPLES[3]:,} samples; every sequence padded to 2048 tokens, one image")
  for line in format_table(rows):
    out(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
