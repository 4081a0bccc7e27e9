"""Hours and on-demand cost of each MoE-Tuning stage per TPU topology (an estimate).

  python launch/estimate.py                          # every variant, stage and preset
  python launch/estimate.py --variants phi2 --mfu 0.4 --price v5e=1.0

For each MoE-LLaVA variant of configs/moe_llava.py and each stage, with the paper's
recipe (one epoch over the stage's data, global batch 256 / 128 / 128, sequences padded
to data.max_length = 2048 tokens as our pipeline does, one image each):

  steps          = samples // batch
  FLOPs per step = model FLOPs of the train step (see `stage_step_flops`)
  hours          = steps x FLOPs per step / (chips x peak bf16 FLOP/s x MFU) / 3600
  cost           = hours x chips x on-demand price per chip-hour

FLOPs come from bench.config.train_step_flops (the benchmarks' formula: matmuls only,
everything past the frozen vision tower trained, 6 x weights x tokens) minus the weight
gradients a stage does not compute for its frozen weights (`stage_step_flops`). The MFU
is an assumption, not a measurement: nothing here has run on a TPU yet. Prices and
peaks are the assumptions in `CHIPS`; pass --price / --mfu to use yours.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

if __name__ == "__main__":  # `python launch/estimate.py` from anywhere: the repo on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.config import train_step_flops  # noqa: E402
from configs import moe_llava, topologies  # noqa: E402
from moe_vlm.models.config import TextConfig, VisionConfig, VLMConfig  # noqa: E402
from moe_vlm.train import stages as stages_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float          # dense bf16 FLOP/s per chip (Google's published figure)
  price_per_chip_hour: float  # USD, on-demand


# Assumptions: peaks from the Cloud TPU system architecture pages; prices are Google Cloud's
# on-demand list prices per chip-hour in US regions as published in 2024 (v4 us-central2,
# v5e us-west4 / us-east1, v5p us-east5). Not re-checked when this was written (no web
# access here, 2026-11-23): check cloud.google.com/tpu/pricing and pass --price.
CHIPS = {
    "v4": Chip(peak_flops=275e12, price_per_chip_hour=3.22),
    "v5e": Chip(peak_flops=197e12, price_per_chip_hour=1.20),
    "v5p": Chip(peak_flops=459e12, price_per_chip_hour=4.20),
}
# Model-FLOPs utilisation assumed for our train step (bf16, full remat, capacity
# dispatch, XLA attention): recomputation and capacity padding execute ~1.3-1.5x the
# model FLOPs, so 35% MFU means the MXUs are busy about half of the time.
DEFAULT_MFU = 0.35
# Training samples per stage, as the paper lists the data (MoE-LLaVA Table 2 / docs/TRAIN.md):
# LLaVA-PT 558k (558,128 captions); Hybrid-FT 964k (MIMIC-IT 256k + LRV 331k + LVIS 220k
# + SViT 157k; the small NLP file the scripts add is not counted); LLaVA-mix-665k
# (665,298 conversations).
PAPER_SAMPLES = {1: 558_128, 2: 964_000, 3: 665_298}
# Vision towers of the variants: CLIP ViT-L/14-336 and SigLIP-so400m-patch14-384.
IMAGE_SIZE = {"clip": 336, "siglip": 384}


def paper_model_config(variant: str) -> VLMConfig:
  """The dense (stage 1-2) model of a configs/moe_llava.py variant. Its dimensions come
  from configs/topologies.MODELS (the HF checkpoints' config.json, which the real run
  reads from disk); only what sets the FLOPs is filled in (head_dim = hidden / heads, no
  GQA in these models)."""
  c = moe_llava.get_config(variant)
  m = topologies.MODELS[variant]
  norm = c.data.normalization
  vision = VisionConfig(variant=norm, image_size=IMAGE_SIZE[norm], patch_size=14,
                        hidden_size=m.vision_hidden, intermediate_size=m.vision_intermediate,
                        num_layers=m.vision_layers, num_heads=16, dtype=c.model.vision.dtype)
  text = TextConfig(family=variant, vocab_size=m.vocab, hidden_size=m.hidden,
                    intermediate_size=m.intermediate, num_layers=m.layers, num_heads=m.heads,
                    num_kv_heads=m.heads, mlp="gated" if m.ffn_mats == 3 else "plain",
                    dtype=c.model.text.dtype, remat=c.model.text.remat)
  return VLMConfig(vision=vision, text=text, projector=c.model.projector,
                   vision_feature_layer=c.model.vision_feature_layer,
                   vision_feature_select_strategy=c.model.vision_feature_select_strategy,
                   image_token_id=m.vocab - 1)


def stage_model_config(variant: str, stage: int) -> VLMConfig:
  """Stage 3 upcycles: the variant's MoE settings on the dense model (as loop.py does)."""
  from moe_vlm.train import loop
  return loop.stage_model_config(moe_llava.get_config(variant), paper_model_config(variant),
                                 stage)


@functools.lru_cache(maxsize=16)
def _matmul_weights_per_token(cfg: VLMConfig) -> tuple[tuple[str, float], ...]:
  """(name, weights a token meets) of every decoder, lm_head and projector matmul kernel
  of the model's real parameter tree (a routed token meets top_k of the E experts)."""
  from flax import nnx
  from moe_vlm.models.params import ParamCodec
  from moe_vlm.models.vlm import VLM
  # The vision tower is frozen and runs forward only in every stage (train_step_flops
  # counts it): build one layer of it, at a size its patches tile, to save time.
  v = cfg.vision
  shape_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(
      v, num_layers=1, image_size=v.image_size // v.patch_size * v.patch_size))
  shapes = ParamCodec.abstract(lambda: VLM(shape_cfg, rngs=nnx.Rngs(0))).shapes
  moe, out = cfg.text.moe, []
  for name, s in shapes.items():
    if len(s.shape) < 2 or name.startswith("vision."):
      continue  # biases and norm scales; the vision tower
    if name == "llm.embed" and not cfg.text.tie_embeddings:
      continue  # a gather, no matmul
    size = float(math.prod(s.shape))
    out.append((name, size * moe.top_k / moe.num_experts if ".mlp.experts." in name else size))
  return tuple(out)


def frozen_matmul_weights(cfg: VLMConfig, trainable: Callable[[str], bool]) -> dict[str, float]:
  """Matmul weights per token that a stage leaves frozen, in the LLM (decoder + lm_head)
  and in the projector (image tokens only), from the stage's trainable predicate; and
  "llm_all", every LLM matmul weight a token meets."""
  out = {"llm": 0.0, "projector": 0.0, "llm_all": 0.0}
  for name, size in _matmul_weights_per_token(cfg):
    part = "projector" if name.startswith("projector.") else "llm"
    if part == "llm":
      out["llm_all"] += size
    if not trainable(name):
      out[part] += size
  return out


def stage_step_flops(cfg: VLMConfig, train: str, batch: int, seq: int) -> dict[str, float]:
  """Model FLOPs of one train step of a stage.

  `bench.config.train_step_flops` counts 6 x W x T for every decoder, lm_head and
  projector weight (forward, input gradient, weight gradient). A frozen weight needs no
  weight gradient (2 x W x T less); the input gradient still flows through the frozen
  decoder whenever something below it trains. A frozen projector has nothing trainable
  below it (the vision tower is frozen), so it runs forward only (4 x W x T_img less).
  Slight overcount in stage 3 ("moe_layers"): the backward of layer 0's attention, which
  nothing trainable lies below, is kept (< 1% of the step).
  """
  full = train_step_flops(cfg, batch, seq)
  frozen = frozen_matmul_weights(cfg, stages_lib.trainable_fn(train))
  tokens, image_tokens = batch * seq, batch * cfg.num_image_tokens
  skipped = 2.0 * frozen["llm"] * tokens + 4.0 * frozen["projector"] * image_tokens
  return {"all_trained": full["total"], "skipped_for_frozen": skipped,
          "model": full["total"] - skipped}


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
               mfu: float, chips: Mapping[str, Chip] = CHIPS) -> tuple[float, float]:
  """(hours, USD) of `steps` steps on a slice at the given MFU."""
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu={mfu}: expected a fraction in (0, 1]")
  chip = chips[topology.generation]
  hours = steps * flops_per_step / (topology.chips * chip.peak_flops * mfu) / 3600
  return hours, hours * topology.chips * chip.price_per_chip_hour


def estimate(variants: Sequence[str] = tuple(moe_llava.VARIANTS),
             topology_names: Sequence[str] = tuple(topologies.TOPOLOGIES),
             mfu: float = DEFAULT_MFU, chips: Mapping[str, Chip] = CHIPS,
             samples: Mapping[int, int] = PAPER_SAMPLES) -> list[StageCost]:
  rows = []
  for variant in variants:
    c = moe_llava.get_config(variant)
    for k in (1, 2, 3):
      s = c.stages[f"stage{k}"]
      steps = max(1, s.epochs * samples[k] // s.batch_size)
      fl = stage_step_flops(stage_model_config(variant, k), s.train, s.batch_size,
                            c.data.max_length)["model"]
      for name in topology_names:
        t = topologies.get(name)
        hours, cost = stage_cost(fl, steps, t, mfu, chips)
        rows.append(StageCost(variant, k, steps, s.batch_size, fl, t.name, t.chips, hours,
                              cost))
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
    if gen not in CHIPS or not value:
      raise argparse.ArgumentTypeError(f"--price {item!r}: expected GEN=USD with GEN one "
                                       f"of {', '.join(CHIPS)}")
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
           for g, c in CHIPS.items()}
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
