"""Records -> model batches: per-example preprocessing and the grain input pipeline.

Batch contract (every field a numpy array with leading batch dim B, L = max_length,
S = image_size):
  input_ids       int32 [B, L]  `<image>` expanded to num_image_tokens image ids;
                                right-padded with the tokenizer's pad id
  attention_mask  int32 [B, L]  1 on real tokens
  loss_mask       int32 [B, L]  1 where input_ids[t] is a target (answer tokens and the
                                eos closing each answer); the trainer shifts it
  router_mask     int32 [B, L]  1 on the first user turn's content (image and text):
                                the span Awaker's instance router averages over
  pixel_values    float32 [B, S, S, 3]  normalised NHWC; zeros for text-only rows
                                (Qwen2-VL, `PreprocessConfig.patches`: [B, P, patch_dim],
                                the image's patches in the first t*h*w of P slots)
  image_grid_thw  int32 [B, 3]  Qwen2-VL only: the image's patch grid (t, h, w), zeros
                                for text-only rows; its `<image>` became t*h*w/merge^2
                                image ids (the image's merged-patch count)
  has_image       int32 [B]     1 when the row holds image tokens
  ok              int32 [B]     0 for a bad sample (see below)
  truncated       int32 [B]     1 when max_length cut the conversation
  bad_reason      int32 [B]     OK / MISSING_IMAGE / UNREADABLE_IMAGE /
                                MALFORMED_CONVERSATION / IMAGE_TRUNCATED
  sample_id       str [B]       the record's id, and its image path ("" if none), and
  image           str [B]       for a bad row what was wrong (`bad_detail`), so that
  bad_detail      str [B]       the trainer can name every bad record it skips

Bad samples never raise: they flow through as rows with ok=0, every mask zero, pad
ids and zero pixels, so they contribute nothing to the loss and their counts survive
multiprocess workers (`summarize_bad`). A row whose attention_mask is all zeros must
therefore not produce NaNs in attention (use a finite mask value).

Packed batches (`data.packing="first_fit"`, `moe_vlm.data.packing`): several samples per
row, plus
  segment_ids     int32 [B, L]  1, 2, ... per sample in the row, 0 on padding
and pixel_values [B, M, S, S, 3] (M image slots per row, `has_image` [B, M]); the
per-sample fields (ok, truncated, bad_reason, sample_id, image, bad_detail) are
[B, max_segments], bad_reason -1 in unused slots (Qwen2-VL: pixel_values [B, M, P,
patch_dim], image_grid_thw [B, M, 3]). With "length_buckets" the contract is
the unpacked one, L being the batch's bucket length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import grain
import numpy as np

from moe_vlm.data import images as images_lib
from moe_vlm.data import packing as packing_lib
from moe_vlm.data import templates

OK, MISSING_IMAGE, UNREADABLE_IMAGE, MALFORMED_CONVERSATION, IMAGE_TRUNCATED = range(5)
BAD_REASONS = ("ok", "missing_image", "unreadable_image", "malformed_conversation",
               "image_truncated")
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "router_mask", "pixel_values",
              "has_image", "ok", "truncated", "bad_reason", "sample_id", "image", "bad_detail")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """What turns a record into model inputs (ties the data to the model config)."""

  template: str
  max_length: int
  num_image_tokens: int
  image_token_id: int
  image_size: int
  normalization: str = "clip"  # "clip" | "siglip"
  pad_to_square: bool = True  # MoE-LLaVA's image_aspect_ratio="pad"
  add_bos: bool = False
  # Qwen2-VL (native resolution): images become patches on a fixed budget and their
  # `<image>` as many ids as they have merged patches (`num_image_tokens` is then only
  # the most an image may take); None: square images of `image_size`.
  patches: Optional[images_lib.PatchConfig] = None

  def __post_init__(self):
    if self.template not in templates.TEMPLATES:
      raise ValueError(f"PreprocessConfig.template={self.template!r}; expected one of "
                       f"{templates.TEMPLATES}")
    for name in ("max_length", "num_image_tokens", "image_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"PreprocessConfig.{name} must be positive, got "
                         f"{getattr(self, name)}")
    images_lib.get_normalization(self.normalization)


def _names(record: Mapping[str, Any], detail: str = "") -> dict[str, np.ndarray]:
  image = record.get("image")
  return {"sample_id": np.str_(record.get("id", "")),
          "image": np.str_(image if isinstance(image, str) else ""),
          "bad_detail": np.str_(detail)}


def _no_image(config: PreprocessConfig) -> dict[str, np.ndarray]:
  """The image fields of a row without an image (zeros)."""
  if config.patches is not None:
    p = config.patches
    return {"pixel_values": np.zeros((p.max_patches, p.patch_dim), np.float32),
            "image_grid_thw": np.zeros(3, np.int32)}
  S = config.image_size
  return {"pixel_values": np.zeros((S, S, 3), np.float32)}


def _bad(record: Mapping[str, Any], config: PreprocessConfig, pad: int, reason: int,
         detail: str) -> dict[str, np.ndarray]:
  L = config.max_length
  return {**_names(record, detail or BAD_REASONS[reason]), **_no_image(config),
      "input_ids": np.full(L, pad, np.int32),
      "attention_mask": np.zeros(L, np.int32),
      "loss_mask": np.zeros(L, np.int32),
      "router_mask": np.zeros(L, np.int32),
      "has_image": np.int32(0),
      "ok": np.int32(0),
      "truncated": np.int32(reason == IMAGE_TRUNCATED),
      "bad_reason": np.int32(reason),
  }


def _conversations(record: Mapping[str, Any]) -> tuple[Optional[list], str]:
  """The record's validated conversations, or (None, what is wrong)."""
  conversations = record.get("conversations")
  if record.get("error") is not None or conversations is None:
    return None, str(record.get("error") or "no conversations")
  try:
    return templates.validate_conversations(conversations), ""
  except templates.ConversationError as e:
    return None, str(e)


def _tokenize(conversations: Any, tokenizer: Any, config: PreprocessConfig,
              num_image_tokens: Optional[int] = None) -> templates.EncodedSample:
  n = config.num_image_tokens if num_image_tokens is None else num_image_tokens
  return templates.tokenize_conversation(
      conversations, tokenizer, config.template, num_image_tokens=n,
      image_token_id=config.image_token_id, max_length=config.max_length,
      add_bos=config.add_bos)


def text_length(record: Mapping[str, Any], tokenizer: Any,
                config: PreprocessConfig) -> tuple[int, bool]:
  """(tokens, has image) of what `preprocess` makes of `record`, without opening its
  image: (0, False) for a record it rejects for its text (the packer's lengths)."""
  conversations, _ = _conversations(record)
  if conversations is None:
    return 0, False
  n = None
  if record.get("image") is not None:
    conversations = templates.ensure_image_placeholder(conversations)
    if config.patches is not None:  # Qwen2-VL: the image's size says its tokens
      try:
        n = config.patches.num_tokens(*images_lib.image_size_of(record["image"]))
      except images_lib.ImageError:
        return 0, False
  elif templates.has_image_placeholder(conversations):
    return 0, False
  try:
    enc = _tokenize(conversations, tokenizer, config, n)
  except (templates.ImageTruncatedError, templates.ConversationError):
    return 0, False
  return int(enc.num_tokens), enc.num_image_tokens > 0


def preprocess(record: Mapping[str, Any], tokenizer: Any,
               config: PreprocessConfig) -> dict[str, np.ndarray]:
  """One record ({"image", "conversations", ...}) -> one example of the batch contract.

  Data problems become ok=0 rows with a `bad_reason`; configuration problems (unknown
  template, tokenizer without eos) still raise, since every sample would fail.
  """
  pad = templates.pad_id(tokenizer)
  bad = lambda reason, detail="": _bad(record, config, pad, reason, detail)
  conversations, problem = _conversations(record)
  if conversations is None:
    return bad(MALFORMED_CONVERSATION, problem)

  image = record.get("image")
  fields, n = _no_image(config), None
  if image is not None:
    try:
      if config.patches is not None:  # Qwen2-VL: native resolution on a patch budget
        pixels, grid = images_lib.qwen2_vl_patches(images_lib.load_image(image),
                                                   config.patches, config.normalization)
        fields = {"pixel_values": pixels, "image_grid_thw": grid}
        n = int(np.prod(grid)) // config.patches.merge_size ** 2
      else:
        fields = {"pixel_values": images_lib.load_and_transform(
            image, image_size=config.image_size, normalization=config.normalization,
            pad_to_square=config.pad_to_square)}
    except images_lib.MissingImageError as e:
      return bad(MISSING_IMAGE, str(e))
    except images_lib.UnreadableImageError as e:
      return bad(UNREADABLE_IMAGE, str(e))
    conversations = templates.ensure_image_placeholder(conversations)
  elif templates.has_image_placeholder(conversations):
    # Image tokens with no image would feed garbage features to the model.
    return bad(MALFORMED_CONVERSATION, f"{templates.IMAGE_PLACEHOLDER} in a record "
               "without an image")

  try:
    enc = _tokenize(conversations, tokenizer, config, n)
  except templates.ImageTruncatedError as e:
    return bad(IMAGE_TRUNCATED, str(e))
  except templates.ConversationError as e:
    return bad(MALFORMED_CONVERSATION, str(e))
  has_image = enc.num_image_tokens > 0
  if not has_image:  # an image the conversation does not place is not fed
    fields = _no_image(config)
  return {
      "input_ids": enc.input_ids,
      "attention_mask": enc.attention_mask,
      "loss_mask": enc.loss_mask,
      "router_mask": enc.router_mask,
      **fields,
      "has_image": np.int32(has_image),
      "ok": np.int32(1),
      "truncated": np.int32(enc.truncated),
      "bad_reason": np.int32(OK),
      **_names(record),
  }


class Preprocess(grain.transforms.Map):
  """`preprocess` as a picklable grain transform (goes to multiprocess workers)."""

  def __init__(self, tokenizer: Any, config: PreprocessConfig):
    self.tokenizer = tokenizer
    self.config = config

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return preprocess(element, self.tokenizer, self.config)

  def __call__(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return self.map(element)

  def length(self, element: Mapping[str, Any]) -> tuple[int, bool]:
    """`text_length` of the record: its tokens and whether it holds an image."""
    return text_length(element, self.tokenizer, self.config)

  @property
  def pad_id(self) -> int:
    return templates.pad_id(self.tokenizer)


def summarize_bad(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
  """{reason name: count} over a batch (or over concatenated batches), all reasons."""
  codes = np.asarray(batch["bad_reason"]).reshape(-1)
  return {name: int(np.sum(codes == code)) for code, name in enumerate(BAD_REASONS)}


def num_samples(batch: Mapping[str, np.ndarray]) -> int:
  """Samples in a batch: one per row, or those of packed rows (`bad_reason` -1 marks an
  unused slot)."""
  return int(np.sum(np.asarray(batch["bad_reason"]) >= 0))


def bad_samples(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
  """(id, image, reason code, detail) of every bad sample in a batch (packed or not)."""
  flat = lambda k: np.asarray(batch[k]).reshape(-1)
  codes, ok = flat("bad_reason"), flat("ok")
  return [{"id": str(flat("sample_id")[i]), "image": str(flat("image")[i]),
           "reason": int(codes[i]), "detail": str(flat("bad_detail")[i])}
          for i in np.flatnonzero((ok == 0) & (codes >= 0))]


def make_plan(source: Any, transform: Preprocess, packing: packing_lib.PackingConfig, *,
              batch_size: int, seed: int, shuffle: bool = True,
              num_epochs: Optional[int] = None) -> packing_lib.Plan:
  """The packing (or length-bucket) plan of `source` for `make_pipeline(plan=...)`: the
  lengths of all its samples (text only), then rows per epoch (`packing.Plan`)."""
  if packing.max_length != transform.config.max_length:
    raise ValueError(f"packing max_length={packing.max_length} differs from the "
                     f"preprocessing's {transform.config.max_length}")
  lengths, images = packing_lib.sample_lengths(source, transform.length)
  return packing_lib.Plan(lengths, images, packing, seed=seed, shuffle=shuffle,
                          num_epochs=num_epochs, batch_size=batch_size)


class _BatchRows(grain.MapDataset):
  """Element t: rows `rows` of global batch t, where global batch t is elements
  [t * batch_size, (t + 1) * batch_size) of the parent. Only those elements are read
  (and transformed), so each process loads only its own rows."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, rows: Sequence[int]):
    super().__init__(parent)
    self._batch_size, self._rows = batch_size, tuple(rows)

  def __len__(self) -> int:
    return len(self._parent) // self._batch_size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return _stack([self._parent[index * self._batch_size + r] for r in self._rows])

  def __str__(self) -> str:
    return f"BatchRows(batch_size={self._batch_size}, rows={len(self._rows)})"


def _stack(elements: Sequence[Any]) -> Any:
  if isinstance(elements[0], Mapping):
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}
  return np.stack(elements)


def _ensure_absl_flags_parsed() -> None:
  # grain 0.2.18's multiprocess prefetch reads an absl flag (worker profiling) and
  # fails with UnparsedFlagAccessError in programs that never ran `absl.app.run`
  # (notebooks, pytest, plain scripts). Marking the flags parsed keeps their defaults.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_pipeline(source: Any, transform: Optional[Callable[[Any], Any]], *,
                  batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: Optional[int] = None, rows: Optional[Sequence[int]] = None,
                  worker_count: int = 0, worker_buffer_size: int = 2,
                  read_threads: int = 8, read_buffer_size: int = 64,
                  plan: Optional[packing_lib.Plan] = None) -> grain.IterDataset:
  """Source -> shuffle -> repeat -> global batches -> this process's rows [-> workers].

  `batch_size` is the GLOBAL batch: global batch t is the same samples whatever the
  number of processes, and a process loads only `rows` of it (default: all; the loop
  passes the rows its devices hold, `mesh.process_rows`), so a run on 2 hosts sees the
  data of a run on 1. Shuffling is global and different (but deterministic) every
  epoch; num_epochs=None repeats forever; an incomplete last batch is dropped.
  `iter(pipeline)` gives a grain DatasetIterator whose `get_state()` / `set_state()`
  restore the exact position (elements are addressed by index, and `transform` must be
  a pure function of the record, which `Preprocess` is). With worker_count > 0 whole
  batches are prepared in that many spawned worker processes (the order stays the
  same): the transform and source must pickle, and the main script must be import-safe
  (`if __name__ == "__main__":`).

  With a `plan` (`make_plan`: packed rows or length buckets) the rows are the plan's:
  row r holds the samples the plan gives it (its shuffle, epochs and seed are the
  plan's), and global batch t is rows [t * batch_size, (t + 1) * batch_size); the rest
  is as above (a process reads only its rows' samples, and resumes exactly).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  rows = tuple(range(batch_size)) if rows is None else tuple(rows)
  if not rows or any(not 0 <= r < batch_size for r in rows):
    raise ValueError(f"rows {rows} must be a non-empty subset of range({batch_size})")
  if plan is not None:
    if transform is None:
      raise ValueError("a packing plan needs the preprocessing transform")
    if plan.cfg.mode == "length_buckets" and plan.batch_size != batch_size:
      raise ValueError(f"the length-bucket plan has batches of {plan.batch_size}, the "
                       f"pipeline {batch_size}")
    ds = packing_lib.PlannedRows(source, transform, plan, transform.pad_id)
  else:
    ds = grain.MapDataset.source(source)
    if len(ds) == 0:
      raise ValueError(f"data source {source!r} is empty")
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if transform is not None:
      ds = ds.map(transform)
  ds = _BatchRows(ds, batch_size, rows).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return ds
