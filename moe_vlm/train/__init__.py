"""moe_vlm.train."""
