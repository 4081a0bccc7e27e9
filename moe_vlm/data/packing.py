"""Rows of real tokens: first-fit packing of several samples per row, or length buckets.

Padding every sample to `data.max_length` computes mostly padding: a MoE-LLaVA stage-1
sample is 576 image tokens and a caption in a 2048-token row. Two layouts avoid it
(`data.packing`):

- "first_fit": several samples per row of `max_length` tokens. Each sample is a
  segment (`segment_ids` 1, 2, ... in row order, 0 = the padding at the end of the
  row); the model attends only within a segment, restarts positions per segment, and
  fills each sample's image placeholders from its own image slot (`images_per_row`
  slots per row, filled in the order of the samples). Loss weights of a segment's
  first token are zeroed (nothing in the sample predicts it; the previous segment's
  last token must not). Per-sample metadata (ok, reason, id, ...) has `max_segments`
  slots per row, `bad_reason` -1 in the empty ones.
- "length_buckets": one sample per row as before, but a batch's rows are padded only
  to the smallest of `num_buckets` lengths (max_length x i / num_buckets) that holds its
  longest sample, and batches group samples of similar length (the JAX counterpart of
  the reference's dynamic padding with `group_by_modality_length`; one compiled step
  per bucket). The fallback where packing cannot apply.

The plan. Packing needs every sample's length, and multi-host training needs every
process to agree on which samples make global row r while loading only its own rows
(`mesh.process_rows`). So the lengths come first: `text_length` tokenizes a record
without opening its image (the tokenizer's output is what `preprocess` produces, to
the token), for every sample of the source, on every process. The plan of an epoch is
then a pure function of (lengths, seed, epoch): the epoch's shuffled order, packed
first-fit into rows (a sample goes into the first of `open_rows` open rows where its
tokens, its image and one more segment fit; when none fits the fullest open row is
closed), or cut into length-sorted batches. Row r of the run is row r of the
concatenated epochs' plans, so the rows are a random-access grain `MapDataset`, and
the iterator's checkpointed state is its position, as without packing: a resume is
exact. A sample whose image turns out to be missing or unreadable (known only when a
process loads it) becomes a bad sample of its row and leaves no tokens: the row is
laid out without it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import time
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import grain
import numpy as np

log = logging.getLogger("moe_vlm")

Mode = Literal["first_fit", "length_buckets"]
MODES = ("first_fit", "length_buckets")


@dataclasses.dataclass(frozen=True)
class PackingConfig:
  mode: Mode
  max_length: int
  images_per_row: int = 1     # image slots of a packed row
  max_segments: int = 64      # samples per packed row, at most
  open_rows: int = 64         # rows first-fit keeps open
  num_buckets: int = 4        # length_buckets: rows of max_length * i / num_buckets

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"packing mode {self.mode!r}: expected one of {MODES}")
    for name in ("max_length", "images_per_row", "max_segments", "open_rows",
                 "num_buckets"):
      if getattr(self, name) < 1:
        raise ValueError(f"PackingConfig.{name}={getattr(self, name)}: expected >= 1")

  def buckets(self) -> tuple[int, ...]:
    n = min(self.num_buckets, self.max_length)
    return tuple(sorted({-(-self.max_length * i // n) for i in range(1, n + 1)}))


def default_images_per_row(max_length: int, num_image_tokens: int) -> int:
  """Image slots a packed row needs at most: every sample an image and one more token."""
  return max(1, max_length // (num_image_tokens + 1))


# ------------------------------------------------------------------ the plans


def first_fit(order: np.ndarray, lengths: np.ndarray, images: np.ndarray,
              cfg: PackingConfig) -> list[np.ndarray]:
  """The samples of `order` packed into rows (lists of sample indices, in emission
  order). A sample goes into the first open row where its `lengths` tokens, its image
  (`images`) and one more segment fit; with none, the fullest open row is closed (when
  `open_rows` are open) and a new one opened. Samples keep their order within a row."""
  k = cfg.open_rows
  tokens = np.zeros(k, np.int64)
  slots = np.zeros(k, np.int64)
  segments = np.zeros(k, np.int64)
  members: list[Optional[list[int]]] = [None] * k
  opened = np.zeros(k, np.int64)  # creation order, to emit the last rows in it
  closed: list[np.ndarray] = []
  count = 0
  for idx in order:
    n, im = int(lengths[idx]), int(images[idx])
    fits = ((tokens + n <= cfg.max_length) & (slots + im <= cfg.images_per_row)
            & (segments < cfg.max_segments) & (segments > 0))
    if fits.any():
      j = int(np.argmax(fits))
    else:
      free = np.flatnonzero(segments == 0)
      if free.size:
        j = int(free[0])
      else:  # close the fullest open row
        j = int(np.argmax(tokens))
        closed.append(np.asarray(members[j], np.int64))
      tokens[j] = slots[j] = segments[j] = 0
      members[j] = []
      opened[j] = count
      count += 1
    members[j].append(int(idx))
    tokens[j] += n
    slots[j] += im
    segments[j] += 1
  for j in np.argsort(opened, kind="stable"):
    if segments[j]:
      closed.append(np.asarray(members[j], np.int64))
  return closed


def length_batches(order: np.ndarray, lengths: np.ndarray, cfg: PackingConfig,
                   batch_size: int, rng: np.random.Generator,
                   megabatch: int = 16) -> tuple[list[np.ndarray], list[int]]:
  """Batches of `batch_size` samples of similar length: the order is cut into groups of
  `megabatch` batches, each sorted by length (longest first) and cut into batches; each
  batch's row length is the smallest bucket that holds its longest sample. Batches are
  then shuffled; the samples of an incomplete last batch are left out."""
  buckets = np.asarray(cfg.buckets())
  batches, row_len = [], []
  size = batch_size * megabatch
  usable = len(order) - len(order) % batch_size
  for start in range(0, usable, size):
    group = np.asarray(order[start:min(start + size, usable)])
    group = group[np.argsort(-lengths[group], kind="stable")]
    for b in range(0, len(group), batch_size):
      members = group[b:b + batch_size]
      batches.append(members)
      longest = int(lengths[members].max())
      row_len.append(int(buckets[np.searchsorted(buckets, max(longest, 1))]))
  perm = rng.permutation(len(batches))
  return [batches[i] for i in perm], [row_len[i] for i in perm]


class Plan:
  """Which samples make each row of the run, epoch after epoch (see the module
  docstring). Row r -> (sample indices, row length). Epoch plans are computed when
  first needed; the last few are kept."""

  KEEP = 3

  def __init__(self, lengths: np.ndarray, images: np.ndarray, cfg: PackingConfig, *,
               seed: int, shuffle: bool = True, num_epochs: Optional[int] = None,
               batch_size: int = 1):
    self.lengths = np.asarray(lengths, np.int32)
    self.images = np.asarray(images, np.int8)
    self.cfg, self.seed, self.shuffle = cfg, int(seed), bool(shuffle)
    self.num_epochs, self.batch_size = num_epochs, int(batch_size)
    if not len(self.lengths):
      raise ValueError("packing: the data source is empty")
    if int(self.lengths.max()) > cfg.max_length:
      raise ValueError(f"packing: a sample of {int(self.lengths.max())} tokens is longer "
                       f"than max_length={cfg.max_length}")
    self._epochs: collections.OrderedDict[int, tuple[list[np.ndarray], list[int]]] = (
        collections.OrderedDict())
    self._counts: list[int] = []  # rows of epochs 0, 1, ... (as far as planned)

  def __getstate__(self):  # pickled to grain workers without the cached epochs
    state = dict(self.__dict__)
    state["_epochs"] = collections.OrderedDict()
    return state

  def order(self, epoch: int) -> np.ndarray:
    n = len(self.lengths)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.seed, epoch]).permutation(n)

  def epoch(self, epoch: int) -> tuple[list[np.ndarray], list[int]]:
    """(rows: sample indices of each, row lengths) of one epoch."""
    if epoch in self._epochs:
      self._epochs.move_to_end(epoch)
      return self._epochs[epoch]
    order = self.order(epoch)
    if self.cfg.mode == "first_fit":
      rows = first_fit(order, self.lengths, self.images, self.cfg)
      plan = (rows, [self.cfg.max_length] * len(rows))
    else:
      rng = np.random.default_rng([self.seed, epoch, 1])
      batches, lens = length_batches(order, self.lengths, self.cfg, self.batch_size, rng)
      rows = [np.asarray([i]) for b in batches for i in b]
      plan = (rows, [n for b, n in zip(batches, lens) for _ in b])
    self._epochs[epoch] = plan
    while len(self._epochs) > self.KEEP:
      self._epochs.popitem(last=False)
    return plan

  def rows_in_epoch(self, epoch: int) -> int:
    while len(self._counts) <= epoch:
      self._counts.append(len(self.epoch(len(self._counts))[0]))
    return self._counts[epoch]

  def __len__(self) -> int:
    if self.num_epochs is None:
      return sys.maxsize
    return sum(self.rows_in_epoch(e) for e in range(self.num_epochs))

  def locate(self, row: int) -> tuple[int, int]:
    """(epoch, row within it) of run row `row`."""
    epoch = 0
    while True:
      if self.num_epochs is not None and epoch >= self.num_epochs:
        raise IndexError(f"row {row} is past the {self.num_epochs} epochs of the plan")
      n = self.rows_in_epoch(epoch)
      if row < n:
        return epoch, row
      row -= n
      epoch += 1

  def row(self, row: int) -> tuple[np.ndarray, int]:
    epoch, i = self.locate(row)
    rows, lens = self.epoch(epoch)
    return rows[i], lens[i]

  def pad_fraction(self, epoch: int = 0) -> float:
    """Padding share of the tokens of an epoch's rows."""
    rows, lens = self.epoch(epoch)
    real = sum(int(self.lengths[r].sum()) for r in rows)
    return 1.0 - real / max(sum(lens), 1)


def sample_lengths(source: Any, length_fn: Callable[[Any], tuple[int, bool]]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, has image) of every record of `source`, by `length_fn`."""
  t0 = time.perf_counter()
  n = len(source)
  lengths, images = np.zeros(n, np.int32), np.zeros(n, np.int8)
  for i in range(n):
    lengths[i], images[i] = length_fn(source[i])
  if n > 10000:
    log.info("packing: lengths of %d samples in %.1f s", n, time.perf_counter() - t0)
  return lengths, images


# ------------------------------------------------------------ rows, materialised

SAMPLE_KEYS = ("ok", "truncated", "bad_reason", "sample_id", "image", "bad_detail")


def pack_examples(examples: Sequence[Mapping[str, np.ndarray]], cfg: PackingConfig,
                  pad_id: int) -> dict[str, np.ndarray]:
  """Preprocessed examples (each right-padded, `pipeline.preprocess`) -> one packed row.

  Good examples are laid out one after another as segments 1, 2, ...; bad ones leave
  no tokens but keep their metadata slot."""
  if len(examples) > cfg.max_segments:
    raise ValueError(f"{len(examples)} samples for one row; max_segments={cfg.max_segments}")
  length, slots = cfg.max_length, cfg.images_per_row
  image_shape = examples[0]["pixel_values"].shape
  row = dict(input_ids=np.full(length, pad_id, np.int32),
             attention_mask=np.zeros(length, np.int32),
             loss_mask=np.zeros(length, np.int32),
             router_mask=np.zeros(length, np.int32),
             segment_ids=np.zeros(length, np.int32),
             pixel_values=np.zeros((slots,) + image_shape, np.float32),
             has_image=np.zeros(slots, np.int32))
  if "image_grid_thw" in examples[0]:  # Qwen2-VL: each slot's patch grid
    row["image_grid_thw"] = np.zeros((slots, 3), np.int32)
  meta = dict(ok=np.zeros(cfg.max_segments, np.int32),
              truncated=np.zeros(cfg.max_segments, np.int32),
              bad_reason=np.full(cfg.max_segments, -1, np.int32),
              sample_id=np.full(cfg.max_segments, "", dtype=object),
              image=np.full(cfg.max_segments, "", dtype=object),
              bad_detail=np.full(cfg.max_segments, "", dtype=object))
  pos = segment = image = 0
  for slot, ex in enumerate(examples):
    for key in SAMPLE_KEYS:
      meta[key][slot] = ex[key]
    if not int(ex["ok"]):
      continue
    n = int(np.sum(ex["attention_mask"]))
    if pos + n > length or (int(ex["has_image"]) and image >= slots):
      raise ValueError(f"sample {ex['sample_id']!s} does not fit its packed row: the plan's "
                       "length differs from the preprocessed one")
    segment += 1
    span = slice(pos, pos + n)
    row["input_ids"][span] = ex["input_ids"][:n]
    row["attention_mask"][span] = 1
    row["loss_mask"][span] = ex["loss_mask"][:n]
    row["loss_mask"][pos] = 0  # nothing of this sample predicts its first token
    row["router_mask"][span] = ex["router_mask"][:n]
    row["segment_ids"][span] = segment
    if int(ex["has_image"]):
      row["pixel_values"][image] = ex["pixel_values"]
      row["has_image"][image] = 1
      if "image_grid_thw" in row:
        row["image_grid_thw"][image] = ex["image_grid_thw"]
      image += 1
    pos += n
  meta = {k: (v.astype(str) if v.dtype == object else v) for k, v in meta.items()}
  return {**row, **meta}


def cut_example(example: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """A preprocessed example with its token arrays cut to `length` (a bucket)."""
  out = dict(example)
  for key in ("input_ids", "attention_mask", "loss_mask", "router_mask"):
    out[key] = np.asarray(example[key])[:length]
  return out


class PlannedRows(grain.MapDataset):
  """Row r of `plan`, materialised: its samples read from `source`, preprocessed by
  `transform`, and packed (first_fit) or cut to the row length (length_buckets). Only
  the rows asked for are read, so each process loads only its own rows."""

  def __init__(self, source: Any, transform: Callable[[Any], Mapping[str, np.ndarray]],
               plan: Plan, pad_id: int):
    super().__init__(grain.MapDataset.source(source))
    self._source, self._transform, self._plan, self._pad_id = source, transform, plan, pad_id

  def __len__(self) -> int:
    return len(self._plan)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    samples, length = self._plan.row(int(index))
    examples = [self._transform(self._source[int(i)]) for i in samples]
    if self._plan.cfg.mode == "first_fit":
      return pack_examples(examples, self._plan.cfg, self._pad_id)
    return cut_example(examples[0], length)

  def __str__(self) -> str:
    return f"PlannedRows(mode={self._plan.cfg.mode}, samples={len(self._plan.lengths)})"
