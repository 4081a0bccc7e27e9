"""Multi-host start-up: one `jax.distributed.initialize()` per process on a pod slice."""

from __future__ import annotations

import logging
import os

import jax


def _on_multihost_tpu() -> bool:
  """A Cloud TPU VM that is one worker of a pod slice (several hosts)."""
  if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  # Plain TPU VMs do not always export the variables above; the accelerator type does
  # (v4-32 = 16 chips over 4 hosts); MOE_VLM_DISTRIBUTED=1 forces initialisation.
  if os.environ.get("MOE_VLM_DISTRIBUTED") == "1":
    return True
  accel = os.environ.get("TPU_ACCELERATOR_TYPE", "")
  try:
    cores = int(accel.rsplit("-", 1)[1])
  except (IndexError, ValueError):
    return False
  return cores > 8


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
  elif _on_multihost_tpu():
    jax.distributed.initialize()  # discovers the slice through the TPU metadata server
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
