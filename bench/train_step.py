"""Train-step tokens/s of our jit train step vs transformers PyTorch, same model and batch.

    python -m bench.train_step [--tiny] [--device-note TEXT] [--reps N] [--dtype bfloat16]
                               [--torch-threads N] [--torch-experts IMPL] [--head-fraction F]

The benchmark model of `bench.config` (CLIP-style ViT 4 x 256, 112 px / 14 px patches;
Qwen2-style decoder 8 x 512, 8 q / 4 kv heads, FFN 1408, 4 experts top-2 in every other
layer, no shared expert, vocab 8000; random N(0, 0.02) weights) is trained on one batch
of 8 x 256 tokens (64 image tokens per row, loss on the answer part) by:

- jax: our train step (`moe_vlm.train.step.make_train_step` + `jit_train_step`, AdamW
  with global-norm clipping from `moe_vlm.train.optim`, stage preset `projector_llm` so
  the vision tower is frozen, MoE dispatch dropless) on a 1-device mesh;
- torch: the same weights exported with `export_vlm(..., layout="llava")` and loaded by
  `transformers.LlavaForConditionalGeneration` (LLaVA with a Qwen2-MoE text model), its
  vision tower frozen (`requires_grad_(False)`); per step: forward with `labels` (the
  same loss mask: -100 elsewhere), plus our load-balancing loss (0.01 x the sum over
  MoE layers of mean(me * ce) * E^2, from the routers' logits, as our step adds it),
  backward, `clip_grad_norm_(1.0)` and `torch.optim.AdamW`. transformers' Qwen2-MoE
  never drops tokens (each expert's routed rows are gathered and computed), so both
  sides are dropless.

LM head: transformers computes the logits of every position and masks the loss. Our
step (`StepConfig.head_fraction`, `moe_vlm.train.step.answer_loss`) gathers the
positions that have a target first and runs the final norm, the [512, 8000] head and
the softmax only there: 160 of 256 positions per row here (the batch's 159 targets,
rounded up to 8). Same loss and gradients; `--head-fraction 0` runs the full head, to
compare the implementations alone.

Before timing, the first step of each side is the correctness check: their initial
losses (cross-entropy, and cross-entropy + 0.01 x aux) must agree within 1e-3 (fp32;
5e-2 with bf16 compute), which proves that the model and the batch are the same. The
script raises otherwise: timing two different computations would be moot.

Timing: `bench.common.interleaved_times` in rounds, the order reversed every other
round. In each round a side takes a turn of `--settle` untimed steps (default 1) and
then `--steps-per-turn` timed ones (default 2), so the timed steps run back to back as
in a training loop. The untimed switch-in steps are reported on their own line: on
this project's VMs memory freed and left idle for a few seconds is reclaimed by the
host, and the first step after the other side's turn pays for faulting it in again
(measured: jax 3.2-3.9 s of kernel time instead of 0.3 s; one step of each side per
round made the ratio 0.75x where back-to-back steps gave 0.95x, see BENCHMARKS.md).
tokens/s = B x L / step time (median of the timed steps), and the ratio line is the
median of the paired jax/torch ratios (j-th timed step of each side in one round).
Compilation and the first (checking) step are excluded. Threads: torch gets as many
intra-op threads as XLA:CPU uses (the cores this process may run on; `--torch-threads`
overrides); both counts are printed. On a GPU torch runs on `cuda` when it can
(`--torch-device`).

`--tiny` shrinks every shape so the whole run takes seconds (tests/test_bench_train_step.py).
Benchmarks print figures; they assert nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, config  # noqa: E402
from bench.common import compile_all, fmt_time, interleaved_times, median  # noqa: E402
from moe_vlm.convert.export import export_vlm  # noqa: E402
from moe_vlm.train.optim import OptimConfig  # noqa: E402

# Initial-loss agreement required before timing, by compute dtype.
LOSS_TOL = {"float32": 1e-3, "bfloat16": 5e-2}


def xla_cpu_threads() -> int:
  """Intra-op threads XLA:CPU runs with: the cores this process may use, unless XLA_FLAGS
  turns the Eigen pool off or sets its size."""
  flags = os.environ.get("XLA_FLAGS", "")
  if re.search(r"--xla_cpu_multi_thread_eigen=(false|0)\b", flags):
    return 1
  m = re.search(r"intra_op_parallelism_threads=(\d+)", flags)
  if m:
    return int(m.group(1))
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


class TorchStep:
  """transformers' LLaVA + Qwen2-MoE train step on the exported model: forward with
  labels, + aux loss, backward, clip, AdamW. Each call runs one step and returns
  (cross-entropy, aux loss) as floats (`.item()` also waits for the device)."""

  def __init__(self, model_dir: str, batch: dict[str, np.ndarray], *, device: str,
               dtype: str, aux_loss_coef: float, clip_norm: float, lr: float,
               experts_impl: Optional[str] = None):
    import torch
    import transformers

    kw = {"experts_implementation": experts_impl} if experts_impl else {}
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, **kw)
    model.to(device).train()
    model.model.vision_tower.requires_grad_(False)  # frozen, as our stage preset
    self.torch, self.model, self.device = torch, model, device
    self.params = [p for p in model.parameters() if p.requires_grad]
    # Qwen2-MoE always builds a shared expert; the export gives it size 0 and a [1, D]
    # gate (its output is 0). Counted apart so the rest can be compared with ours.
    shared = lambda name: ".shared_expert" in name
    named = list(model.named_parameters())
    self.n_shared_expert = sum(p.numel() for n, p in named if shared(n))
    self.n_trainable = sum(p.numel() for n, p in named if p.requires_grad and not shared(n))
    self.n_params = sum(p.numel() for n, p in named if not shared(n))
    self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.0)
    self.aux_loss_coef, self.clip_norm = aux_loss_coef, clip_norm
    self.autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                     if dtype == "bfloat16" else contextlib.nullcontext())
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = ids.masked_fill(torch.from_numpy(batch["loss_mask"]) == 0, -100)
    pixels = np.ascontiguousarray(batch["pixel_values"].transpose(0, 3, 1, 2))  # NCHW
    self.inputs = dict(input_ids=ids.to(device),
                       attention_mask=torch.from_numpy(batch["attention_mask"]).long().to(device),
                       pixel_values=torch.from_numpy(pixels).to(device),
                       labels=labels.to(device))
    # The routers' logits, captured per call (LLaVA's forward drops Qwen2-MoE's router
    # outputs and aux loss, so the load-balancing loss is computed here, as ours).
    self._router_logits: list[Any] = []
    self.routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    for m in self.routers:
      m.register_forward_hook(lambda _m, _in, out: self._router_logits.append(out[0]))
    try:
      impl = model.get_experts_implementation()
      self.experts_impl = impl.get("text_config", impl) if isinstance(impl, dict) else impl
    except Exception:  # noqa: BLE001  (informative only)
      self.experts_impl = experts_impl or "n/a"
    self.attn_impl = getattr(model.config, "_attn_implementation", "n/a")

  def load_balancing_loss(self) -> Any:
    """Sum over MoE layers of mean(me * ce) * E^2 (moe_vlm.models.moe.load_balancing_loss)."""
    torch = self.torch
    total = torch.zeros((), device=self.device)
    for logits in self._router_logits:
      probs = torch.softmax(logits.float(), dim=-1)
      e = probs.shape[-1]
      ce = torch.nn.functional.one_hot(probs.argmax(-1), e).float().mean(0)
      total = total + (probs.mean(0) * ce).mean() * e * e
    return total

  def __call__(self) -> tuple[float, float]:
    self._router_logits.clear()
    self.opt.zero_grad(set_to_none=True)
    with self.autocast:
      ce = self.model(**self.inputs).loss
      aux = self.load_balancing_loss()
      loss = ce + self.aux_loss_coef * aux
    loss.backward()
    if self.clip_norm:
      self.torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
    self.opt.step()
    return float(ce.item()), float(aux.item())


def loss_check(jax_ce: float, jax_aux: float, torch_ce: float, torch_aux: float,
               aux_coef: float, tol: float) -> dict[str, Any]:
  """Initial losses of both sides and whether they agree within `tol`."""
  jt, tt = jax_ce + aux_coef * jax_aux, torch_ce + aux_coef * torch_aux
  diff = max(abs(jax_ce - torch_ce), abs(jt - tt))
  return {"jax_ce": jax_ce, "torch_ce": torch_ce, "jax_aux": jax_aux, "torch_aux": torch_aux,
          "jax_total": jt, "torch_total": tt, "max_abs_diff": diff, "tol": tol,
          "match": bool(diff <= tol)}


def matmul_rates(n: int, torch_device: str, reps: int) -> dict[str, list[float]]:
  """Seconds per fp32 [n, n] @ [n, n] matmul of XLA, torch and numpy, interleaved.

  The best of the three is the fastest the machine multiplies matrices with the
  libraries at hand: numpy's BLAS can beat both frameworks' kernels on a CPU.
  """
  import torch
  xla, _ = common.matmul_peak(n)
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
  ta, tb = torch.from_numpy(a).to(torch_device), torch.from_numpy(b).to(torch_device)

  def torch_mm():
    c = ta @ tb
    if torch_device != "cpu":
      torch.cuda.synchronize()
    return c
  fns = {"xla": xla, "torch": torch_mm}
  if torch_device == "cpu":
    fns["numpy"] = lambda: a @ b
  return interleaved_times(fns, reps=max(reps, 3), per_round={k: 3 for k in fns})


def ratio_ceiling(cfg, s: config.Sizes, t_torch: float, torch_device: str, reps: int,
                  out: Callable[[str], None], head_fraction: Optional[float] = None
                  ) -> dict[str, float]:
  """The jax/torch ratio a step could reach if it ran every model FLOP at the best
  matmul rate measured here and did nothing else: best rate / torch's model FLOP rate.

  A target ratio above it cannot be met by this step on this machine, whatever the
  implementation (model FLOPs: `bench.config.train_step_flops`). With the compact LM
  head (`head_fraction`: our step's, None when it ran the full head), our step skips
  part of those FLOPs, and its ceiling rises by the same factor (a second line).
  """
  flops = config.train_step_flops(cfg, s.batch, s.seq)["model"]
  times = matmul_rates(s.matmul_n, torch_device, reps)
  mm_flops = 2.0 * s.matmul_n ** 3
  rates = {k: mm_flops / median(v) for k, v in times.items()}
  best = max(rates, key=rates.get)
  torch_rate = flops / t_torch
  out(f"== ceiling: fp32 {s.matmul_n}^3 matmul, median GFLOP/s: "
      + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()))
  out(f"torch step runs {torch_rate / 1e9:.1f} model GFLOP/s = {torch_rate / rates[best]:.0%} "
      f"of the best matmul ({best})")
  ceiling = rates[best] / torch_rate
  out(f"ratio ceiling (every model FLOP at the best matmul rate, nothing else): "
      f"{ceiling:.2f} x torch")
  result = {"model_flops": flops, "torch_model_flops_per_s": torch_rate,
            "best_matmul_flops_per_s": rates[best], "best_library": best,
            "ratio_ceiling": ceiling}
  skipped = flops - config.train_step_flops(cfg, s.batch, s.seq, head_fraction)["model"]
  if skipped:
    result["compact_head_ceiling"] = ceiling * flops / (flops - skipped)
    out(f"our LM head skips {skipped / 1e9:.4g} of those {flops / 1e9:.4g} GFLOP (positions "
        f"without a target): ceiling for our step {result['compact_head_ceiling']:.2f} x torch")
  return result


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> dict:
  p = argparse.ArgumentParser(prog="python -m bench.train_step",
                              description=__doc__.split("\n")[0])
  p.add_argument("--device-note", default="", help="free text describing the machine")
  p.add_argument("--tiny", action="store_true", help="tiny shapes: runs in seconds")
  p.add_argument("--reps", type=int, default=None, help="interleaved timing rounds")
  p.add_argument("--settle", type=int, default=1,
                 help="untimed steps opening each side's turn in a round")
  p.add_argument("--steps-per-turn", type=int, default=2,
                 help="timed steps of each side per round, after the settle steps")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype on both sides (parameters stay fp32); bf16 is for "
                 "accelerators (torch: autocast)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default: XLA:CPU's thread count)")
  p.add_argument("--torch-device", default=None,
                 help="torch device (default: cuda if jax runs on a GPU and torch has CUDA)")
  p.add_argument("--torch-experts", default=None,
                 help="transformers experts_implementation (default: transformers' own)")
  p.add_argument("--full-head-side", action="store_true",
                 help="also time our step with the LM head on every position, as a third "
                 "side (prints the compact/full speed-up measured in the same rounds)")
  p.add_argument("--head-fraction", type=float, default=None,
                 help="jax: StepConfig.head_fraction, the LM head only on that fraction of "
                 "each row's positions, where the targets are (default: the batch's "
                 "targets per row / seq; 0: every position, as transformers does)")
  args = p.parse_args(argv)
  s = config.TINY if args.tiny else config.FULL
  reps = args.reps if args.reps is not None else s.step_reps
  if reps < 1:
    p.error(f"--reps={reps}: expected at least 1 round")
  if args.settle < 0:
    p.error(f"--settle={args.settle}: expected 0 or more untimed steps")
  if args.steps_per_turn < 1:
    p.error(f"--steps-per-turn={args.steps_per_turn}: expected at least 1")
  if args.head_fraction is not None and not 0.0 <= args.head_fraction <= 1.0:
    p.error(f"--head-fraction={args.head_fraction}: expected a fraction in [0, 1]")
  if args.torch_threads is not None and args.torch_threads < 1:
    p.error(f"--torch-threads={args.torch_threads}: expected at least 1")
  s = dataclasses.replace(s, dtype=args.dtype)

  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  jax_platform = jax.devices()[0].platform
  torch_device = args.torch_device or (
      "cuda" if jax_platform == "gpu" and torch.cuda.is_available() else "cpu")
  xla_threads = xla_cpu_threads()
  torch.set_num_threads(args.torch_threads or xla_threads)
  common.print_header(out, "bench.train_step", args.tiny, args.device_note,
                      extra=f"; torch {torch.__version__} on {torch_device}, "
                      f"transformers {transformers.__version__}")
  out(f"threads: jax/XLA:CPU {xla_threads} (cores this process may use), torch "
      f"{torch.get_num_threads()} (torch.set_num_threads)")
  if jax_platform != "cpu" and torch_device == "cpu":
    out(f"WARNING: jax runs on {jax_platform} but torch on cpu: the ratio compares devices")
  t0 = time.perf_counter()

  cfg = config.vlm_config(s, "dropless")
  b, l = s.batch, s.seq
  out(f"== model: {config.describe(cfg, b, l)}; vision tower frozen; AdamW, clip 1.0, aux "
      f"loss 0.01")
  batch = config.train_batch(cfg, b, l)
  model = config.random_vlm(cfg)
  optim = OptimConfig(learning_rate=1e-4, total_steps=1000)
  with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
    layout = export_vlm(model, tmp, layout="llava")
    theirs = TorchStep(tmp, batch, device=torch_device, dtype=s.dtype,
                       aux_loss_coef=0.01, clip_norm=optim.clip_norm,
                       lr=optim.learning_rate, experts_impl=args.torch_experts)
  targets_per_row = config.max_targets_per_row(batch)
  head_fraction = (config.batch_head_fraction(batch) if args.head_fraction is None
                   else args.head_fraction or None)
  # takes the model's arrays:
  ours = config.jax_train_step(model, batch, optim, head_fraction=head_fraction)
  del model
  head_rows = ours.step_cfg.head_capacity(l) or l
  # Same seed, same weights: the full-head step trains the same model.
  full = (config.jax_train_step(config.random_vlm(cfg), batch, optim)
          if args.full_head_side and head_rows < l else None)
  out(f"jax LM head + loss on {head_rows} of {l} positions per row (head_fraction "
      f"{head_fraction or 0:.3f}; the batch has {targets_per_row} targets per row); "
      f"transformers on all {l}")
  aux_coef = ours.step_cfg.aux_loss_coef
  if aux_coef != theirs.aux_loss_coef:
    raise RuntimeError(f"aux loss coefficients differ: jax {aux_coef}, torch "
                       f"{theirs.aux_loss_coef}")
  out(f"== exported ({layout} layout) and loaded by transformers: "
      f"{type(theirs.model).__name__} / {theirs.model.config.text_config.model_type}, "
      f"attention {theirs.attn_impl}, experts {theirs.experts_impl}, "
      f"{len(theirs.routers)} MoE routers; params jax {ours.n_params:,} "
      f"({ours.n_trainable:,} trainable), torch {theirs.n_params:,} "
      f"({theirs.n_trainable:,} trainable) + {theirs.n_shared_expert:,} in the empty "
      f"shared experts")
  if (ours.n_params, ours.n_trainable) != (theirs.n_params, theirs.n_trainable):
    out("WARNING: parameter counts differ between the two sides")
  t1 = time.perf_counter()
  jax_steps = [ours] + ([full] if full else [])
  for step, compiled in zip(jax_steps, compile_all([x.lowered for x in jax_steps])):
    step.set_compiled(compiled)
  out(f"compile (jax): {time.perf_counter() - t1:.1f} s (set-up, export and load before "
      f"that: {t1 - t0:.1f} s)")

  # The first step of each side: the agreement check (and the warm-up).
  t1 = time.perf_counter()
  m = jax.device_get(ours())
  first_jax = time.perf_counter() - t1
  if full:
    m_full = jax.device_get(full())
    out(f"full-head side: CE {float(m_full['loss']):.6f} (compact {float(m['loss']):.6f})")
    if abs(float(m_full["loss"]) - float(m["loss"])) > 1e-5:
      raise RuntimeError("the compact and full LM heads give different losses")
  t1 = time.perf_counter()
  torch_ce, torch_aux = theirs()
  first_torch = time.perf_counter() - t1
  check = loss_check(float(m["loss"]), float(m["aux_loss"]), torch_ce, torch_aux, aux_coef,
                     LOSS_TOL[s.dtype])
  out(f"initial loss: jax CE {check['jax_ce']:.6f} + {aux_coef} x aux {check['jax_aux']:.6f}; "
      f"torch CE {check['torch_ce']:.6f} + {aux_coef} x aux {check['torch_aux']:.6f}; "
      f"max |diff| {check['max_abs_diff']:.2e} (tolerance {check['tol']:.0e}): "
      f"{'match' if check['match'] else 'MISMATCH'}")
  out(f"first steps: jax {first_jax:.2f} s, torch {first_torch:.2f} s; jax ran the "
      f"{'full' if float(m['head_full']) else 'compact'} LM head")
  if not check["match"]:
    raise RuntimeError(f"initial losses differ by {check['max_abs_diff']:.3g} > "
                       f"{check['tol']}: the two sides do not train the same model on the "
                       f"same batch; not timing them")

  sides = {"jax": ours, "torch": theirs, **({"jax_full_head": full} if full else {})}
  switch_in: dict[str, list[float]] = {}
  times = interleaved_times(sides, reps=reps, warmup=0, settle=args.settle,
                            settle_times=switch_in,
                            per_round={k: args.steps_per_turn for k in sides})
  tokens = b * l
  t_torch = median(times["torch"])
  rate = {k: tokens / median(v) for k, v in times.items()}
  ratio = common.paired_ratio(times["torch"], times["jax"])
  best = min(times["torch"]) / min(times["jax"])
  out(f"== timings: {reps} interleaved rounds; per round each side runs {args.settle} "
      f"untimed + {args.steps_per_turn} timed steps back to back")
  for name in sides:
    out(f"{name:6s} step: median {fmt_time(median(times[name]))} (min "
        f"{fmt_time(min(times[name]))}) = {rate[name]:.1f} tokens/s")
  if switch_in:
    out("switch-in steps (untimed, first of each turn, after the other side ran): "
        + ", ".join(f"{k} median {fmt_time(median(v)).strip()}" for k, v in switch_in.items()))
  out(f"train_step tokens/s: jax {rate['jax']:.1f}, torch {rate['torch']:.1f}; "
      f"jax/torch = {ratio:.2f} x  [fastest/fastest {best:.2f} x]")
  head_ratio = None
  if full:
    head_ratio = common.paired_ratio(times["jax_full_head"], times["jax"])
    out(f"compact/full LM head (ours, same rounds): {head_ratio:.3f} x; full head/torch = "
        f"{common.paired_ratio(times['torch'], times['jax_full_head']):.2f} x")
  ceiling = ratio_ceiling(cfg, s, t_torch, torch_device, reps, out,
                          head_fraction=None if float(m["head_full"]) else head_fraction)
  out(f"# total wall time {time.perf_counter() - t0:.1f} s")
  return {"loss_check": check, "times": times, "switch_in_times": switch_in,
          "tokens_per_s": rate, "ratio": ratio,
          "ceiling": ceiling,
          "threads": {"xla": xla_threads, "torch": torch.get_num_threads()},
          "torch_experts": theirs.experts_impl,
          "head": {"rows": head_rows, "targets_per_row": targets_per_row,
                   "full": bool(float(m["head_full"])), "compact_over_full": head_ratio}}


if __name__ == "__main__":
  common.reexec_with_malloc_tunables("bench.train_step", sys.argv[1:])
  main(sys.argv[1:])
