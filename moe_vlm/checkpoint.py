"""Orbax checkpoints: the resumable train state of a stage, and the stage's final params.

Each stage has a `CheckpointManager` under `<workdir>/stage<k>/checkpoints` holding the
TrainState (params, optimizer state, step) and, as JSON, the data iterator's state and
the run's counters, so a killed run resumes on the same data order. Orbax writes into a
temporary directory and renames it when complete, so a checkpoint is either whole or
absent. Restoring takes the target shardings, so a run may resume on another mesh.
`<workdir>/stage<k>/final` holds the stage's parameters for the next stage (and export).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moe_vlm.files import sync

log = logging.getLogger("moe_vlm")


def as_path(directory: str) -> epath.Path:
  """Local paths made absolute; `gs://...` (and other URLs) kept as they are."""
  directory = os.fspath(directory)
  return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def _abstract(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs with target shardings that tell Orbax what to restore; without
  shardings, onto this process's first device (a checkpoint written from any mesh)."""
  if shardings is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class StageCheckpoints:
  """Periodic, async, keep-N checkpoints of one stage's TrainState + JSON extras."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = as_path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, extras: Mapping[str, Any], *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(dict(extras))),
        force=force)

  def restore(self, state_like: Any, shardings: Any = None,
              step: Optional[int] = None) -> tuple[Any, dict]:
    """`state_like`: arrays or ShapeDtypeStructs with the state's structure."""
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state_like, shardings)),
        extras=ocp.args.JsonRestore()))
    return out.state, dict(out.extras)

  def restore_newest(self, state_like: Any, shardings: Any = None) -> tuple[Any, dict]:
    """The newest checkpoint that restores. One that cannot be read (a partial copy, a
    damaged file) is named in a warning, moved aside to `corrupt-<step>` (kept for
    inspection; a later save may then reuse its step) and the previous one is tried."""
    from moe_vlm.distributed import sum_over_processes
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out, failed = self.restore(state_like, shardings, step), 0
      except Exception as e:  # Orbax / TensorStore raise many kinds for a damaged file
        out, failed, error = None, 1, e
      if not sum_over_processes(np.asarray([failed]))[0]:  # every process read it
        return out
      where = self.directory / str(step)
      log.warning("checkpoint %s cannot be restored (%s); falling back to the previous one",
                  where, str(error if failed else "another process failed").splitlines()[0])
      if jax.process_index() == 0:
        where.rename(self.directory / f"corrupt-{step}")
      sync("moe_vlm: corrupt checkpoint moved aside")
      self.manager.reload()
    raise RuntimeError(f"no checkpoint in {self.directory} can be restored (see the "
                       "warnings above); move the directory away to start the stage again")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_params(directory: str, params: Mapping[str, Any]) -> None:
  """A stage's final parameters (flat dict), written atomically."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(as_path(directory), dict(params), force=True)
  ckptr.wait_until_finished()


def load_params(directory: str, like: Mapping[str, Any], shardings: Any = None) -> dict:
  """Restores a flat params dict; with `shardings`, directly onto the target mesh."""
  ckptr = ocp.StandardCheckpointer()
  return dict(ckptr.restore(as_path(directory), _abstract(dict(like), shardings)))


def has_params(directory: str) -> bool:
  return (as_path(directory) / "_METADATA").exists()


def to_host(tree: Any) -> Any:
  """A tree of process-local arrays as numpy (tests and tiny models only: a global
  array spanning other processes cannot be read here; see parallel.placement)."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
