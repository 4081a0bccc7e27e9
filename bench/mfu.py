"""Model-FLOPs utilisation of our train step against a measured dense-matmul peak.

    python -m bench.mfu [--tiny] [--device-note TEXT] [--reps N] [--dtype bfloat16]
                        [--dispatch capacity]

The benchmark model of `bench.config` (vision tower frozen, MoE top-2 of 4, AdamW) is
trained with our jit train step (`moe_vlm.train.step`) on a 1-device mesh.

- Model FLOPs per step come from `bench.config.train_step_flops` (the package's cost
  model, `moe_vlm.cost`): matmul FLOPs of the useful work only, counting the top_k
  ACTIVE experts of every MoE layer and, for the frozen vision tower, only its forward
  (no backward reaches it, nor the projector's first matmul). They are printed next to
  XLA's `compiled.cost_analysis()["flops"]` with their ratio, and again with the expert
  FLOPs XLA executes beyond the active ones added (ragged_dot lowered densely, as on
  CPU with `moe.gmm_impl="ragged_dot"`, or the capacity path's empty slots) or, for
  the blocked gmm (CPU default), the expert FLOPs XLA's count leaves out (it counts
  each while-loop body once); the two should then agree to within ~1%.
- The peak is a jit-compiled [n, n] @ [n, n] matmul (n = 2048; fp32, or the compute
  dtype), measured in the same run, in interleaved rounds of three matmul samples and
  two back-to-back steps, each turn opened by an untimed call
  (`bench.common.interleaved_times`), so load bursts hit both.
- MFU = model FLOPs / median step time / median matmul rate. The XLA-FLOP utilisation
  (XLA FLOPs instead of model FLOPs) and the MFU of the fastest samples are printed too.

`--tiny` shrinks every shape so the whole run takes seconds (tests/test_bench_train_step.py).
Benchmarks print figures; they assert nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Callable, Optional, Sequence

import jax.numpy as jnp

from bench import common, config
from bench.common import (compile_all, fmt_time, interleaved_times, matmul_peak, median,
                          xla_flops)
from moe_vlm import cost

# How the printed FLOP table names `moe_vlm.cost.MODEL_PARTS`.
PART_NAMES = {"vision": "vision tower (frozen: forward only)", "projector": "projector",
              "attention": "decoder attention projections (q, k, v, o)",
              "attention_scores": "decoder attention scores (q k^T, p v)",
              "ffn": "decoder FFNs (routers + top_k active experts)", "lm_head": "lm_head"}


def prepare(s: config.Sizes, out: Callable[[str], None], dispatch: str = "dropless",
            head_fraction: Optional[float] = None) -> config.JaxStep:
  """The benchmark model's train step, lowered (compile it with `compile_all`). MFU
  takes the LM head on every position (head_fraction None), as the FLOP formula counts."""
  cfg = config.vlm_config(s, dispatch)
  out(f"== Train step: {config.describe(cfg, s.batch, s.seq)}; vision tower frozen "
      f"(stage preset {config.STAGE_PRESET}); AdamW; 1-device mesh")
  batch = config.train_batch(cfg, s.batch, s.seq)
  step = config.jax_train_step(config.random_vlm(cfg), batch, head_fraction=head_fraction)
  if head_fraction:
    out(f"LM head on {step.step_cfg.head_capacity(s.seq) or s.seq} of {s.seq} positions per "
        f"row (head_fraction {head_fraction:.3f})")
  out(f"params: {step.n_params / 1e6:.2f} M total, {step.n_trainable / 1e6:.2f} M trainable")
  return step


def run(step: config.JaxStep, s: config.Sizes, out: Callable[[str], None]) -> dict[str, float]:
  """Time the compiled step next to the matmul peak; print and return the MFU figures."""
  cfg = step.cfg
  dispatch = cfg.text.moe.dispatch
  b, l = s.batch, s.seq
  out(f"== Train step ({dispatch})")
  xla = xla_flops(step.compiled)

  # Peak and step side by side, in alternating order: per round 3 matmuls and 2 steps,
  # each turn opened by one untimed call so the steps are timed back to back, as in
  # training (see bench.common.interleaved_times on memory idle between turns).
  mm, mm_flops = matmul_peak(s.matmul_n, jnp.dtype(s.dtype))
  times = interleaved_times({"matmul": mm, "step": step}, reps=s.step_reps, warmup=1,
                            per_round={"matmul": 3, "step": 2}, settle=1)
  t_step, t_mm = median(times["step"]), median(times["matmul"])
  peak = mm_flops / t_mm
  best_peak = mm_flops / min(times["matmul"])

  f = config.train_step_flops(cfg, b, l)
  model_flops = f["model"]
  out("model FLOPs per step (formula, see moe_vlm.cost.train_step_flops):")
  for k in cost.MODEL_PARTS:
    out(f"  {PART_NAMES[k]:44s} {f[k] / 1e9:10.2f} GFLOP")
  out(f"  {'total':44s} {model_flops / 1e9:10.2f} GFLOP")
  results = {"model_flops": model_flops, "step_s": t_step, "peak_flops": peak,
             "tokens_per_s": b * l / t_step}
  if xla:
    out(f"XLA cost_analysis flops: {xla / 1e9:.2f} GFLOP; formula / XLA = "
        f"{model_flops / xla:.3f}")
    # What XLA executes differs from the model FLOPs: expert rows beyond the active ones
    # (ragged_dot lowered densely, empty capacity slots) and attention pairs the causal
    # blocks skip; and XLA does not count the blocked gmm's loop iterations after the first.
    extra, skipped = f["expert_extra"], f["causal_skip"]
    formula_executed = f["hardware"]
    if extra:
      why = ("ragged_dot lowered densely on CPU: every row x all E experts"
             if dispatch == "dropless" else "empty capacity slots computed")
      out(f"+ expert FLOPs XLA executes beyond the active ones ({why}): "
          f"{extra / 1e9:.2f} GFLOP")
    if skipped:
      out(f"- attention FLOPs the causal query blocks skip: {skipped / 1e9:.2f} GFLOP")
    uncounted = f["xla_uncounted"]
    if uncounted:
      out(f"+ to XLA's count, expert FLOPs it does not count (blocked gmm: cost_analysis "
          f"counts each while-loop body once, one block per expert matmul): "
          f"{uncounted / 1e9:.2f} GFLOP")
      results["xla_uncounted"] = uncounted
    xla_executed = xla + uncounted
    out(f"executed FLOPs by the formula {formula_executed / 1e9:.2f} GFLOP / by XLA "
        f"{xla_executed / 1e9:.2f} GFLOP = {formula_executed / xla_executed:.3f}")
    results["executed_over_xla"] = formula_executed / xla_executed
    results["xla_flops"] = xla
    results["formula_over_xla"] = model_flops / xla
  out(f"step time: median {fmt_time(t_step)} over {len(times['step'])} (min "
      f"{fmt_time(min(times['step']))}); {b * l / t_step:.1f} tokens/s; "
      f"{model_flops / t_step / 1e9:.2f} model GFLOP/s")
  out(f"matmul peak ({s.matmul_n}^3 {s.dtype}, jit, {len(times['matmul'])} samples): median "
      f"{peak / 1e9:.2f} GFLOP/s (best {best_peak / 1e9:.2f})")
  mfu = model_flops / t_step / peak
  results["mfu"] = mfu
  if xla:
    what = " (XLA + the FLOPs it does not count)" if "xla_uncounted" in results else ""
    out(f"XLA-FLOP utilisation{what} vs measured matmul peak: "
        f"{100 * xla_executed / t_step / peak:.1f}%")
  # On a shared machine both medians carry load noise, unevenly (a long step vs short
  # matmuls); the best samples of each are the least disturbed estimate.
  out(f"MFU from the best samples (fastest step vs fastest matmul): "
      f"{100 * model_flops / min(times['step']) / best_peak:.1f}%")
  out(f"MFU vs measured matmul peak: {100 * mfu:.1f}%")
  return results


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> dict:
  p = argparse.ArgumentParser(prog="python -m bench.mfu", description=__doc__.split("\n")[0])
  p.add_argument("--device-note", default="", help="free text describing the machine")
  p.add_argument("--tiny", action="store_true", help="tiny shapes: runs in seconds")
  p.add_argument("--reps", type=int, default=None,
                 help="interleaved rounds (one step and 3 matmuls each)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype (parameters stay fp32); the matmul peak uses it too")
  p.add_argument("--dispatch", choices=("dropless", "capacity"), default="dropless",
                 help="MoE dispatch of the train step (capacity: factor 1.5)")
  args = p.parse_args(argv)
  s = config.TINY if args.tiny else config.FULL
  if args.reps is not None:
    if args.reps < 1:
      p.error(f"--reps={args.reps}: expected at least 1 round")
    s = dataclasses.replace(s, step_reps=args.reps)
  s = dataclasses.replace(s, dtype=args.dtype)
  common.print_header(out, "bench.mfu", args.tiny, args.device_note)
  t0 = time.perf_counter()
  step = prepare(s, out, args.dispatch)
  t1 = time.perf_counter()
  step.set_compiled(compile_all([step.lowered])[0])
  out(f"compile: {time.perf_counter() - t1:.1f} s (tracing and set-up before that: "
      f"{t1 - t0:.1f} s)")
  results = run(step, s, out)
  out(f"# total wall time {time.perf_counter() - t0:.1f} s")
  return results


if __name__ == "__main__":
  common.reexec_with_malloc_tunables("bench.mfu", sys.argv[1:])
  main(sys.argv[1:])
