"""MoE-LLaVA vs the other seed designs on the embedded synthetic data, in one table.

  python -m bench.variants --workdir /tmp/variants [--scale 0.5] [--variants a,b]

Trains every variant of `configs/variants.py` with the same trainer (MoE-LLaVA and
Awaker share stages 1-2: Awaker's stage 3 starts from MoE-LLaVA's stage-2 final), then
per variant's last stage reports held-out accuracy and POPE accuracy (the report's
evaluation), total and active parameters (per token: only top-k of the routed experts
count), LLM tokens per image, and the train-step time of that stage measured side by
side on one fixed batch (so the machine's noise hits every variant alike).
`--scale` multiplies every stage's step count (1.0 = the default run's schedule).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from configs import variants as variants_cfg
from moe_vlm.models.config import VLMConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.train import step as step_lib
from moe_vlm.train.stages import trainable_fn


def param_counts(cfg: VLMConfig) -> dict[str, int]:
  """Total parameters, and those one token uses: of E routed experts (MoE FFN experts,
  LoRA experts) only top_k are active; everything else (shared LoRA expert, routers,
  HyperLLaVA generators, the vision tower) counts in full."""
  codec = ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  total = active = 0
  for name, shape in codec.shapes.items():
    n = int(np.prod(shape.shape))
    total += n
    if ".mlp.experts." in name:
      moe = cfg.text.moe
      n = n * moe.top_k // moe.num_experts
    elif ".lora_" in name and len(shape.shape) == 3:  # routed LoRA experts [E, in|r, r|out]
      lm = cfg.text.lora_moe
      n = n * lm.top_k // lm.num_experts
    active += n
  return {"total": total, "active": active}


def _timing_batch(cfg: VLMConfig, batch: int, length: int, seed: int = 0) -> dict:
  """A batch of the pipeline's shapes: one image per row, answers in the last quarter."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, cfg.image_token_id, (batch, length))
  ids[:, 1:1 + cfg.num_image_tokens] = cfg.image_token_id
  loss = np.zeros((batch, length), np.int32)
  loss[:, -length // 4:] = 1
  size = cfg.vision.image_size
  return {"input_ids": jnp.asarray(ids, jnp.int32),
          "attention_mask": jnp.ones((batch, length), jnp.int32),
          "loss_mask": jnp.asarray(loss),
          "pixel_values": jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)}


def step_thunk(cfg: VLMConfig, preset: str, batch: dict) -> Callable[[], Any]:
  """One compiled train step of `preset` on `cfg`, as a thunk for interleaved timing."""
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  step_cfg = step_lib.StepConfig()
  tx = step_lib.make_optimizer(step_cfg.optim)
  state = step_lib.init_state(codec.flatten(model), trainable_fn(preset), tx)
  step = jax.jit(step_lib.make_train_step(codec, step_cfg, tx)).lower(state, batch).compile()
  return lambda: step(state, batch)[1]["loss"]


def _scaled(c, scale: float, max_examples: int):
  for k in (1, 2, 3):
    s = c.stages[f"stage{k}"]
    s.steps = max(1, int(round(s.steps * scale)))
  c.checkpoint.every_steps = max(c.stages.stage2.steps, 1)
  c.eval.max_examples = max_examples
  return c


def train_variant(variant: str, root: str, scale: float, max_examples: int) -> dict[str, Any]:
  """Trains `variant` under root/<variant> (data shared in root/data); returns its final
  stage's config, preset and evaluation."""
  from moe_vlm.eval import report
  from moe_vlm.train import loop

  c = _scaled(variants_cfg.get_config(variant), scale, max_examples)
  c.data.dir = os.path.join(root, "data")
  c.data.tokenizer = os.path.join(root, "data", "tokenizer")
  wd = os.path.join(root, variant)
  stages = variants_cfg.STAGES[variant]
  base = os.path.join(root, "moe_llava")
  if variant == "awaker":  # Awaker's stages I-III on MoE-LLaVA's stage-2 dense model
    if not os.path.isdir(os.path.join(base, "stage2", "final")):
      dense = _scaled(variants_cfg.get_config("moe_llava"), scale, max_examples)
      dense.data.dir, dense.data.tokenizer = c.data.dir, c.data.tokenizer
      loop.train(dense, base, (1, 2))
    c.init.params = os.path.join(base, "stage2", "final")
    c.vision_pretrain.steps = 0  # the base's tower
  exp = loop.train(c, wd, stages)
  last = max(stages)
  cfg = exp.model_config(last)
  result = report.evaluate(exp.load_model(last), cfg, exp.tokenizer, c, exp.data_dir)
  return {"cfg": cfg, "preset": c.stages[f"stage{last}"].train, "stage": last,
          "eval": result, "batch": c.stages[f"stage{last}"].batch_size,
          "length": c.data.max_length}


def table(rows: dict[str, dict], times: dict[str, float]) -> list[str]:
  ref = times.get("moe_llava")
  out = ["| variant | last stage | held-out acc. | POPE acc. | params total / active | "
         "tokens per image | train step | vs MoE-LLaVA |",
         "|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    counts = param_counts(r["cfg"])
    pope = r["eval"]["pope"]["all"]
    pope_acc = pope.get("accuracy", float("nan"))
    out.append(
        f"| {name} | {r['stage']} ({r['preset']}) | {r['eval']['accuracy']:.1f} | "
        f"{pope_acc:.1f} | {counts['total'] / 1e6:.2f}M / {counts['active'] / 1e6:.2f}M | "
        f"{r['cfg'].num_image_tokens} | {times[name] * 1e3:.0f} ms | "
        f"{(times[name] / ref) if ref else float('nan'):.2f}x |")
  return out


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--variants", default=",".join(variants_cfg.VARIANTS))
  p.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's steps")
  p.add_argument("--max-examples", type=int, default=0, help="eval examples (0: all)")
  p.add_argument("--reps", type=int, default=3, help="interleaved train-step timing rounds")
  p.add_argument("--device-note", default="")
  args = p.parse_args(argv)
  names = [v for v in args.variants.split(",") if v]
  # MoE-LLaVA first: Awaker reuses its stages 1-2.
  names.sort(key=lambda v: variants_cfg.VARIANTS.index(v))
  common.print_header(out, "variants", False, args.device_note,
                      f", step scale {args.scale}")
  rows = {v: train_variant(v, args.workdir, args.scale, args.max_examples) for v in names}
  thunks = {v: step_thunk(r["cfg"], r["preset"], _timing_batch(r["cfg"], r["batch"],
                                                               r["length"]))
            for v, r in rows.items()}
  times = {k: common.median(v) for k, v in common.interleaved_times(thunks, args.reps,
                                                                         settle=1).items()}
  lines = table(rows, times)
  for line in lines:
    out(line)
  with open(os.path.join(args.workdir, "variants.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(args.workdir, "variants.json"), "w") as f:
    json.dump({v: {"accuracy": r["eval"]["accuracy"], "pope": r["eval"]["pope"]["all"],
                   "step_s": times[v], **param_counts(r["cfg"]),
                   "tokens_per_image": r["cfg"].num_image_tokens}
               for v, r in rows.items()}, f, indent=2)
  return {"rows": rows, "times": times, "lines": lines}


if __name__ == "__main__":
  main()
