"""Shared set-up for the command-line entry points."""

from __future__ import annotations

import logging


def setup_logging() -> None:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("moe_vlm").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file at INFO
