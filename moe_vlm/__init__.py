"""moe_vlm: sparse Mixture-of-Experts vision-language models in JAX/Flax (MoE-LLaVA)."""

__version__ = "0.1.0"
