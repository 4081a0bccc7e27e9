"""Random-access sources of LLaVA-format records (grain `RandomAccessDataSource`s).

A record, as every source here returns it, is a plain dict:
  {"id": str, "image": None | str path | bytes | np.ndarray, "conversations": list}
`image` None means a text-only sample. Images are NOT opened here: decoding happens in
the pipeline's workers, where a missing/corrupt file becomes a counted bad sample
instead of a crash.

LlavaJsonSource validates records once at load time and drops malformed ones, keeping
counts by reason in `.skipped` (LLaVA-mix-665k style data has a few such records; one
bad record must not stop a multi-day run). TfdsSource wraps a `tfds.data_source(...)`
style object lazily, so its malformed examples are flagged per example (`error` field)
and counted by the pipeline instead.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Optional

import numpy as np

from moe_vlm.data.templates import ConversationError, validate_conversations

# Skip reasons of LlavaJsonSource.skipped.
NOT_A_DICT = "not_a_dict"
BAD_CONVERSATIONS = "bad_conversations"
BAD_IMAGE_FIELD = "bad_image_field"


def _read_records(json_path: str) -> list[Any]:
  """A JSON list, or JSON Lines for *.jsonl."""
  if not os.path.isfile(json_path):
    raise FileNotFoundError(f"LLaVA data file not found: {json_path}")
  with open(json_path, encoding="utf-8") as f:
    if json_path.endswith(".jsonl"):
      records = []
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            records.append(_BadLine(f"line {line_no}: {e}"))
      return records
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{json_path} is not valid JSON: {e}") from e
  if not isinstance(data, list):
    raise ValueError(f"{json_path} holds a JSON {type(data).__name__}; expected a list of "
                     "LLaVA records")
  return data


class _BadLine:
  def __init__(self, message: str):
    self.message = message


class LlavaJsonSource:
  """LLaVA JSON / JSONL records as a grain random-access source.

  Args:
    json_path: the data file (a JSON list, or JSON Lines when it ends in .jsonl).
    image_root: directory that records' relative `image` paths are relative to;
      defaults to the JSON file's directory.
  Attributes:
    skipped: {reason: count} of records dropped at load time.
    errors: the first few (index, message) of dropped records, for logs.
  """

  MAX_ERRORS_KEPT = 20

  def __init__(self, json_path: str, image_root: Optional[str] = None):
    self.json_path = os.fspath(json_path)
    self.image_root = os.fspath(image_root) if image_root is not None else (
        os.path.dirname(os.path.abspath(self.json_path)))
    self.skipped: dict[str, int] = collections.Counter()
    self.errors: list[tuple[int, str]] = []
    # Validated records are kept as compact JSON bytes: a list of bytes pickles fast
    # to grain's worker processes and costs far less memory than nested dicts
    # (LLaVA-mix-665k is ~1 GB as Python objects).
    self._records: list[bytes] = []
    for index, raw in enumerate(_read_records(self.json_path)):
      try:
        self._records.append(json.dumps(self._validate(index, raw)).encode("utf-8"))
      except _Skip as skip:
        self.skipped[skip.reason] += 1
        if len(self.errors) < self.MAX_ERRORS_KEPT:
          self.errors.append((index, str(skip)))
    self.skipped = dict(self.skipped)

  def _validate(self, index: int, raw: Any) -> dict[str, Any]:
    where = f"{self.json_path} record {index}"
    if isinstance(raw, _BadLine):
      raise _Skip(NOT_A_DICT, f"{where}: invalid JSON ({raw.message})")
    if not isinstance(raw, dict):
      raise _Skip(NOT_A_DICT, f"{where} is a {type(raw).__name__}; expected a dict")
    if "conversations" not in raw:
      raise _Skip(BAD_CONVERSATIONS, f"{where} has no 'conversations' field")
    try:
      conversations = validate_conversations(raw["conversations"])
    except ConversationError as e:
      raise _Skip(BAD_CONVERSATIONS, f"{where}: {e}") from None
    image = raw.get("image")
    if image is not None:
      if not isinstance(image, str) or not image:
        raise _Skip(BAD_IMAGE_FIELD, f"{where}: 'image' is {image!r}; expected one path "
                    "string (multi-image records are not supported)")
      image = os.path.join(self.image_root, image)
    record_id = raw.get("id", index)
    return {"id": str(record_id), "image": image, "conversations": conversations}

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return json.loads(self._records[index])

  def __repr__(self) -> str:
    return (f"LlavaJsonSource({self.json_path!r}, records={len(self)}, "
            f"skipped={self.skipped})")


class _Skip(Exception):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class TfdsSource:
  """Wraps a random-access TFDS-style source (`tfds.data_source(...)`).

  Each example must carry `image_key` (encoded image bytes, or a decoded HWC uint8
  array; empty bytes / an empty array mean text-only) and `conversations_key` (the
  LLaVA conversations as a JSON string or bytes). Examples are converted lazily; a
  malformed example yields a record with `conversations=None` and an `error` message,
  which the pipeline turns into a counted bad sample (never an exception in a worker).
  """

  def __init__(self, data_source: Any, *, image_key: str = "image",
               conversations_key: str = "conversations", id_key: str = "id"):
    for attr in ("__len__", "__getitem__"):
      if not hasattr(data_source, attr):
        raise TypeError(f"data_source {type(data_source).__name__} lacks {attr}; expected a "
                        "random-access source such as tfds.data_source(...)")
    self._source = data_source
    self.image_key = image_key
    self.conversations_key = conversations_key
    self.id_key = id_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    record_id = example.get(self.id_key, index) if hasattr(example, "get") else index
    if isinstance(record_id, bytes):
      record_id = record_id.decode("utf-8", "replace")
    record = {"id": str(record_id), "image": None, "conversations": None}
    if not hasattr(example, "get"):
      record["error"] = f"example {index} is a {type(example).__name__}; expected a dict"
      return record
    image = example.get(self.image_key)
    if isinstance(image, np.ndarray) and image.dtype.kind in "SO" and image.ndim == 0:
      image = image.item()
    if isinstance(image, (bytes, bytearray)) and len(image) > 0:
      record["image"] = bytes(image)
    elif isinstance(image, np.ndarray) and image.size > 0:
      record["image"] = image
    raw = example.get(self.conversations_key)
    try:
      if isinstance(raw, np.ndarray):
        raw = raw.item()
      if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8")
      if not isinstance(raw, str):
        raise ConversationError(f"'{self.conversations_key}' is a {type(raw).__name__}; "
                                "expected a JSON string")
      record["conversations"] = validate_conversations(
          json.loads(raw), field=f"example {index} {self.conversations_key}")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
      record["error"] = f"example {index}: {e}"
    return record

  def __repr__(self) -> str:
    return f"TfdsSource({self._source!r}, records={len(self)})"

