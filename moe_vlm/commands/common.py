"""Shared set-up for the command-line entry points."""

from __future__ import annotations

import logging


def start() -> None:
  """Logging, then the multi-process runtime when this is one process of several (a pod
  slice's worker, or MOE_VLM_COORDINATOR & co. set): every command can run on a slice."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("moe_vlm").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file at INFO
  from moe_vlm.distributed import maybe_initialize
  maybe_initialize()
