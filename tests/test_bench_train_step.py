"""The train-step and MFU benchmarks run end to end (tiny shapes) and print their figures.

Benchmarks are not tests: only that the ratio and MFU lines carry finite positive
numbers, and that JAX and PyTorch start from the same loss, are checked, never a
timing threshold.
"""

import dataclasses
import math
import re

import pytest

from bench import common, config, mfu
from bench import profile as bench_profile
from bench import train_step as bench_train_step
from tests.printed import positive

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

RATIO = re.compile(r"^train_step tokens/s: jax (\S+), torch (\S+); jax/torch = (\S+) x\b")
LOSS = re.compile(r"^initial loss: jax CE (\S+) .*; torch CE (\S+) .*: match$")
CEILING = re.compile(r"^ratio ceiling \(.*\): (\S+) x torch$")
THREADS = re.compile(r"^threads: jax/XLA:CPU (\d+) .*, torch (\d+) ")
MFU = re.compile(r"^MFU vs measured matmul peak: (\S+)%$")
PEAK = re.compile(r"^matmul peak .*: median (\S+) GFLOP/s")
HEAD = re.compile(r"^jax LM head \+ loss on (\d+) of (\d+) positions per row .* (\d+) targets "
                  r"per row\); transformers on all (\d+)$")
COMPACT = re.compile(r"^our LM head skips (\S+) of those (\S+) GFLOP .*: ceiling for our step "
                     r"(\S+) x torch$")
HEAD_RATIO = re.compile(r"^compact/full LM head \(ours, same rounds\): (\S+) x; full head/torch "
                        r"= (\S+) x$")
XLA = re.compile(r"^XLA cost_analysis flops: (\S+) GFLOP; formula / XLA = (\S+)$")


def test_tiny_train_step_benchmark_prints_ratio_and_checks_initial_loss():
  lines = []
  # One torch thread: on a loaded 2-core machine torch's intra-op threads wait on each
  # other for every small op, which makes the test slow (see BENCHMARKS.md).
  results = bench_train_step.main(["--tiny", "--torch-threads", "1", "--device-note", "pytest",
                                   "--full-head-side"], out=lines.append)
  text = "\n".join(lines)
  ratio = [m for m in map(RATIO.match, lines) if m]
  assert len(ratio) == 1, text
  jax_rate, torch_rate, r = (positive(x) for x in ratio[0].groups())
  threads = [m for m in map(THREADS.match, lines) if m]
  assert len(threads) == 1 and int(threads[0].group(2)) == 1, text
  # The same model and batch on both sides: the initial losses agree (an assertion of
  # the script, reported in its results).
  check = results["loss_check"]
  assert check["match"] and check["tol"] == 1e-3, check
  assert abs(check["jax_ce"] - check["torch_ce"]) <= 1e-3, check
  assert abs(check["jax_total"] - check["torch_total"]) <= 1e-3, check
  # Random init: CE is near ln(vocab), the balanced aux loss near 1 per MoE layer.
  vocab = config.TINY.vocab
  assert abs(check["jax_ce"] - math.log(vocab)) < 1.0, check
  assert 0.5 < check["jax_aux"] < 2.0 * len(config.vlm_config(config.TINY).text.moe_layers())
  assert len([m for m in map(LOSS.match, lines) if m]) == 1, text
  # The same figures come back as data.
  ceiling = [positive(m.group(1)) for m in map(CEILING.match, lines) if m]
  assert len(ceiling) == 1, text
  c = results["ceiling"]
  assert math.isclose(c["ratio_ceiling"], ceiling[0], rel_tol=0.01)
  assert math.isclose(c["ratio_ceiling"],
                      c["best_matmul_flops_per_s"] / c["torch_model_flops_per_s"], rel_tol=1e-9)
  assert math.isclose(c["torch_model_flops_per_s"], c["model_flops"] * torch_rate
                      / (config.TINY.batch * config.TINY.seq), rel_tol=0.02)
  assert math.isclose(results["ratio"], r, rel_tol=0.01)
  # Default turns: 1 untimed switch-in step, then 2 timed steps, per side and round.
  reps = config.TINY.step_reps
  sides = ("jax", "torch", "jax_full_head")
  assert {k: len(v) for k, v in results["times"].items()} == {k: 2 * reps for k in sides}
  assert {k: len(v) for k, v in results["switch_in_times"].items()} == {k: reps for k in sides}
  assert math.isclose(results["tokens_per_s"]["jax"], jax_rate, rel_tol=0.01)
  assert math.isclose(results["tokens_per_s"]["torch"], torch_rate, rel_tol=0.01)
  # Our LM head ran only on the target positions (rounded up to 8), torch's on all.
  head = [m.groups() for m in map(HEAD.match, lines) if m]
  assert len(head) == 1, text
  rows, seq, targets, torch_rows = map(int, head[0])
  assert seq == torch_rows == config.TINY.seq and targets < rows < seq and rows % 8 == 0
  head_ratio = [m for m in map(HEAD_RATIO.match, lines) if m]
  assert len(head_ratio) == 1, text
  assert results["head"] == {"rows": rows, "targets_per_row": targets, "full": False,
                             "compact_over_full": pytest.approx(positive(head_ratio[0].group(1)),
                                                                rel=0.01)}
  assert "jax ran the compact LM head" in text
  compact = [m.groups() for m in map(COMPACT.match, lines) if m]
  assert len(compact) == 1, text
  skipped, total, compact_ceiling = map(positive, compact[0])
  t = config.vlm_config(config.TINY).text
  assert math.isclose(skipped * 1e9, 6.0 * t.hidden_size * t.vocab_size * config.TINY.batch
                      * (seq - rows), rel_tol=0.01)
  assert math.isclose(compact_ceiling, c["ratio_ceiling"] * total / (total - skipped),
                      rel_tol=0.02)


def test_interleaved_turns_settle_untimed_then_time_back_to_back():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
  settled: dict = {}
  times = common.interleaved_times(fns, reps=2, warmup=0, per_round={"a": 2, "b": 1},
                                   settle=1, settle_times=settled)
  # Round 0 in order, round 1 reversed; each turn: 1 settle call, then the timed ones.
  assert calls == ["a", "a", "a", "b", "b", "b", "b", "a", "a", "a"]
  assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 2}
  assert {k: len(v) for k, v in settled.items()} == {"a": 2, "b": 2}


def test_loss_check_rejects_different_losses():
  ok = bench_train_step.loss_check(5.0, 1.0, 5.0004, 1.0, 0.01, 1e-3)
  assert ok["match"]
  bad_ce = bench_train_step.loss_check(5.0, 1.0, 5.01, 1.0, 0.01, 1e-3)
  bad_aux = bench_train_step.loss_check(5.0, 1.0, 5.0, 1.5, 0.01, 1e-3)
  assert not bad_ce["match"] and not bad_aux["match"]
  assert math.isclose(bad_aux["max_abs_diff"], 0.005)


def test_tiny_mfu_benchmark_prints_mfu_peak_and_xla_check():
  lines = []
  results = mfu.main(["--tiny", "--device-note", "pytest"], out=lines.append)
  text = "\n".join(lines)
  got = [positive(m.group(1)) for m in map(MFU.match, lines) if m]
  assert len(got) == 1, text
  peak = [positive(m.group(1)) for m in map(PEAK.match, lines) if m]
  assert len(peak) == 1, text
  xla = [m for m in map(XLA.match, lines) if m]
  assert len(xla) == 1, text
  xla_gflop, formula_over_xla = positive(xla[0].group(1)), positive(xla[0].group(2))
  assert math.isclose(results["xla_flops"] / 1e9, xla_gflop, abs_tol=0.006)
  cfg = config.vlm_config(config.TINY)
  f = config.train_step_flops(cfg, config.TINY.batch, config.TINY.seq)
  # With the expert FLOPs XLA executes beyond the active ones (dense ragged_dot) or
  # does not count (blocked gmm's loops), and the attention pairs the causal blocks
  # skip, the formula agrees closely with XLA (the remainder is element-wise work the
  # formula leaves out).
  xla_flops = results["xla_flops"] + f["xla_uncounted"]
  executed = f["model"] + f["expert_extra"] - f["causal_skip"]
  assert f["causal_skip"] > 0
  assert 0.9 < executed / xla_flops <= 1.0
  assert math.isclose(results["executed_over_xla"], executed / xla_flops, rel_tol=1e-9)
  assert math.isclose(formula_over_xla, f["model"] / results["xla_flops"], abs_tol=0.0006)
  assert math.isclose(results["mfu"] * 100, got[0], abs_tol=0.06)
  assert math.isclose(results["peak_flops"] / 1e9, peak[0], rel_tol=0.01)
  assert results["model_flops"] == f["model"]


def test_flop_formula_adds_back_what_xla_does_not_count_in_the_blocked_gmm():
  cfg = config.vlm_config(config.TINY)
  t = cfg.text
  moe = dataclasses.replace(t.moe, gmm_impl="blocked", gmm_block_size=8)
  f = config.train_step_flops(dataclasses.replace(cfg, text=dataclasses.replace(t, moe=moe)),
                              config.TINY.batch, config.TINY.seq)
  rows = t.moe.top_k * config.TINY.batch * config.TINY.seq  # 128 routed rows per layer
  # XLA sees one 8-row block of each expert matmul (forward and both backward products).
  per_row = 6 * 3 * t.hidden_size * t.intermediate_size
  assert f["xla_uncounted"] == len(t.moe_layers()) * (rows - 8) * per_row
  assert f["expert_extra"] == 0


KIND = re.compile(r"^kind (.+?)\s+(\S+) ms\s+(\S+)%$")


def test_profile_kinds_follow_the_hlo_opcode():
  hlo = """
  %ynn_fusion.3 = f32[128,1408]{1,0} fusion(f32[128,512]{1,0} %a, f32[512,1408]{1,0} %b), kind=kCustom
  %copy_bitcast_fusion.4 = f32[1408,2048]{1,0} fusion(%x), kind=kLoop, calls=%c
  %transpose.2 = f32[3,2]{0,1} transpose(f32[2,3]{1,0} %t), dimensions={1,0}
  ROOT %dot.5 = f32[2,2]{1,0} dot(f32[2,3]{1,0} %p, f32[3,2]{1,0} %q)
  %while.7 = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  %add_divide_fusion = f32[8]{0} fusion(%u, %v), kind=kLoop, calls=%d
  %scatter.1 = f32[8]{0} scatter(%o, %i, %w), update_computation=%s
  """
  ops = bench_profile.hlo_ops(hlo)
  assert ops["dot.5"] == bench_profile.HloOp("dot", "f32[2,2]")
  assert ops["transpose.2"].opcode == "transpose"
  kinds = {name: bench_profile.kind_of(name, op) for name, op in ops.items()}
  assert kinds == {"ynn_fusion.3": "dot (YNNPACK)", "copy_bitcast_fusion.4": "copy / transpose",
                   "transpose.2": "copy / transpose", "dot.5": "dot (XLA/Eigen)",
                   "while.7": "while loop", "add_divide_fusion": "fused loop",
                   "scatter.1": "other"}


def test_tiny_profile_prints_where_the_step_time_goes():
  lines = []
  results = bench_profile.main(["--tiny", "--top", "4"], out=lines.append)
  text = "\n".join(lines)
  kinds = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
           for m in map(KIND.match, lines) if m}
  assert kinds and math.isclose(sum(p for _, p in kinds.values()), 100.0, abs_tol=0.6), text
  assert any(k.startswith("dot") and ms > 0 for k, (ms, _) in kinds.items()), text
  assert math.isclose(results["total_s"], sum(results["per_kind_s"].values()), rel_tol=1e-9)
  # Kinds sum the listed ops; the slowest four are printed with their kind.
  assert math.isclose(results["total_s"], sum(t for t, _, _ in results["slowest"]),
                      rel_tol=1e-9)
  listed = [line for line in lines if re.match(r"^\s+\S+ ms x\d+ ", line)]
  assert len(listed) == 4 and positive(results["wall_s"]), text
  assert results["host_s"] >= 0
