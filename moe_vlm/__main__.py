"""`python -m moe_vlm ...` is the `moe-vlm` command."""

from moe_vlm.cli import main

main()
