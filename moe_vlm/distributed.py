"""Multi-host start-up: one `jax.distributed.initialize()` per process on a pod slice."""

from __future__ import annotations

import logging
import os

import jax


def maybe_initialize() -> None:
  """Initialises the JAX distributed runtime when running multi-process.

  On Cloud TPU VMs `initialize()` discovers the coordinator by itself; elsewhere set
  MOE_VLM_COORDINATOR (host:port), MOE_VLM_NUM_PROCESSES and MOE_VLM_PROCESS_ID.
  """
  coordinator = os.environ.get("MOE_VLM_COORDINATOR")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["MOE_VLM_NUM_PROCESSES"]),
                               process_id=int(os.environ["MOE_VLM_PROCESS_ID"]))
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
