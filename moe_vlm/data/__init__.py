"""moe_vlm.data."""
