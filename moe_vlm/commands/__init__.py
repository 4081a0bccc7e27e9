"""`moe-vlm` subcommands, one module each; every module defines `main(argv)` (absl)."""
