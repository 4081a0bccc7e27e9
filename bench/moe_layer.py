"""MoE layer cost vs the dense FFN, and the train step's model-FLOPs utilisation.

    python -m bench.moe_layer [--device-note TEXT] [--tiny] [--reps N] [--step-reps N]

Part 1 times one MoE FFN layer (jit-compiled, warmed up, median of interleaved rounds,
`block_until_ready` on every call) against the dense FFN (`MLP`) on the same tokens:

- forward alone, and forward + backward = grad w.r.t. the parameters of sum(y * ct);
- the dropless path (sort + ragged_dot) and the capacity path at factors 1.5 and 2.0
  (train=True, whole batch one routing group, as MoE-LLaVA's defaults);
- the router + dispatch alone: the same layer with the experts replaced by identity.

Each `ratio line` is  MoE time / (top_k x dense FFN time): 1.0x means the layer costs
exactly its top_k active experts, anything above is dispatch overhead or wasted
expert FLOPs. The XLA FLOP ratio of the same pair is printed next to it, so that time
above 1x can be told apart into "XLA executes more FLOPs" and "the FLOPs run slower".

Part 2 builds a small VLM train step (CLIP-style ViT, Qwen2-style MoE decoder, vision
frozen, AdamW), counts its model FLOPs with the formula in `train_step_flops`, checks
it against XLA's `cost_analysis()`, and reports MFU against a measured matmul peak of
the same dtype (fp32 by default; `--dtype bfloat16` for accelerators).

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

from bench import common  # noqa: E402
from bench.common import (compile_all, fmt_flops, fmt_time, interleaved_times, matmul_peak,
                          median, paired_ratio, xla_flops)
from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig
from moe_vlm.models.layers import MLP
from moe_vlm.models.moe import MoE
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import step as step_lib
from moe_vlm.train.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class Sizes:
  # MoE layer benchmark
  hidden: int
  ffn: int
  experts: int
  top_k: int
  batch: int
  seq: int
  # train step: vision tower
  image_size: int
  patch_size: int
  vis_hidden: int
  vis_ffn: int
  vis_layers: int
  vis_heads: int
  # train step: decoder (hidden/ffn/experts/top_k/batch/seq shared with the layer)
  text_layers: int
  heads: int
  kv_heads: int
  vocab: int
  # matmul peak: [n, n] @ [n, n]
  matmul_n: int
  reps: int
  step_reps: int
  # compute dtype of activations and matmuls (parameters stay fp32, the router fp32)
  dtype: str = "float32"


FULL = Sizes(hidden=512, ffn=1408, experts=4, top_k=2, batch=8, seq=256,
             image_size=112, patch_size=14, vis_hidden=256, vis_ffn=1024, vis_layers=4,
             vis_heads=4, text_layers=8, heads=8, kv_heads=4, vocab=8000,
             matmul_n=2048, reps=5, step_reps=3)
TINY = Sizes(hidden=64, ffn=128, experts=4, top_k=2, batch=2, seq=32,
             image_size=28, patch_size=14, vis_hidden=32, vis_ffn=64, vis_layers=2,
             vis_heads=4, text_layers=2, heads=4, kv_heads=2, vocab=256,
             matmul_n=256, reps=2, step_reps=2)


# ------------------------------------------------------------------ part 1: the layer


class IdentityExperts(nnx.Module):
  """Stands in for `moe.Experts`: returns the dispatched tokens unchanged.

  With it the MoE layer runs router, top-k, slotting/sorting, scatter, gather and
  combine, but no expert FFN: its time is the router + dispatch overhead.
  """

  def __init__(self, num_experts: int):
    # Only `wo.shape[0]` (the expert count) is read by the dispatch functions.
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
  variants = [("moe_dropless", _moe_cfg(s, dispatch="dropless"), "dropless"),
              ("moe_capacity1.5", _moe_cfg(s, dispatch="capacity", capacity_factor=1.5),
               "capacity"),
              ("moe_capacity2.0", _moe_cfg(s, dispatch="capacity", capacity_factor=2.0),
               "capacity")]
  cands = [_candidate("dense", dense, lambda m, x: m(x), x, ct, input_grad)]
  for name, cfg, dispatch in variants:
    cands.append(_candidate(name, _moe(s, cfg), moe_call(dispatch), x, ct, input_grad))
  overhead = {}
  for name, cfg, dispatch in variants[:2]:
    try:
      layer = _moe(s, cfg)
      layer.experts = IdentityExperts(s.experts)
      c = _candidate(f"router+dispatch[{name}]", layer, moe_call(dispatch), x, ct, input_grad)
      cands.append(c)
      overhead[name] = c.name
    except Exception as e:  # noqa: BLE001  (optional figure; the layer's API may move)
      out(f"router+dispatch overhead for {name}: n/a ({type(e).__name__}: {e})")
  return LayerBench(cands, [v[0] for v in variants], overhead, input_grad)


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


def vlm_config(s: Sizes, dispatch: str = "dropless") -> VLMConfig:
  vision = VisionConfig(variant="clip", image_size=s.image_size, patch_size=s.patch_size,
                        hidden_size=s.vis_hidden, intermediate_size=s.vis_ffn,
                        num_layers=s.vis_layers, num_heads=s.vis_heads, dtype=s.dtype)
  text = TextConfig(family="qwen2", vocab_size=s.vocab, hidden_size=s.hidden,
                    intermediate_size=s.ffn, num_layers=s.text_layers, num_heads=s.heads,
                    num_kv_heads=s.kv_heads, qkv_bias=True, rope_theta=1e6, dtype=s.dtype,
                    moe=_moe_cfg(s, dispatch=dispatch, moe_mode="sparse"))
  return VLMConfig(vision=vision, text=text, projector="mlp2x_gelu",
                   image_token_id=s.vocab - 1)


def train_step_flops(cfg: VLMConfig, batch: int, seq: int) -> dict[str, float]:
  """Model FLOPs of one train step (useful work: what an ideal implementation must do).

  - matmul FLOPs only (2 per multiply-add); bias adds, norms, softmax, activations,
    the embedding gather, the loss and the optimizer are left out (each < 1%);
  - trainable parts (decoder, lm_head, projector): 6 x matmul weights x tokens
    (forward 2, backward 4); the MoE FFN counts its top_k active experts + the router;
  - attention scores and weighted values (q k^T and p v): 4 x L^2 x H x head_dim per
    sequence per layer forward, the full L x L matrix (the implementation computes it
    all; causal masking skips nothing), x3 with the backward;
  - frozen vision tower: forward only (2 x weights x tokens + its attention), and only
    the layers up to `vision_feature_layer` (-2 skips the last one); no backward runs
    through it because neither its weights nor the pixels need a gradient.
  """
  t, v = cfg.text, cfg.vision
  # decoder: attention projections q, o (H*hd) and k, v (KV*hd)
  hd, d = t.dim_per_head, t.hidden_size
  tokens = batch * seq
  attn_w = d * t.num_heads * hd * 2 + d * t.num_kv_heads * hd * 2
  ffn_mult = 3 if t.mlp == "gated" else 2
  dense_ffn_w = ffn_mult * d * t.intermediate_size
  n_moe = len(t.moe_layers())
  expert_ffn_w = ffn_mult * d * ((t.moe.expert_intermediate_size or t.intermediate_size)
                                 if t.moe else 0)
  moe_active_w = (t.moe.top_k * expert_ffn_w + d * t.moe.num_experts) if t.moe else 0
  decoder_w = t.num_layers * attn_w + (t.num_layers - n_moe) * dense_ffn_w + n_moe * moe_active_w
  head_w = d * t.vocab_size
  out = {
      "decoder matmuls (6*W*T)": 6.0 * decoder_w * tokens,
      "lm_head (6*W*T)": 6.0 * head_w * tokens,
      "decoder attention scores (3*4*B*L^2*H*hd)":
          3.0 * t.num_layers * 4 * batch * seq * seq * t.num_heads * hd,
  }
  # projector (trainable; runs on the image tokens)
  proj_w = v.hidden_size * d + (d * d if cfg.projector == "mlp2x_gelu" else 0)
  out["projector (6*W*T_img)"] = 6.0 * proj_w * batch * cfg.num_image_tokens
  # frozen vision tower, forward only
  vd, n_pos = v.hidden_size, v.num_positions
  layers_run = cfg.vision_feature_layer % (v.num_layers + 1)
  vis_layer_w = 4 * vd * vd + 2 * vd * v.intermediate_size
  patch_w = v.patch_size * v.patch_size * v.num_channels * vd
  out["vision forward, frozen (2*W*T + attn)"] = (
      2.0 * batch * (layers_run * vis_layer_w * n_pos + patch_w * v.num_patches)
      + layers_run * 4.0 * batch * n_pos * n_pos * vd)
  out["total"] = sum(out.values())
  # What XLA executes on top of that in the expert FFNs ("executed rows" x FFN weights):
  # - dropless: ragged_dot has no XLA:CPU kernel and is lowered densely (jax
  #   `_ragged_dot_general_impl`): each of the k*T sorted rows meets all E experts'
  #   weights under a mask, E x the useful FLOPs, forward and backward alike (TPU
  #   lowers it to a grouped matmul and executes ~1 x);
  # - capacity: every slot of the [E, C] buffers is computed, filled or not:
  #   E * C * groups rows instead of k*T, about capacity_factor x.
  if t.moe:
    if t.moe.dispatch == "dropless":
      rows = t.moe.num_experts * t.moe.top_k * tokens
    else:
      group = t.moe.group_size or batch
      cap = t.moe.capacity(group * seq, train=True)
      rows = t.moe.num_experts * cap * (batch // group)
    out["executed_extra"] = 6.0 * n_moe * (rows - t.moe.top_k * tokens) * expert_ffn_w
  return out


def _train_batch(cfg: VLMConfig, batch: int, seq: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.image_token_id, (batch, seq))
  n_img = cfg.num_image_tokens
  ids[:, 1:1 + n_img] = cfg.image_token_id  # every row has one image after a BOS
  mask = np.ones((batch, seq), np.int32)
  loss_mask = np.zeros((batch, seq), np.int32)
  loss_mask[:, 1 + n_img + seq // 8:] = 1  # the answer part of the conversation
  v = cfg.vision
  pixels = rng.standard_normal((batch, v.image_size, v.image_size, v.num_channels))
  return dict(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask),
              loss_mask=jnp.asarray(loss_mask), pixel_values=jnp.asarray(pixels, jnp.float32))


class _Stepper:
  """Calls the compiled (state-donating) step, carrying the state from call to call."""

  def __init__(self, compiled, state, batch):
    self.compiled, self.state, self.batch = compiled, state, batch

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics


@dataclasses.dataclass
class StepBench:
  cfg: VLMConfig
  dispatch: str
  lowered: Any
  state: Any
  batch: dict[str, jax.Array]
  compiled: Any = None


def prepare_step(s: Sizes, out: Callable[[str], None], dispatch: str = "dropless") -> StepBench:
  cfg = vlm_config(s, dispatch)
  b, l = s.batch, s.seq
  t, v = cfg.text, cfg.vision
  moe_desc = (f"dispatch {dispatch}" if dispatch == "dropless" else
              f"dispatch capacity (factor {t.moe.capacity_factor})")
  out(f"== Train step: ViT {v.num_layers}L d{v.hidden_size} {v.num_heads}h MLP "
      f"{v.intermediate_size}, {v.image_size}px/{v.patch_size}px -> {cfg.num_image_tokens} "
      f"image tokens (frozen); Qwen2-style {t.num_layers}L d{t.hidden_size} "
      f"{t.num_heads}q/{t.num_kv_heads}kv FFN {t.intermediate_size}, {t.moe.num_experts} "
      f"experts top-{t.moe.top_k} on layers {list(t.moe_layers())}, vocab {t.vocab_size}; "
      f"batch {b}x{l}; {s.dtype}; {moe_desc}; AdamW; 1-device mesh")
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  params = codec.flatten(model)
  del model
  trainable = lambda name: not name.startswith("vision.")
  n_train = sum(int(np.prod(p.shape)) for k, p in params.items() if trainable(k))
  n_all = sum(int(np.prod(p.shape)) for p in params.values())
  out(f"params: {n_all / 1e6:.2f} M total, {n_train / 1e6:.2f} M trainable")
  mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, (1, 1, 1, 1))), jax.devices()[:1])
  step_cfg = step_lib.StepConfig(optim=OptimConfig(learning_rate=1e-4, total_steps=1000))
  tx = step_lib.make_optimizer(step_cfg.optim)
  shardings = step_lib.state_shardings(codec, trainable, mesh, tx)
  state = step_lib.init_state(params, trainable, tx, shardings)
  batch = _train_batch(cfg, b, l)
  fn = step_lib.jit_train_step(step_lib.make_train_step(codec, step_cfg, tx), mesh, shardings,
                               batch)
  return StepBench(cfg, dispatch, fn.lower(state, batch), state, batch)


def run_step(bench: StepBench, s: Sizes, out: Callable[[str], None]) -> dict[str, float]:
  cfg, dispatch, compiled = bench.cfg, bench.dispatch, bench.compiled
  b, l = s.batch, s.seq
  out(f"== Train step ({dispatch})")
  xla = xla_flops(compiled)
  stepper = _Stepper(compiled, bench.state, bench.batch)
  bench.state = None  # donated to the step from here on

  # Peak and step side by side: 3 matmuls next to every step, in alternating order.
  mm, mm_flops = matmul_peak(s.matmul_n, jnp.dtype(s.dtype))
  times = interleaved_times({"matmul": mm, "step": stepper}, reps=s.step_reps, warmup=1,
                            per_round={"matmul": 3})
  t_step, t_mm = median(times["step"]), median(times["matmul"])
  peak = mm_flops / t_mm
  best_peak = mm_flops / min(times["matmul"])

  f = train_step_flops(cfg, b, l)
  model_flops = f["total"]
  out("model FLOPs per step (formula, see train_step_flops):")
  for k, val in f.items():
    if k not in ("total", "executed_extra"):
      out(f"  {k:44s} {val / 1e9:10.2f} GFLOP")
  out(f"  {'total':44s} {model_flops / 1e9:10.2f} GFLOP")
  results = {"model_flops": model_flops, "step_s": t_step, "peak_flops": peak}
  if xla:
    out(f"XLA cost_analysis flops: {xla / 1e9:.2f} GFLOP; formula / XLA = "
        f"{model_flops / xla:.3f}")
    extra = f.get("executed_extra", 0.0)
    if extra:
      why = ("ragged_dot lowered densely on CPU: every row x all E experts"
             if dispatch == "dropless" else "empty capacity slots computed")
      out(f"formula + expert FLOPs XLA executes beyond the active ones ({why}: "
          f"{extra / 1e9:.2f} GFLOP) = {(model_flops + extra) / 1e9:.2f} GFLOP; that / XLA = "
          f"{(model_flops + extra) / xla:.3f}")
    results["xla_flops"] = xla
  out(f"step time: median {fmt_time(t_step)} over {s.step_reps} (min "
      f"{fmt_time(min(times['step']))}); {model_flops / t_step / 1e9:.2f} model GFLOP/s")
  out(f"matmul peak ({s.matmul_n}^3 {s.dtype}, jit, {len(times['matmul'])} samples): median "
      f"{peak / 1e9:.2f} GFLOP/s (best {best_peak / 1e9:.2f})")
  mfu = model_flops / t_step / peak
  results["mfu"] = mfu
  if xla:
    out(f"XLA-FLOP utilisation vs measured matmul peak: {100 * xla / t_step / peak:.1f}%")
  # On a shared machine both medians carry load noise, unevenly (a long step vs short
  # matmuls); the best samples of each are the least disturbed estimate.
  out(f"MFU from the best samples (fastest step vs fastest matmul): "
      f"{100 * model_flops / min(times['step']) / best_peak:.1f}%")
  out(f"MFU vs measured matmul peak: {100 * mfu:.1f}%")
  return results


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
  step = None if args.skip_step else prepare_step(s, out, args.step_dispatch)
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
    step.compiled, step.lowered = compiled[-1], None
    results["step"] = run_step(step, s, out)
  out(f"# total wall time {time.perf_counter() - t0:.1f} s")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
