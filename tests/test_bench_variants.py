"""The seed-design variants as trainer configs, and the comparison's parameter accounting."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from bench import variants as bench_variants
from configs import variants as variants_cfg
from moe_vlm import experiment
from moe_vlm.data import tokenizer as tokenizer_lib
from moe_vlm.models.config import LoRAMoEConfig, MoEConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import loop
from moe_vlm.train.stages import trainable_fn
from tests.tiny import LLAMA, vlm_config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok"))
  corpus = ["what colour is the circle", "a red square left of a blue triangle"] * 20
  tokenizer_lib.train_tokenizer(corpus, path)
  return tokenizer_lib.load_tokenizer(path)


@pytest.mark.parametrize("variant", variants_cfg.VARIANTS)
def test_variant_configs_build_the_intended_models(variant, tokenizer):
  c = variants_cfg.get_config(variant)
  dense = experiment.model_config(c, tokenizer)
  last = max(variants_cfg.STAGES[variant])
  cfg = experiment.stage_model_config(c, dense, last)
  names = ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0))).names
  trained = [n for n in names if trainable_fn(c.stages[f"stage{last}"].train)(n)]
  if variant == "hyperllava":
    assert last == 2 and dense.visual_expert.expert_dim == 64
    assert dense.text.language_expert.language_layers(4) == (2, 3)
    assert any(".language_expert." in n for n in trained)
    assert any(".visual_expert." in n for n in names
               if trainable_fn(c.stages.stage1.train)(n))
  elif variant == "awaker":
    # Stage III: LoRA experts (and q/k/v's plain LoRA), the gates frozen.
    assert cfg.text.moe is None and cfg.text.lora_moe.routing == "instance"
    assert not cfg.text.lora_moe.single and cfg.text.lora_moe.rank == 16
    assert trained and all(".lora_" in n and ".router" not in n for n in trained)
    assert any(".lora_qkv." in n for n in trained)
    # Stage I (a single LoRA) starts from the dense base plus fresh LoRA, B at zero...
    single = experiment.stage_model_config(c, dense, 1)
    assert single.text.lora_moe.single
    mesh = mesh_lib.make_mesh({"data": -1})
    dense_params = {n: np.full(s.shape, 0.5, s.dtype) for n, s in ParamCodec.abstract(
        lambda: VLM(dense, rngs=nnx.Rngs(0))).shapes.items()}
    start = loop.add_new_params(dense_params, single, mesh, seed=0)
    single_names = ParamCodec.abstract(lambda: VLM(single, rngs=nnx.Rngs(0))).names
    assert set(start) == set(single_names)
    assert all(np.array_equal(start[k], v) for k, v in dense_params.items())
    assert all(not np.asarray(start[k]).any() for k in start if ".lora_" in k
               and k.endswith("_b"))
    # ... and stage II from stage I's, its LoRA in every expert (tests/test_awaker.py).
    stage2 = experiment.stage_model_config(c, dense, 2)
    assert stage2 == cfg and trainable_fn(c.stages.stage2.train)(
        next(n for n in names if n.endswith(".router")))
  elif variant == "perceiver":
    assert cfg.num_image_tokens == 8 < dense.vision.num_patches
    assert cfg.text.moe is not None
  else:
    assert cfg.text.moe is not None and cfg.projector == "mlp2x_gelu"
    assert trained and all(".mlp.experts." in n or ".mlp.router." in n for n in trained)


def test_bad_stage3_kind_is_named():
  c = variants_cfg.get_config("moe_llava")
  c.stage3_kind = "lorra"
  with pytest.raises(ValueError, match="stage3_kind"):
    experiment.stage_model_config(c, vlm_config(LLAMA), 3)


def test_active_parameters_count_top_k_of_the_routed_experts():
  d, f = LLAMA.hidden_size, LLAMA.intermediate_size
  moe = vlm_config(LLAMA, MoEConfig(num_experts=4, top_k=2))
  dense = bench_variants.param_counts(vlm_config(LLAMA))
  counts = bench_variants.param_counts(moe)
  n_moe = len(moe.text.moe_layers())
  experts = n_moe * 4 * 3 * d * f  # gated FFN: gate, up, down per expert
  routers = n_moe * d * 4
  assert counts["total"] == dense["total"] - n_moe * 3 * d * f + experts + routers
  assert counts["total"] - counts["active"] == experts // 2
  lora = dataclasses.replace(vlm_config(LLAMA), text=dataclasses.replace(
      LLAMA, lora_moe=LoRAMoEConfig(num_experts=4, top_k=1, rank=2, targets=("mlp",))))
  lc = bench_variants.param_counts(lora)
  routed = LLAMA.num_layers * 4 * 2 * (3 * d + 3 * f)  # A [d|f, r] + B [r, f|d] per proj
  assert lc["total"] - lc["active"] == routed * 3 // 4
