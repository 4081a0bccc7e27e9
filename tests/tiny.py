"""Tiny model configs shared by the tests (small enough to compile in seconds)."""

from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig

VISION = VisionConfig(variant="clip", image_size=28, patch_size=14, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4)
LLAMA = TextConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_layers=4, num_heads=4, num_kv_heads=2)
PHI = TextConfig(family="phi", vocab_size=64, hidden_size=32, intermediate_size=64,
                 num_layers=4, num_heads=4, num_kv_heads=4, norm="layer", norm_eps=1e-5,
                 mlp="plain", activation="gelu_new", mlp_bias=True, qkv_bias=True,
                 o_bias=True, parallel_residual=True, partial_rotary_factor=0.5,
                 lm_head_bias=True)
IMAGE_TOKEN = 63


def vlm_config(text: TextConfig = LLAMA, moe: MoEConfig | None = None) -> VLMConfig:
  import dataclasses
  return VLMConfig(vision=VISION, text=dataclasses.replace(text, moe=moe),
                   image_token_id=IMAGE_TOKEN)
