"""Batched answering: question -> prompt ids, fixed-shape batches through `greedy_generate`.

Every batch has the same shape (the last one is filled with copies of its last row,
and all prompts are left-padded to one length), so decoding compiles once per run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from moe_vlm.data import images as images_lib
from moe_vlm.data import templates
from moe_vlm.eval.questions import Question
from moe_vlm.infer.generate import greedy_generate
from moe_vlm.infer.load import InferenceModel

# Prompt buffers are rounded up to a multiple of this: fewer distinct shapes to compile.
LENGTH_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Batch:
  """One fixed-shape generation batch; rows past `size` repeat the last real row."""
  indices: Sequence[int]  # positions of the real rows in the caller's list
  prompts: list[np.ndarray]  # [batch_size] unpadded prompt ids
  pixels: np.ndarray  # [batch_size, H, W, 3]
  prompt_length: int  # the left-padded prompt buffer
  new_tokens: list[list[int]]  # [batch_size] generated ids (eos excluded)
  grids: Optional[np.ndarray] = None  # [batch_size, 3]: Qwen2-VL's image grids

  @property
  def size(self) -> int:
    return len(self.indices)


def question_turns(text: str, has_image: bool) -> list[dict[str, str]]:
  """One human turn, the image first as in LLaVA's model_vqa ("<image>\\n" + question)."""
  value = f"{templates.IMAGE_PLACEHOLDER}\n{text}" if has_image else text
  return [{"from": templates.HUMAN, "value": value}]


def pixels_loader(image_root: str, image_size: int,
                  normalization: str) -> Callable[[Optional[str]], np.ndarray]:
  """image path (relative to `image_root`) or None -> float32 [H, W, 3] (zeros if None)."""
  def load(image: Optional[str]) -> np.ndarray:
    if not image:
      return np.zeros((image_size, image_size, 3), np.float32)
    return images_lib.load_and_transform(os.path.join(image_root, image),
                                         image_size=image_size, normalization=normalization)
  return load


def generate_batches(model: Any, tokenizer: Any, prompts: Sequence[np.ndarray],
                     pixels_of: Callable[[int], np.ndarray], *, batch_size: int,
                     max_new_tokens: int, stop_ids: Sequence[int] = (),
                     on_batch: Optional[Callable[[Batch], None]] = None,
                     mesh: Any = None,
                     router_masks: Optional[Sequence[np.ndarray]] = None,
                     grids_of: Optional[Callable[[int], np.ndarray]] = None
                     ) -> list[list[int]]:
  """Greedy answers (token ids, eos excluded) for every prompt, `batch_size` at a time.

  `pixels_of(i)` loads prompt i's image lazily (one batch of images in memory at a time);
  `on_batch` sees each batch after decoding (routing statistics use it). Decoding stops
  at eos; answers are also cut at any of `stop_ids` (chat templates' end-of-turn marks).
  With `mesh` (the model's parameters placed on it) the batch is split over it too.
  `router_masks`: each prompt's router span (Awaker's instance router; `templates`).
  `grids_of(i)`: Qwen2-VL, prompt i's image grid (its pixels are then patches).
  """
  if not prompts:
    return []
  length = -(-max(len(p) for p in prompts) // LENGTH_BUCKET) * LENGTH_BUCKET
  pad_id = templates.pad_id(tokenizer)
  stops = set(int(t) for t in stop_ids)
  out: list[list[int]] = []
  for start in range(0, len(prompts), batch_size):
    idx = range(start, min(start + batch_size, len(prompts)))
    fill = batch_size - len(idx)
    rows = [prompts[i] for i in idx] + [prompts[idx[-1]]] * fill
    pixels = [pixels_of(i) for i in idx]
    pixels = np.stack(pixels + [pixels[-1]] * fill)
    spans = (None if router_masks is None else
             [router_masks[i] for i in idx] + [router_masks[idx[-1]]] * fill)
    grids = None
    if grids_of is not None:
      grids = [grids_of(i) for i in idx]
      grids = np.stack(grids + [grids[-1]] * fill)
    new = greedy_generate(model, rows, pixels, pad_id=pad_id, eos_id=tokenizer.eos_token_id,
                          max_new_tokens=max_new_tokens, prompt_length=length, mesh=mesh,
                          router_masks=spans, image_grid_thw=grids)
    new = [_until(row, stops) for row in new]
    out += new[:len(idx)]
    if on_batch is not None:
      on_batch(Batch(indices=idx, prompts=rows, pixels=pixels, prompt_length=length,
                     new_tokens=new, grids=grids))
  return out


def _until(tokens: Sequence[int], stops: set[int]) -> list[int]:
  tokens = [int(t) for t in tokens]
  return tokens[:next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


def decode(tokenizer: Any, tokens: Sequence[Sequence[int]]) -> list[str]:
  return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def answer(im: InferenceModel, questions: Sequence[Question], *, image_root: str,
           batch_size: int, max_new_tokens: int,
           on_batch: Optional[Callable[[Batch], None]] = None) -> list[str]:
  """The model's greedy answer text to each question (images relative to image_root)."""
  path = lambda q: os.path.join(image_root, q.image) if q.image else None
  encoded = [im.encode(question_turns(q.text, q.image is not None), with_router_mask=True,
                       image=path(q)) for q in questions]
  prompts, spans = [p for p, _ in encoded], [r for _, r in encoded]

  def pixels_of(i: int) -> np.ndarray:
    try:
      return im.image(path(questions[i]))
    except images_lib.ImageError as e:
      raise type(e)(f"question {questions[i].question_id!r}: {e}") from e

  grids_of = (lambda i: im.grid(path(questions[i]))) if im.cfg.vision.native else None
  tokens = generate_batches(im.model, im.tokenizer, prompts, pixels_of,
                            batch_size=batch_size, max_new_tokens=max_new_tokens,
                            stop_ids=im.stop_ids, on_batch=on_batch, mesh=im.mesh,
                            router_masks=spans, grids_of=grids_of)
  return [im.decode(t) for t in tokens]
