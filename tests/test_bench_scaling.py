"""bench/scaling.py: the HLO collective parser, the memory summary, the FLOP and ICI
formulas of the TPU estimate, and the `--tiny` run's table (8 simulated CPU devices)."""

import math
import re
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bench import scaling
from moe_vlm import cost as cost_model
from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import preflight

F32_128x256 = 128 * 256 * 4
BF16_16x32 = 16 * 32 * 2

HLO = """HloModule jit_traced, entry_computation_layout={(f32[128,256]{1,0})->f32[]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %g = f32[64]{0} get-tuple-element(%p), index=1
  %all-reduce.9 = f32[64]{0} all-reduce(%g), channel_id=9, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[64]{0}) tuple(%i, %all-reduce.9)
}

%cond (q: (s32[], f32[64])) -> pred[] {
  %q = (s32[], f32[64]{0}) parameter(0)
  ROOT %c = pred[] constant(false)
}

ENTRY %main.1 (param.1: f32[128,256], param.2: bf16[16,32]) -> f32[] {
  %param.1 = f32[128,256]{1,0} parameter(0), sharding={devices=[4,2]<=[8]}
  %param.2 = bf16[16,32]{1,0} parameter(1)
  %all-gather = f32[512,256]{1,0} all-gather(%param.1), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(traced)/jvp()/dot_general" stack_frame_id=3}
  %all-reduce = (f32[128,256]{1,0}, bf16[16,32]{1,0}) all-reduce(%param.1, %param.2), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %reduce-scatter = f32[32,256]{1,0} reduce-scatter(f32[128,256]{1,0} %param.1), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %all-to-all = (bf16[16,32]{1,0}, bf16[16,32]{1,0}) all-to-all(%param.2, %param.2), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}
  %collective-permute = bf16[16,32]{1,0} collective-permute(%param.2), channel_id=5, source_target_pairs={{0,0},{1,2},{2,3},{3,1}}
  %all-gather-start = (bf16[16,32]{1,0}, bf16[128,32]{1,0}) all-gather-start(%param.2), channel_id=6, replica_groups=[1,8]<=[8], dimensions={0}
  %all-gather-done = bf16[128,32]{1,0} all-gather-done(%all-gather-start)
  %all-reduce.1 = f32[128,256]{1,0} all-reduce(%param.1), channel_id=7, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_1'}, to_apply=%add
  %init = (s32[], f32[64]{0}) tuple(%zero, %vec)
  %while = (s32[], f32[64]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_parser_counts_a_hand_written_module():
  t = scaling.parse_collectives(HLO, num_devices=8)
  ar, ag, rs, a2a, cp = (t[k] for k in scaling.KINDS)
  # all-gather over 4 (mesh form) + the async all-gather-start over 8 (its tuple holds
  # the operand, which is taken out of the result); the -done half is not counted.
  assert ag.count == 2
  assert ag.operand_bytes == F32_128x256 + BF16_16x32
  assert ag.result_bytes == 4 * F32_128x256 + 8 * BF16_16x32
  assert ag.wire_bytes == pytest.approx(4 * F32_128x256 * 3 / 4 + 8 * BF16_16x32 * 7 / 8)
  # all-reduce: the tuple over groups of 2, and the one in the while body over 8; the
  # group of one device (mesh form naming an axis of size 1) is left out.
  assert ar.count == 2 and ar.in_loops == 1
  assert ar.payload == F32_128x256 + BF16_16x32 + 64 * 4
  assert ar.wire_bytes == pytest.approx((F32_128x256 + BF16_16x32) * 2 * 1 / 2 + 256 * 2 * 7 / 8)
  assert ar.by_dtype == pytest.approx({"f32": F32_128x256 + 256, "bf16": BF16_16x32})
  # reduce-scatter: operand printed inline, iota groups [2,4] -> 4 devices per group.
  assert (rs.count, rs.operand_bytes, rs.result_bytes) == (1, F32_128x256, F32_128x256 / 4)
  assert rs.wire_bytes == pytest.approx(F32_128x256 * 3 / 4)
  # all-to-all of two operands over axis_1 (4 devices): (n-1)/n of the send buffer.
  assert (a2a.count, a2a.payload) == (1, 2 * BF16_16x32)
  assert a2a.wire_bytes == pytest.approx(2 * BF16_16x32 * 3 / 4)
  # collective-permute: 3 of its 4 pairs move data.
  assert (cp.count, cp.payload, cp.wire_bytes) == (1, BF16_16x32, BF16_16x32 * 3 / 4)
  ops = scaling.collective_ops(HLO, 8)
  assert len(ops) == 8  # the group-of-one all-reduce is listed, only left out of totals
  assert [o.op_name for o in ops if o.op_name] == ["jit(traced)/jvp()/dot_general"]


def test_group_size_spellings():
  g = scaling.group_size
  assert g("replica_groups={{0,1,2},{3,4,5}}, to_apply=%a", 8) == 3
  assert g("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", 8) == 2
  assert g("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}", 8) == 4
  assert g("replica_groups={}, to_apply=%a", 8) == 8
  assert scaling.array_bytes("(bf16[2,3]{1,0}, s32[], pred[4])") == 12 + 4 + 4


def test_memory_summary_and_sharded_bytes():
  stats = types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=90,
                                alias_size_in_bytes=80, temp_size_in_bytes=50,
                                generated_code_size_in_bytes=7)
  m = scaling.memory_summary(stats)
  assert (m.arguments, m.outputs, m.aliased, m.temporaries, m.code) == (100, 90, 80, 50, 7)
  assert m.total == 100 + 90 - 80 + 50 + 7
  mesh = mesh_lib.make_mesh({"fsdp": 4}, jax.devices()[:4])
  avals = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32),
           "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16),
           "r": jax.ShapeDtypeStruct((3, 5), jnp.float32)}
  shardings = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P("fsdp")),
               "r": NamedSharding(mesh, P())}
  assert scaling.sharded_bytes(avals, shardings) == 2 * 6 * 4 + 1 * 2 + 3 * 5 * 4


@pytest.fixture(scope="module")
def tiny_run():
  lines = []
  result = scaling.main(["--tiny", "--device-note", "pytest"], out=lines.append)
  return lines, {r["layout"]: r for r in result["rows"]}


def test_tiny_run_prints_its_table(tiny_run):
  lines, rows = tiny_run
  head = [i for i, l in enumerate(lines) if "all-reduce" in l and "formula" in l]
  assert len(head) == 1, "\n".join(lines)
  body = [l for l in lines[head[0] + 2:] if re.match(r"^\s*4 \S", l)]
  names = ("data", "fsdp", "model (tensor)", "expert gspmd", "expert shard_map")
  assert [l[3:21].strip() for l in body] == list(names), "\n".join(lines)
  for line in body:  # every memory column and the bytes sent are finite positive numbers
    numbers = [float(x) for x in re.findall(r"\d+\.\d+", line)]
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert float(line.split("|")[-1].split()[0]) > 0
  assert set(rows) == set(names)


def test_data_parallel_all_reduces_exactly_the_gradients(tiny_run):
  _, rows = tiny_run
  r = rows["data"]
  grad_bytes = r["state"]["params"]  # trainable fp32 params, replicated: one gradient each
  ar = r["collectives"]["all-reduce"]
  # Besides the gradients only scalars (loss sums, counts, routing statistics) travel.
  assert grad_bytes <= ar["payload"] <= grad_bytes + 4096
  assert r["collectives"]["all-to-all"]["count"] == 0
  assert r["collectives"]["all-gather"]["payload"] < 0.05 * grad_bytes


def test_fsdp_divides_state_memory_and_gathers_every_parameter_once(tiny_run):
  _, rows = tiny_run
  data, fsdp = rows["data"], rows["fsdp"]
  n = 4
  ratio = data["memory"]["arguments"] / fsdp["memory"]["arguments"]
  assert 0.9 * n <= ratio <= n  # norms stay replicated; everything else is split 4 ways
  state = lambda r: sum(r["state"].values())
  assert 0.9 * n <= state(data) / state(fsdp) <= n
  # Every weight a matmul uses is gathered once (XLA reuses it in the backward). Not
  # gathered: the embedding table (the lookup runs on the shards) and the last vision
  # layer and post-norm, which vision_feature_layer=-2 never runs.
  unused = ("llm.embed", "vision.layers.1.", "vision.post_norm.")
  used = sum(p.nbytes for p in cost_model.param_table(scaling.tiny_config(MoEConfig(
      num_experts=4, group_size=1))) if not p.name.startswith(unused))
  assert used <= fsdp["collectives"]["all-gather"]["payload"] <= 1.05 * used


def test_layout_specific_collectives_and_formula_agree_with_the_hlo(tiny_run):
  _, rows = tiny_run
  for name in ("expert gspmd", "expert shard_map"):
    assert rows[name]["collectives"]["all-to-all"]["count"] >= 2
  assert rows["model (tensor)"]["collectives"]["all-gather"]["count"] == 0
  assert (rows["model (tensor)"]["collectives"]["all-reduce"]["payload"] >
          rows["data"]["collectives"]["all-reduce"]["payload"])
  # The ICI formula of the TPU estimate, in its XLA:CPU mode, against the compiled HLO.
  for name, r in rows.items():
    assert 0.75 <= r["predicted"]["total"] / r["wire_bytes"] <= 1.33, (name, r["predicted"])


def _small_vlm(remat: str) -> VLMConfig:
  vision = VisionConfig(variant="clip", image_size=56, patch_size=14, hidden_size=128,
                        intermediate_size=256, num_layers=3, num_heads=4)
  text = TextConfig(family="llama", vocab_size=1024, hidden_size=256, intermediate_size=512,
                    num_layers=4, num_heads=4, num_kv_heads=4, remat=remat,
                    moe=MoEConfig(num_experts=4, group_size=2))
  return VLMConfig(vision=vision, text=text, image_token_id=1023)


@pytest.mark.parametrize("train", ["moe_layers", "projector"])
def test_step_flops_match_xla_cost_analysis(train):
  """The estimate's executed-FLOP formula (stage-dependent backward, capacity slots,
  full remat) against XLA's count of the same step, lowered on one device."""
  cfg = _small_vlm("full")
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  lowered = preflight.lower_train_step(cfg, mesh, batch_size=4, seq_len=128, train=train)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  f = cost_model.train_step_flops(cfg, train, 4, 128)
  # Matmuls only on our side; XLA also counts element-wise work and the optimizer.
  assert 0.97 <= f["hardware"] / cost["flops"] <= 1.03, (f, cost["flops"])
  assert f["model"] < f["hardware"]  # remat and empty capacity slots are not model FLOPs


def test_real_configs_have_the_papers_active_parameters():
  """The config.json values give the MoE-LLaVA model zoo's active parameter counts
  (LLM with top-2 of 4 experts), counted here without building the model."""
  for variant, paper_b in scaling.PAPER_ACTIVE_B.items():
    cfg = cost_model.real_config(variant, cost_model.moe_llava_moe(4))
    t = cfg.text
    d, hd = t.hidden_size, t.dim_per_head
    ffn = (3 if t.mlp == "gated" else 2) * d * t.intermediate_size
    attn = d * hd * (2 * t.num_heads + 2 * t.num_kv_heads)
    n_moe = len(t.moe_layers())
    active = 2 * t.vocab_size * d + t.num_layers * (attn + ffn) + n_moe * ffn
    assert abs(active / 1e9 - paper_b) / paper_b < 0.04, (variant, active)
    assert cfg.num_image_tokens == 576 and t.remat == "full" and t.dtype == "bfloat16"


def test_packed_paper_estimate_counts_real_tokens():
  rows = scaling.packed_rows(3, 576)
  assert 0.5 < rows["fill"] < 1 and 0 < rows["pairs"] < rows["fill"] and rows["slots"] == 3
  padded = scaling.estimate_row("phi2", "v5p-128", 3)
  packed = scaling.estimate_row("phi2", "v5p-128", 3, packed=True)
  assert packed["t_softmax"] == 0 and packed["flops"]["expert_extra"] == 0
  assert packed["flops"]["tokens"] == pytest.approx(padded["flops"]["tokens"] * rows["fill"])
  assert packed["ici"]["total"] < padded["ici"]["total"]  # routed rows, not capacity
  assert packed["mfu_overlap"] > padded["mfu_overlap"]
