"""moe_vlm.infer."""
