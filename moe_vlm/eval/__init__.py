"""moe_vlm.eval."""
