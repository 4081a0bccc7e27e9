"""The safetensors format, read lazily and written as a stream, one tensor at a time.

A file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte range; `__metadata__`), then the raw little-endian tensor bytes. Reading maps the
file into memory, so a tensor (or the slice of one a device needs) costs only the
bytes it touches. Writing streams each tensor to disk as it arrives, so an export
never holds more than one tensor: the bytes go to a scratch file first, and the shard
is assembled (header, then the bytes copied over) when it is full.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Mapping

import numpy as np

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
          "BOOL": "bool"}
_CODES = {name: code for code, name in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
  """A safetensors file that cannot be read: names the file and what is wrong."""


def numpy_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # numpy has no bfloat16 of its own
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def read(file: str) -> dict[str, np.ndarray]:
  """The tensors of one file as read-only memory-mapped arrays (nothing is read until a
  tensor, or a slice of one, is used). A malformed or truncated file is an error that
  names it."""
  size = os.path.getsize(file)
  try:
    with open(file, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if n <= 0 or 8 + n > size:
        raise ValueError(f"a header of {n} bytes in a {size}-byte file")
      header = json.loads(f.read(n))
  except (ValueError, UnicodeDecodeError) as e:
    raise SafetensorsError(f"{file}: not a valid safetensors file ({e})") from None
  header.pop("__metadata__", None)
  data = np.memmap(file, dtype=np.uint8, mode="r") if size > 8 + n else None
  out = {}
  for name, info in header.items():
    try:
      dtype = numpy_dtype(DTYPES[info["dtype"]])
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (8 + n + int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise SafetensorsError(f"{file}: tensor {name!r} has a malformed header entry "
                             f"{info!r} ({e!r})") from None
    if end > size or end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise SafetensorsError(
          f"{file}: tensor {name!r} {info['dtype']}{list(shape)} needs bytes [{begin}, "
          f"{end}) but the file has {size} bytes (truncated or corrupt: copy it again)")
    out[name] = (np.zeros(shape, dtype) if end == begin else
                 data[begin:end].view(dtype).reshape(shape))
  return out


class ShardedWriter:
  """Writes tensors as they come into `model.safetensors`, or into
  `model-0000k-of-0000n.safetensors` shards of at most `max_shard_bytes` plus the index
  transformers reads. Files appear under their final names only in `close()`."""

  def __init__(self, out_dir: str, max_shard_bytes: int):
    self.out_dir, self.max = out_dir, max_shard_bytes
    os.makedirs(out_dir, exist_ok=True)
    self.shards: list[tuple[str, list[str]]] = []  # (assembled file, tensor names)
    self.total = 0
    self._open()

  def _open(self) -> None:
    self.scratch = os.path.join(self.out_dir, f".shard{len(self.shards)}.bytes")
    self.data = open(self.scratch, "wb")
    self.header: dict[str, dict] = {}
    self.offset = 0

  def add(self, name: str, value: np.ndarray) -> None:
    value = np.ascontiguousarray(value)
    code = _CODES.get(value.dtype.name)
    if code is None:
      raise SafetensorsError(f"{name}: dtype {value.dtype} has no safetensors code")
    if self.header and self.offset + value.nbytes > self.max:
      self._assemble()
      self._open()
    self.data.write(value.reshape(-1).view(np.uint8).data)
    self.header[name] = {"dtype": code, "shape": list(value.shape),
                         "data_offsets": [self.offset, self.offset + value.nbytes]}
    self.offset += value.nbytes
    self.total += value.nbytes

  def _assemble(self) -> None:
    self.data.close()
    header = json.dumps({"__metadata__": {"format": "pt"}, **self.header},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensors start 8-byte aligned
    path = os.path.join(self.out_dir, f".shard{len(self.shards)}.safetensors")
    with open(path, "wb") as out, open(self.scratch, "rb") as data:
      out.write(len(header).to_bytes(8, "little"))
      out.write(header)
      shutil.copyfileobj(data, out, 16 * 2**20)
    os.remove(self.scratch)
    self.shards.append((path, list(self.header)))

  def close(self) -> list[str]:
    """Finishes the last shard, gives every shard its final name; returns the names."""
    self._assemble()
    n = len(self.shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    for (path, _), name in zip(self.shards, names):
      os.replace(path, os.path.join(self.out_dir, name))
    if n > 1:
      index = {"metadata": {"total_size": self.total},
               "weight_map": {t: name for (_, ts), name in zip(self.shards, names)
                              for t in ts}}
      with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names


def write(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], out_dir: str,
          max_shard_bytes: int) -> list[str]:
  """`tensors` (a mapping, or (name, array) pairs produced one at a time) into `out_dir`
  (see `ShardedWriter`); returns the file names."""
  writer = ShardedWriter(out_dir, max_shard_bytes)
  for name, value in (tensors.items() if isinstance(tensors, Mapping) else tensors):
    writer.add(name, value)
  return writer.close()
