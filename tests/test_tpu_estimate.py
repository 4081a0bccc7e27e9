"""launch/estimate.py: stage FLOPs against a hand computation, and the hours/cost
arithmetic of the README's TPU cost table."""

import dataclasses

import pytest

from configs import topologies
from launch import estimate
from moe_vlm import cost as cost_model

# MoE-LLaVA-Phi2 by hand, from the published config.json files (not from the code):
# Phi-2: hidden 2560, FFN 10240 (fc1, fc2), 32 layers, 32 heads x 80, vocab 51200;
# CLIP ViT-L/14-336: width 1024, MLP 4096, 24 layers, 577 positions (576 patches + CLS),
# features from layer -2 = 23 layers run; projector 1024->2560->2560; 576 image tokens.
D, F, L, V = 2560, 10240, 32, 51200
VD, VF, VRUN, NPOS, NPATCH = 1024, 4096, 23, 577, 576
MOE_LAYERS, E, K = 16, 4, 2  # every other layer, 4 experts, top-2
SEQ = 2048


def hand_flops(stage: int, batch: int) -> float:
  t, img = batch * SEQ, batch * NPATCH
  attn, ffn, head = 4 * D * D, 2 * D * F, D * V
  layer_scores = 4 * batch * SEQ ** 2 * D            # q k^T and p v of a layer, forward
  scores = 3 * L * layer_scores                      # forward + backward
  vision = (2 * batch * (VRUN * (4 * VD * VD + 2 * VD * VF) * NPOS + 14 * 14 * 3 * VD * NPATCH)
            + VRUN * 4 * batch * NPOS ** 2 * VD)     # frozen: forward only
  # A trained projector: its first matmul reads the frozen vision tower, so it needs no
  # input gradient (4x); the second one does (6x).
  proj = 4 * VD * D + 6 * D * D
  if stage == 1:    # projector trains; the frozen LLM still passes input gradients (4x)
    return 4 * t * (L * (attn + ffn) + head) + scores + proj * img + vision
  if stage == 2:    # projector + LLM train (6x)
    return 6 * t * (L * (attn + ffn) + head) + scores + proj * img + vision
  moe = K * ffn + D * E  # two active experts + the router, trained (6x)
  frozen = L * attn + (L - MOE_LAYERS) * ffn + head
  # Nothing trainable lies below layer 0 (an MoE layer): its frozen attention runs
  # forward only (no input gradient, no score backward), its router and its experts'
  # fc1 get no input gradient (fc2 does: fc1 trains).
  layer0 = 2 * t * attn + 2 * layer_scores + 2 * t * (D * E + K * D * F)
  return (4 * t * frozen + 6 * t * MOE_LAYERS * moe + scores - layer0
          + 2 * (VD * D + D * D) * img + vision)     # frozen projector: forward only


@pytest.mark.parametrize("stage,batch", [(1, 256), (2, 128), (3, 128)])
def test_stage_flops_match_a_hand_computation(stage, batch):
  train = {1: "projector", 2: "projector_llm", 3: "moe_layers"}[stage]
  cfg = estimate.stage_model_config("phi2", stage)
  assert cfg.num_image_tokens == NPATCH and len(cfg.text.moe_layers()) == (
      MOE_LAYERS if stage == 3 else 0)
  got = estimate.stage_step_flops(cfg, train, batch, SEQ)
  assert got == pytest.approx(hand_flops(stage, batch), rel=1e-12)
  # Stage 2 trains everything (what "projector_llm" trains): nothing skipped.
  everything = estimate.stage_step_flops(cfg, "projector_llm", batch, SEQ)
  assert (got == everything) == (stage == 2)


def test_matmul_weights_come_from_the_parameter_tree():
  cfg = estimate.stage_model_config("phi2", 3)
  w = cost_model.matmul_weights(cfg).active(K)
  per_token = L * 4 * D * D + (L - MOE_LAYERS) * 2 * D * F + MOE_LAYERS * (
      K * 2 * D * F + D * E) + D * V
  assert w["attention"] + w["ffn"] + w["lm_head"] == per_token
  assert w["projector"] == VD * D + D * D


def test_hours_and_cost_arithmetic():
  chip = {"v5e": dataclasses.replace(cost_model.CHIPS["v5e"], peak_flops=1e14,
                                     price_per_chip_hour=2.0)}
  t = topologies.get("v5e-16")
  # 3600 steps x 1e15 FLOPs on 16 chips x 1e14 FLOP/s x 50% = 4500 s = 1.25 h.
  hours, cost = estimate.stage_cost(1e15, 3600, t, 0.5, chip)
  assert hours == pytest.approx(1.25) and cost == pytest.approx(1.25 * 16 * 2.0)
  with pytest.raises(ValueError, match="mfu=0"):
    estimate.stage_cost(1e15, 1, t, 0, chip)


def test_estimate_rows_use_the_paper_recipe():
  rows = estimate.estimate(["phi2"], ["v4-8", "v5p-128"], mfu=0.4)
  assert [(r.stage, r.topology) for r in rows] == [
      (k, t) for k in (1, 2, 3) for t in ("v4-8", "v5p-128")]
  r = next(r for r in rows if r.stage == 2 and r.topology == "v5p-128")
  assert (r.steps, r.batch, r.chips) == (964_000 // 128, 128, 64)
  assert r.flops_per_step == pytest.approx(hand_flops(2, 128), rel=1e-12)
  hours = 7531 * hand_flops(2, 128) / (64 * 459e12 * 0.4) / 3600
  assert r.hours == pytest.approx(hours, rel=1e-12)
  assert r.cost == pytest.approx(hours * 64 * 4.20, rel=1e-12)
  # The same work on a v4-8: 64 x 459 / (4 x 275) times longer.
  r4 = next(r for r in rows if r.stage == 2 and r.topology == "v4-8")
  assert r4.hours / r.hours == pytest.approx(64 * 459 / (4 * 275))
  stage1 = next(r for r in rows if r.stage == 1)
  assert stage1.steps == 558_128 // 256 and stage1.batch == 256


def test_command_line_table_and_flag_errors():
  lines = []
  assert estimate.main(["--variants", "phi2", "--topologies", "v5litepod-16", "--mfu",
                        "0.5", "--price", "v5e=2"], out=lines.append) == 0
  text = "\n".join(lines)
  assert "MFU 50%" in text and "v5e 197 TFLOP/s $2.00/chip-hour" in text
  (row,) = [l for l in lines if l.startswith("| v5e-16 |")]
  cells = [c.strip() for c in row.strip("|").split("|")]
  per_step = {k: hand_flops(k, b) for k, b in ((1, 256), (2, 128), (3, 128))}
  steps = {1: 558_128 // 256, 2: 964_000 // 128, 3: 665_298 // 128}
  total_h = total_usd = 0.0
  for k in (1, 2, 3):
    h = steps[k] * per_step[k] / (16 * 197e12 * 0.5) / 3600
    total_h, total_usd = total_h + h, total_usd + h * 16 * 2.0
    assert cells[1 + k] == f"{h:.1f} h ${h * 16 * 2.0:,.0f}"
  assert cells[:2] == ["v5e-16", "16"] and cells[5] == f"{total_h:.1f} h ${total_usd:,.0f}"
  assert f"stage 2 7531 steps x 128 x {per_step[2] / 1e15:.1f} PFLOP" in text
  for bad in (["--mfu", "0"], ["--mfu", "1.5"], ["--variants", "llama70b"],
              ["--topologies", "v5litepod-32"], ["--price", "v9=1"]):
    with pytest.raises(SystemExit) as e:
      estimate.main(bad, out=lambda _: None)
    assert e.value.code == 2, bad
