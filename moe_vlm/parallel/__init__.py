"""moe_vlm.parallel."""
