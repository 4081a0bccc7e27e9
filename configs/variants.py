"""The seed designs side by side on the embedded synthetic data: one model, one trainer.

  moe-vlm train --config configs/variants.py:hyperllava --workdir /tmp/hyper --stage 1,2
  python -m bench.variants --workdir /tmp/variants     # all four, and the comparison table

Each variant is `configs/synthetic_tiny.py` with one change:
- `moe_llava`:  the default (stage 3 upcycles every other FFN into 4 experts, top-2);
- `awaker`:     stage 3 adds Awaker2.5-VL LoRA experts (4 + a shared one, top-1, instance
                routing on the prompt's mean embedding) to the frozen stage-2 model and
                trains only them;
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
    # The paper: 4 task experts + 1 global, top-1, r=256/alpha=512 on a 7B model; the
    # rank is scaled to the 128-wide demo LLM (alpha/r = 2 as in the paper).
    c.lora_moe = schema.block(
        model_config.LoRAMoEConfig, num_experts=4, top_k=1, rank=16, alpha=32.0,
        targets=("mlp", "attn_out"), routing="instance", shared_expert=True,
        temperature=1.0, noise_std=0.1)
    c.stages.stage3.train = "lora_experts"
    c.stages.stage3.learning_rate = 1e-3
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
