"""Flax NNX modules: vision tower, projector, decoder LLM, MoE layer, the VLM."""

from moe_vlm.models.config import ConfigError, MoEConfig, TextConfig, VisionConfig, VLMConfig
from moe_vlm.models.llm import DecoderLM
from moe_vlm.models.moe import MoE
from moe_vlm.models.vision import VisionEncoder
from moe_vlm.models.vlm import VLM, ImageTokenError

__all__ = ["ConfigError", "MoEConfig", "TextConfig", "VisionConfig", "VLMConfig",
           "DecoderLM", "MoE", "VisionEncoder", "VLM", "ImageTokenError"]
