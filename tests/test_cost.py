"""moe_vlm/cost.py: parameter counts against an initialised model, train-step FLOPs
against a hand computation and against the matmuls of the lowered step."""

import math
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

from moe_vlm import cost
from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import preflight

# A tiny VLM by hand (not from the code): CLIP-style ViT, 28 px in 14 px patches = 4
# patches + CLS = 5 positions, width 32, MLP 64, 2 layers of which features of layer -2
# use 1; projector 32 -> 64 -> 64 on 4 image tokens (CLS dropped); Llama-style decoder,
# 2 layers, width 64, 4 query heads and 2 KV heads of 16, gated FFN 128, vocab 256;
# the MoE variant: 4 experts top-2 in layer 0 (the "sparse" mode's every other layer).
B, S = 2, 32
VD, VF, VRUN, NPOS, NPATCH = 32, 64, 1, 5, 4
D, F, NL, H, KV, HD, V = 64, 128, 2, 4, 2, 16, 256
E, K = 4, 2
T, IMG = B * S, B * NPATCH
ATTN_IN, ATTN_OUT = D * H * HD + 2 * D * KV * HD, H * HD * D   # q, k, v | o
FFN_IN, FFN_OUT = 2 * D * F, F * D                             # gate, up | down
PROJ1, PROJ2, HEAD, ROUTER = VD * D, D * D, D * V, D * E
SCORES = 4 * B * S * S * H * HD  # q k^T and p v of one layer, forward
VISION = (2 * B * (VRUN * (4 * VD * VD + 2 * VD * VF) * NPOS + 14 * 14 * 3 * VD * NPATCH)
          + VRUN * 4 * B * NPOS ** 2 * VD)                     # frozen: forward only


def tiny(moe: bool = False, **text) -> VLMConfig:
  vision = VisionConfig(variant="clip", image_size=28, patch_size=14, hidden_size=VD,
                        intermediate_size=VF, num_layers=2, num_heads=4)
  text = dict(dict(num_layers=NL), **text)
  t = TextConfig(family="llama", vocab_size=V, hidden_size=D, intermediate_size=F,
                 num_heads=H, num_kv_heads=KV,
                 moe=MoEConfig(num_experts=E, top_k=K) if moe else None, **text)
  return VLMConfig(vision=vision, text=t, image_token_id=V - 1)


def hand_flops(stage: int, moe: bool) -> float:
  """Model FLOPs by hand: 2 per multiply-add; forward 2WT, input gradient 2WT where
  something below trains, weight gradient 2WT where the weight trains."""
  if stage == 2:    # projector + LLM train: 6x everywhere but the projector's first matmul
    proj = 4 * PROJ1 + 6 * PROJ2
    ffn0 = 6 * (ROUTER + K * (FFN_IN + FFN_OUT)) if moe else 6 * (FFN_IN + FFN_OUT)
    return (VISION + IMG * proj + T * (6 * NL * (ATTN_IN + ATTN_OUT) + ffn0
                                       + 6 * (FFN_IN + FFN_OUT) + 6 * HEAD) + 3 * NL * SCORES)
  if stage == 1:    # the projector trains; the frozen LLM passes input gradients (4x)
    proj = 4 * PROJ1 + 6 * PROJ2
    ffn0 = 4 * (ROUTER + K * (FFN_IN + FFN_OUT)) if moe else 4 * (FFN_IN + FFN_OUT)
    return (VISION + IMG * proj + T * (4 * NL * (ATTN_IN + ATTN_OUT) + ffn0
                                       + 4 * (FFN_IN + FFN_OUT) + 4 * HEAD) + 3 * NL * SCORES)
  # Stage 3: experts and routers train. Nothing below layer 0 trains: its attention runs
  # forward only, its router and the experts' gate/up get no input gradient (4x), but
  # the experts' down projection does (6x: gate/up need the gradient). Above, all
  # frozen weights pass input gradients (4x).
  layer0 = 2 * (ATTN_IN + ATTN_OUT) + 4 * ROUTER + K * (4 * FFN_IN + 6 * FFN_OUT)
  layer1 = 4 * (ATTN_IN + ATTN_OUT) + 4 * (FFN_IN + FFN_OUT)
  return (VISION + IMG * 2 * (PROJ1 + PROJ2) + T * (layer0 + layer1 + 4 * HEAD)
          + SCORES + 3 * SCORES)


@pytest.mark.parametrize("stage,moe", [(1, False), (2, False), (1, True), (2, True),
                                       (3, True)])
def test_train_step_flops_match_a_hand_computation(stage, moe):
  f = cost.train_step_flops(tiny(moe), cost.STAGE_TRAIN[stage], B, S)
  assert f["model"] == hand_flops(stage, moe)
  assert f["model"] == sum(f[k] for k in cost.MODEL_PARTS)
  assert f["vision"] == VISION and f["tokens"] == T
  assert f["attention_scores"] == (3 * NL if stage < 3 else 3 * NL - 2) * SCORES


def test_head_fraction_runs_the_lm_head_on_its_positions_only():
  full = cost.train_step_flops(tiny(), "projector_llm", B, S)
  compact = cost.train_step_flops(tiny(), "projector_llm", B, S, head_fraction=0.2)
  rows = 8  # ceil(0.2 x 32) = 7 positions, rounded up to a multiple of 8
  assert full["lm_head"] - compact["lm_head"] == 6 * HEAD * B * (S - rows)
  assert cost.train_step_flops(tiny(), "projector_llm", B, S, head_fraction=1.0) == full


def test_executed_flops_add_capacity_slots_and_remat_and_drop_causal_pairs():
  cfg = tiny(True, remat="full", attention_causal_blocks=2)
  f = cost.train_step_flops(cfg, "projector_llm", B, S)
  # Capacity 1.5: ceil(64 / 4 x 1.5 x 2) = 48 slots x 4 experts = 192 rows for 128 routed.
  rows = E * math.ceil(T / E * 1.5 * K)
  assert f["expert_extra"] == 6 * (rows - K * T) * (FFN_IN + FFN_OUT)
  # Causal blocks of 16 queries: 16 x 16 + 16 x 32 of the 32 x 32 pairs, every pass.
  pairs = 16 * 16 + 16 * 32
  assert f["causal_skip"] == 3 * NL * SCORES * (S * S - pairs) / (S * S)
  # Full remat runs every decoder block's forward again (executed rows, causal pairs).
  again = (NL * (ATTN_IN + ATTN_OUT) + ROUTER + FFN_IN + FFN_OUT) * T + rows * (FFN_IN + FFN_OUT)
  assert f["remat"] == 2 * again + NL * SCORES * pairs / (S * S)
  assert f["hardware"] == f["model"] + f["expert_extra"] + f["remat"] - f["causal_skip"]


def test_parameter_counts_come_from_the_real_parameter_tree():
  """Counted against an actually initialised model (the cost model builds the vision
  tower with one layer and repeats it)."""
  cfg = tiny(True)
  model = VLM(cfg, rngs=nnx.Rngs(0))
  params = ParamCodec(model).flatten(model)
  assert {p.name: p.shape for p in cost.param_table(cfg)} == {
      n: tuple(a.shape) for n, a in params.items()}
  n = cost.param_counts(cfg, "moe_layers")
  size = lambda pred: sum(a.size for k, a in params.items() if pred(k))
  assert n["vision"] == size(lambda k: k.startswith("vision."))
  assert n["llm"] == size(lambda k: k.startswith("llm."))
  assert n["expert"] == n["expert_trainable"] == E * (FFN_IN + FFN_OUT)
  assert n["dense"] + n["expert"] == size(lambda k: True)
  assert n["dense_trainable"] == ROUTER
  assert cost.param_bytes(cfg)["dense"] == 4 * n["dense"]  # fp32 parameters
  w = cost.matmul_weights(cfg).active(K)
  assert w == dict(vision_layer=4 * VD * VD + 2 * VD * VF, patch=14 * 14 * 3 * VD,
                   projector=PROJ1 + PROJ2, attention=NL * (ATTN_IN + ATTN_OUT),
                   ffn=ROUTER + (K + 1) * (FFN_IN + FFN_OUT), lm_head=HEAD)


DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\]"
                 r".*?: \(tensor<([\dx]+)x\w+>, tensor<[^>]+>\) -> tensor<([\dx]+)x\w+>")


def dot_flops(stablehlo: str) -> int:
  """2 x output elements x contracted size of every dot in a lowered program."""
  total = 0
  for m in DOT.finditer(stablehlo):
    lhs, out = ([int(x) for x in g.split("x")] for g in m.group(2, 3))
    contracted = math.prod(lhs[int(c)] for c in m.group(1).split(",") if c.strip())
    total += 2 * math.prod(out) * contracted
  return total


@pytest.mark.parametrize("train,moe", [("projector", False), ("projector_llm", False),
                                      ("projector", True), ("projector_llm", True),
                                      ("moe_layers", True), ("moe_llava_code", True)])
def test_executed_flops_match_the_matmuls_of_the_lowered_step(train, moe):
  """Every dot of the lowered train step, counted: the formula's executed matmuls
  (the patch embedding is a convolution there, not a dot)."""
  cfg = tiny(moe, num_layers=3, attention_causal_blocks=2)
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  lowered = preflight.lower_train_step(cfg, mesh, batch_size=B, seq_len=S, train=train)
  f = cost.train_step_flops(cfg, train, B, S)
  patch = 2 * cost.matmul_weights(cfg).patch * NPATCH * B
  # The MoE layers' routing and dispatch are small dots too (0.1-0.2% here), which the
  # formula leaves out; without them every matmul is accounted for.
  assert f["hardware"] - patch == pytest.approx(dot_flops(lowered.as_text()),
                                                rel=2e-3 if moe else 1e-12)


def test_stage_presets_and_a_frozen_vision_tower():
  with pytest.raises(ValueError, match="vision tower is frozen"):
    cost.train_step_flops(tiny(), lambda name: True, B, S)
  assert cost.train_step_flops(tiny(), "projector_llm", B, S) == cost.train_step_flops(
      tiny(), lambda name: name.startswith(("projector.", "llm.")), B, S)


def test_real_variants_and_chips():
  cfg = cost.real_config("phi2_siglip", layers=2, vision_layers=1)
  assert (cfg.vision.hidden_size, cfg.num_image_tokens, cfg.text.hidden_size) == (
      1152, 728, 2560)
  assert set(cost.VARIANTS) == {"stablelm", "qwen", "phi2", "phi2_siglip"}
  assert cost.CHIPS["v5e"].hbm_bytes == 16 * cost.GiB
  assert cost.CHIPS["v5p"].ici_send_bw == 600e9
  with pytest.raises(ValueError, match="no ICI bandwidth"):
    cost.CHIPS["v4"].ici_send_bw


def test_memory_per_device_splits_experts_over_the_expert_axis():
  cfg = tiny(True)
  one = cost.memory_per_device(cfg, "moe_layers", {"fsdp": 2}, 1, S)
  ep = cost.memory_per_device(cfg, "moe_layers", {"fsdp": 2, "expert": 2}, 1, S)
  n = cost.param_counts(cfg, "moe_layers")
  assert one["params"] - ep["params"] == 4 * n["expert"] / 4
  assert one["optimizer"] == 3 * 4 * (n["dense_trainable"] + n["expert_trainable"]) / 2
  assert one["total"] == one["params"] + one["optimizer"] + one["activations"]


def test_importing_the_cost_model_needs_no_jax():
  """configs/topologies.py imports it on machines without jax."""
  code = "import sys, moe_vlm.cost; assert 'jax' not in sys.modules, sorted(sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True)
