"""MoE layer cost vs the dense FFN, and the train step's model-FLOPs utilisation.

    python -m bench.moe_layer [--device-note TEXT] [--tiny] [--reps N] [--step-reps N]

Part 1 times one MoE FFN layer (jit-compiled, warmed up, median of interleaved rounds,
`block_until_ready` on every call) against the dense FFN (`MLP`) on the same tokens:

- forward alone, and forward + backward = grad w.r.t. the parameters of sum(y * ct);
- the dropless path (sort + grouped matmul) with `jax.lax.ragged_dot` (`moe_dropless`;
  lowered densely on CPU) and with the blocked gmm of moe_vlm.models.gmm
  (`moe_dropless_blocked`), and the capacity path at factors 1.5 and 2.0 (train=True,
  whole batch one routing group, as MoE-LLaVA's defaults);
- the router + dispatch alone: the same layer with the experts replaced by identity.

Each `ratio line` is  MoE time / (top_k x dense FFN time): 1.0x means the layer costs
exactly its top_k active experts, anything above is dispatch overhead or wasted
expert FLOPs. The XLA FLOP ratio of the same pair is printed next to it, so that time
above 1x can be told apart into "XLA executes more FLOPs" and "the FLOPs run slower".

Part 2 is bench.mfu's: the benchmark VLM's train step (bench.config: CLIP-style ViT,
Qwen2-style MoE decoder, vision frozen, AdamW), its model FLOPs from the formula in
`bench.config.train_step_flops` checked against XLA's `cost_analysis()`, and its MFU
against a measured matmul peak of the same dtype (fp32 by default; `--dtype bfloat16`
for accelerators).

`--tiny` shrinks every shape so the whole run takes seconds (used by tests/test_bench.py).
Benchmarks print figures; they assert nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common, config, mfu  # noqa: E402
from bench.common import (compile_all, fmt_flops, fmt_time, interleaved_times, median,
                          paired_ratio, xla_flops)
from moe_vlm.models.config import MoEConfig
from moe_vlm.models.layers import MLP
from moe_vlm.models.moe import MoE
from moe_vlm.models.params import ParamCodec


# The benchmark model, its sizes (layer and train step) and the FLOP formula live in
# bench.config; re-exported here for the layer part and older callers.
Sizes, FULL, TINY = config.Sizes, config.FULL, config.TINY
vlm_config, train_step_flops = config.vlm_config, config.train_step_flops


# ------------------------------------------------------------------ part 1: the layer


class IdentityExperts(nnx.Module):
  """Stands in for `moe.Experts`: returns the dispatched tokens unchanged.

  With it the MoE layer runs router, top-k, slotting/sorting, scatter, gather and
  combine, but no expert FFN: its time is the router + dispatch overhead.
  """

  def __init__(self, num_experts: int):
    # The routing core takes the expert count from the config; `wo` only gives the
    # module a parameter (and an expert axis, for expert parallelism).
    self.wo = nnx.Param(jnp.zeros((num_experts, 1, 1), jnp.float32))

  def batched(self, x):
    return x

  def grouped(self, x, group_sizes, expert_of_row):
    del group_sizes, expert_of_row
    return x


@dataclasses.dataclass
class Candidate:
  """One module's forward and fwd+bwd programs: lowered first, compiled in a batch."""
  name: str
  lowered: list[Any]                 # [forward, fwd+bwd]
  args: list[tuple[Any, ...]]
  fwd: Optional[Callable[[], Any]] = None
  fwd_bwd: Optional[Callable[[], Any]] = None
  flops_fwd: Optional[float] = None
  flops_fwd_bwd: Optional[float] = None

  def set_compiled(self, compiled: Sequence[Any]) -> None:
    (f, g), (fa, ga) = compiled, self.args
    self.fwd, self.fwd_bwd = (lambda: f(*fa)), (lambda: g(*ga))
    self.flops_fwd, self.flops_fwd_bwd = xla_flops(f), xla_flops(g)


def _candidate(name: str, module: nnx.Module, call: Callable[[nnx.Module, jax.Array], jax.Array],
               x: jax.Array, ct: jax.Array, input_grad: bool = False) -> Candidate:
  """Lowered forward, and fwd+bwd: value and grad w.r.t. the params (and x with
  `input_grad`) of sum(y * ct).

  The value is returned with the gradient so y itself is computed, as in training
  where the next layer consumes it (with `jax.grad` alone XLA drops the dense FFN's
  last matmul: the loss is linear in y, so dL/dy = ct needs no y).
  """
  codec = ParamCodec(module)
  params = codec.flatten(module)

  def fwd(p, x):
    return call(codec.merge(p), x)

  def loss(p, x, ct):
    return jnp.sum(fwd(p, x) * ct)

  vg = jax.value_and_grad(loss, argnums=(0, 1) if input_grad else 0)
  return Candidate(name, [jax.jit(fwd).lower(params, x), jax.jit(vg).lower(params, x, ct)],
                   [(params, x), (params, x, ct)])


def _moe_cfg(s: Sizes, **kw) -> MoEConfig:
  return MoEConfig(num_experts=s.experts, top_k=s.top_k, **kw)


def _moe(s: Sizes, cfg: MoEConfig, seed: int = 0) -> MoE:
  return MoE(s.hidden, s.ffn, cfg, kind="gated", activation_name="silu", use_bias=False,
             rngs=nnx.Rngs(seed), dtype=s.dtype)


@dataclasses.dataclass
class LayerBench:
  cands: list[Candidate]
  variants: list[str]
  overhead: dict[str, str]      # variant -> name of its identity-experts candidate
  input_grad: bool
  # Variants whose XLA FLOP count is meaningless: cost_analysis counts a while loop's
  # body once, and the blocked gmm loops over row blocks.
  loop_flops: frozenset[str] = frozenset()

  def lowered(self) -> list[Any]:
    return [low for c in self.cands for low in c.lowered]

  def set_compiled(self, compiled: Sequence[Any]) -> None:
    for i, c in enumerate(self.cands):
      c.set_compiled(compiled[2 * i:2 * i + 2])


def prepare_layer(s: Sizes, out: Callable[[str], None], input_grad: bool = False) -> LayerBench:
  tokens = s.batch * s.seq
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((s.batch, s.seq, s.hidden)), s.dtype)
  ct = jnp.asarray(rng.standard_normal((s.batch, s.seq, s.hidden)), s.dtype)
  out(f"== MoE layer: tokens {s.batch}x{s.seq}={tokens}, hidden {s.hidden}, FFN {s.ffn} "
      f"(SwiGLU), {s.experts} experts top-{s.top_k}, {s.dtype}; fwd+bwd = value and grad of "
      f"sum(y*ct) w.r.t. {'params and input' if input_grad else 'params'}")

  dense = MLP(s.hidden, s.ffn, kind="gated", activation_name="silu", use_bias=False,
              rngs=nnx.Rngs(0), dtype=s.dtype)
  moe_call = lambda dispatch: (lambda m, x: m(x, train=True, dispatch=dispatch)[0])
  variants = [("moe_dropless", _moe_cfg(s, dispatch="dropless", gmm_impl="ragged_dot"),
               "dropless"),
              ("moe_dropless_blocked", _moe_cfg(s, dispatch="dropless", gmm_impl="blocked"),
               "dropless"),
              ("moe_capacity1.5", _moe_cfg(s, dispatch="capacity", capacity_factor=1.5),
               "capacity"),
              ("moe_capacity2.0", _moe_cfg(s, dispatch="capacity", capacity_factor=2.0),
               "capacity")]
  cands = [_candidate("dense", dense, lambda m, x: m(x), x, ct, input_grad)]
  for name, cfg, dispatch in variants:
    cands.append(_candidate(name, _moe(s, cfg), moe_call(dispatch), x, ct, input_grad))
  overhead = {}
  # Identity experts run no grouped matmul: one dropless line covers both gmm variants.
  for name, cfg, dispatch in (v for v in variants if v[0] in ("moe_dropless",
                                                              "moe_capacity1.5")):
    try:
      layer = _moe(s, cfg)
      layer.experts = IdentityExperts(s.experts)
      c = _candidate(f"router+dispatch[{name}]", layer, moe_call(dispatch), x, ct, input_grad)
      cands.append(c)
      overhead[name] = c.name
    except Exception as e:  # noqa: BLE001  (optional figure; the layer's API may move)
      out(f"router+dispatch overhead for {name}: n/a ({type(e).__name__}: {e})")
  return LayerBench(cands, [v[0] for v in variants], overhead, input_grad,
                    frozenset({"moe_dropless_blocked"}))


def run_layer(bench: LayerBench, s: Sizes, out: Callable[[str], None]) -> dict[str, float]:
  cands, variants, overhead = bench.cands, bench.variants, bench.overhead
  out("== MoE layer timings")
  thunks = {}
  for c in cands:
    thunks[(c.name, "fwd")] = c.fwd
    thunks[(c.name, "fwd+bwd")] = c.fwd_bwd
  times = interleaved_times(thunks, reps=s.reps, warmup=1)

  out(f"{'':34s} {'fwd':>12s} {'fwd+bwd':>12s}   XLA flops fwd / fwd+bwd")
  for c in cands:
    out(f"{c.name:34s} {fmt_time(median(times[(c.name, 'fwd')]))}  "
        f"{fmt_time(median(times[(c.name, 'fwd+bwd')]))}   "
        f"{fmt_flops(c.flops_fwd)} / {fmt_flops(c.flops_fwd_bwd)}")
  dense_flops = {"fwd": cands[0].flops_fwd, "fwd+bwd": cands[0].flops_fwd_bwd}
  by_name = {c.name: c for c in cands}

  results: dict[str, float] = {}
  out(f"ratio lines (median over {s.reps} interleaved rounds of MoE time / "
      f"(top_k x dense time); in brackets the ratio of the fastest samples and the "
      f"ratio of XLA-counted FLOPs):")
  for name in variants:
    for mode in ("fwd+bwd", "fwd"):
      r = paired_ratio(times[(name, mode)], times[("dense", mode)], s.top_k)
      results[f"{name}/{mode}"] = r
      c = by_name[name]
      mine = c.flops_fwd_bwd if mode == "fwd+bwd" else c.flops_fwd
      best = min(times[(name, mode)]) / (s.top_k * min(times[("dense", mode)]))
      flop_r = (f"; XLA flops {mine / (s.top_k * dense_flops[mode]):.2f}x"
                if mine and dense_flops[mode] else "")
      if name in bench.loop_flops:
        flop_r = "; XLA flops n/a: loop bodies counted once"
      out(f"{name}/(top_k*dense) {mode}: {r:.2f}x  [fastest/fastest {best:.2f}x{flop_r}]")
  for name, cname in overhead.items():
    for mode in ("fwd+bwd", "fwd"):
      share = paired_ratio(times[(cname, mode)], times[(name, mode)])
      vs_dense = paired_ratio(times[(cname, mode)], times[("dense", mode)], s.top_k)
      results[f"overhead[{name}]/{mode}"] = share
      out(f"router+dispatch share of {name} {mode}: {100 * share:.1f}% "
          f"(= {vs_dense:.2f}x of top_k*dense)")
  return results


# ------------------------------------------------------------- part 2: the train step
# The train step and its MFU are bench.mfu's (`prepare`, `run`); this script runs them
# after the layer part so one command gives both, as before.


# --------------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> dict:
  p = argparse.ArgumentParser(prog="python -m bench.moe_layer", description=__doc__.split("\n")[0])
  p.add_argument("--device-note", default="", help="free text describing the machine")
  p.add_argument("--tiny", action="store_true", help="tiny shapes: runs in seconds")
  p.add_argument("--reps", type=int, default=None, help="timed rounds for the layer part")
  p.add_argument("--step-reps", type=int, default=None, help="timed rounds for the step part")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype (parameters stay fp32); the matmul peak uses it too")
  p.add_argument("--input-grad", action="store_true",
                 help="layer fwd+bwd also differentiates w.r.t. the input (as in training)")
  p.add_argument("--step-dispatch", choices=("dropless", "capacity"), default="dropless",
                 help="MoE dispatch of the train step (capacity: factor 1.5)")
  p.add_argument("--skip-layer", action="store_true", help="only the train-step part")
  p.add_argument("--skip-step", action="store_true", help="only the layer part")
  args = p.parse_args(argv)
  s = TINY if args.tiny else FULL
  if args.reps:
    s = dataclasses.replace(s, reps=args.reps)
  if args.step_reps:
    s = dataclasses.replace(s, step_reps=args.step_reps)
  s = dataclasses.replace(s, dtype=args.dtype)
  common.print_header(out, "bench.moe_layer", args.tiny, args.device_note)
  t0 = time.perf_counter()
  layer = None if args.skip_layer else prepare_layer(s, out, args.input_grad)
  step = None if args.skip_step else mfu.prepare(s, out, args.step_dispatch)
  # Compile every program before timing anything, several at a time.
  lowered = (layer.lowered() if layer else []) + ([step.lowered] if step else [])
  t1 = time.perf_counter()
  compiled = compile_all(lowered)
  out(f"compile: {len(lowered)} programs in {time.perf_counter() - t1:.1f} s "
      f"(tracing and set-up before that: {t1 - t0:.1f} s)")
  results = {}
  if layer:
    layer.set_compiled(compiled[:len(layer.lowered())])
    results["layer"] = run_layer(layer, s, out)
  if step:
    step.set_compiled(compiled[-1])
    results["step"] = mfu.run(step, s, out)
  out(f"# total wall time {time.perf_counter() - t0:.1f} s")
  return results


if __name__ == "__main__":
  common.reexec_with_malloc_tunables("bench.moe_layer", sys.argv[1:])
  main(sys.argv[1:])
