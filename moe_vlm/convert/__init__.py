"""moe_vlm.convert."""
