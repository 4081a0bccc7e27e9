"""The seed designs side by side on the embedded synthetic data: one model, one trainer.

  moe-vlm train --config configs/variants.py:hyperllava --workdir /tmp/hyper --stage 1,2
  moe-vlm train --config configs/variants.py:moe_llava --workdir /tmp/m --stage 1,2
  moe-vlm train --config configs/variants.py:awaker --workdir /tmp/awaker \
      --config.init.params=/tmp/m/stage2/final            # Awaker's stages I-III on it
  python -m bench.variants --workdir /tmp/variants     # all four, and the comparison table

Each variant is `configs/synthetic_tiny.py` with one change:
- `moe_llava`:  the default (stage 3 upcycles every other FFN into 4 experts, top-2);
- `awaker`:     Awaker2.5-VL's three stages as the trainer's stages 1-3, on a frozen
                pretrained base: the dense model of MoE-LLaVA's stages 1-2, given as
                `init.params` (the paper's base is Qwen2-VL-7B: configs/awaker.py).
                I (`lora_single`): one LoRA on q/k/v, o and gate/up/down; II
                (`lora_experts_routers`): it is copied into 4 experts + the global one,
                experts and gates train; III (`lora_experts`): gates frozen, experts
                train. Instance routing on the first user turn's mean embedding, top-1;
- `hyperllava`: HyperLLaVA's visual expert (trained in stage 1 with the projector) and
                language experts in the posterior half of the LLM (stage 2); a two-stage
                method, so it runs stages 1-2;
- `perceiver`:  IDEFICS2's perceiver resampler as the projector (16 patches -> 8 latent
                tokens per image), then MoE-LLaVA's stage 3.
"""

import ml_collections

from configs import synthetic_tiny
from moe_vlm import schema
from moe_vlm.models import config as model_config

VARIANTS = ("moe_llava", "awaker", "hyperllava", "perceiver")
# Stages each variant trains (HyperLLaVA has no MoE stage).
STAGES = {"moe_llava": (1, 2, 3), "awaker": (1, 2, 3), "hyperllava": (1, 2),
          "perceiver": (1, 2, 3)}


def get_config(variant: str = "moe_llava") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
  c = synthetic_tiny.get_config()
  c.variant = variant
  c.stage3_kind = "moe"
  if variant == "awaker":
    c.stage3_kind = "lora"
    # The release: 4 task experts + 1 global, top-1, r=256/alpha=512, dropout 0.05 on a
    # 7B model; the rank is scaled to the 128-wide demo LLM (alpha/r = 2 as released).
    c.lora_moe = schema.block(
        model_config.LoRAMoEConfig, num_experts=4, top_k=1, rank=16, alpha=32.0,
        dropout=0.05, targets=("qkv", "attn_out", "mlp"), routing="instance",
        shared_expert=True, temperature=1.0, noise_std=0.1)
    # The base (vision tower included) comes from init.params: no tower pre-training.
    c.vision_pretrain.steps = 0
    # MoE-LLaVA's stage-3 budget (300 steps of the qa mix), split over the three stages.
    for k, preset in ((1, "lora_single"), (2, "lora_experts_routers"), (3, "lora_experts")):
      c.stages[f"stage{k}"].update(synthetic_tiny.stage(preset, "qa", "phi", steps=100,
                                                        lr=1e-3))
  elif variant == "hyperllava":
    # The paper's best sizes: expert input 64, bottleneck 16.
    expert = schema.block(model_config.HyperExpertConfig, expert_dim=64, bottleneck=16)
    c.model.visual_expert = expert
    c.model.text.language_expert = ml_collections.ConfigDict(expert)
  elif variant == "perceiver":
    c.model.projector = "perceiver"
    c.model.perceiver = schema.block(model_config.PerceiverConfig, n_latents=8, depth=3,
                                     num_heads=4, head_dim=32, num_kv_heads=2)
  return c
