"""Writing what users keep, safely, from one process of many.

- Only process 0 writes; the others skip (files are shared, or on an object store).
- A file is written to a temporary name and renamed when complete, so a crash never
  leaves half a file where a whole one was; object stores (gs://) write whole objects.
- An output directory is built under a temporary name and renamed when complete; an
  existing non-empty one is replaced only with `overwrite`, and a training workdir never.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator, Mapping

import jax


class OutputExistsError(FileExistsError):
  """The output path holds a user's files; pass --overwrite to replace them."""


def sync(name: str) -> None:
  """A barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def write_json(path: str, obj: Mapping[str, Any] | list) -> None:
  """Process 0 writes `obj` as JSON (see `write_text`)."""
  write_text(path, json.dumps(obj, indent=2))


def write_text(path: str, text: str) -> None:
  """Process 0 writes; local files are replaced atomically, object stores write whole."""
  if jax.process_index() != 0:
    return
  if "://" in path:
    from moe_vlm import checkpoint as ckpt_lib
    ckpt_lib.as_path(path).write_text(text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def is_training_workdir(path: str) -> bool:
  """A `moe-vlm train` workdir: its config.json beside stage directories."""
  return (os.path.exists(os.path.join(path, "config.json"))
          and any(os.path.isdir(os.path.join(path, f"stage{k}")) for k in (1, 2, 3)))


def check_output_dir(out: str, overwrite: bool) -> None:
  """Refuses an output directory that would destroy a user's files."""
  if is_training_workdir(out):
    raise OutputExistsError(f"{out} is a training workdir: write the output elsewhere "
                            "(it would replace the run's config.json)")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise OutputExistsError(f"{out} exists and is not empty; pass --overwrite to replace "
                            "it, or choose another directory")
  if os.path.exists(out) and not os.path.isdir(out):
    raise OutputExistsError(f"{out} exists and is a file, not a directory")


@contextlib.contextmanager
def output_dir(out: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `out` to write into (every process gets the same
  path); when the block completes it becomes `out`, replacing an old `out` only if
  `overwrite`. If the block fails, `out` is left as it was."""
  out = os.path.abspath(out)
  check_output_dir(out, overwrite)
  tmp = f"{out}.partial"
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)  # a previous failed attempt's
    os.makedirs(tmp)
  sync("moe_vlm: output dir created")
  try:
    yield tmp
  except BaseException:
    if jax.process_index() == 0:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  sync("moe_vlm: output dir written")
  if jax.process_index() == 0:
    old = f"{out}.old"
    if os.path.exists(out):
      os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  sync("moe_vlm: output dir in place")
