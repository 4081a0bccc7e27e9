"""Batched answers to a JSONL question file, in the layout of LLaVA's `model_vqa.py`.

In:  one {"question_id", "image", "text"} object per line ("image" relative to the
     image folder; absent or empty for a text-only question).
Out: one {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} object
     per question, in input order, written as each batch finishes.

All prompts are encoded first and left-padded to one bucketed length, and the last
batch is filled up with copies, so the whole file runs through one compiled program.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any, Iterator, Optional

import jax
import numpy as np

from moe_vlm.data import images as images_lib
from moe_vlm.data import templates
from moe_vlm.infer.generate import GenerationConfig, generate, left_pad, until_stop
from moe_vlm.infer.load import InferenceModel

log = logging.getLogger("moe_vlm")


def read_questions(path: str) -> list[dict[str, Any]]:
  """JSONL questions; blank lines skipped, a malformed line raises naming its number."""
  questions = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        q = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e})") from None
      missing = [k for k in ("question_id", "text") if k not in q]
      if missing:
        raise ValueError(f"{path}:{n}: question lacks {missing}")
      questions.append(q)
  return questions


def question_turns(text: str, has_image: bool) -> list[dict[str, str]]:
  """A single human turn; with an image, `<image>\\n` goes first unless the text places it
  (model_vqa.py's `DEFAULT_IMAGE_TOKEN + '\\n' + qs`)."""
  turns = [{"from": templates.HUMAN, "value": text}]
  return templates.ensure_image_placeholder(turns) if has_image else turns


def bucket(n: int, multiple: int = 16) -> int:
  """Rounds a prompt length up, so nearby lengths share one compiled program."""
  return -(-n // multiple) * multiple


def _batches(n: int, size: int) -> Iterator[range]:
  for start in range(0, n, size):
    yield range(start, min(start + size, n))


def answer_questions(im: InferenceModel, questions: list[dict[str, Any]], *,
                     image_folder: str, config: GenerationConfig, batch_size: int,
                     seed: int = 0) -> Iterator[list[str]]:
  """Yields the answers batch by batch (in question order)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")
  prompts = [im.encode(question_turns(q["text"], bool(q.get("image")))) for q in questions]
  length = bucket(max((len(p) for p in prompts), default=1))
  rng = jax.random.key(seed)
  for b, rows in enumerate(_batches(len(questions), batch_size)):
    pixels = []
    for i in rows:
      image = questions[i].get("image")
      try:
        pixels.append(im.image(os.path.join(image_folder, image) if image else None))
      except images_lib.ImageError as e:
        raise type(e)(f"question {questions[i]['question_id']!r}: {e}") from e
    fill = batch_size - len(rows)  # fixed batch shape: one compilation for every batch
    batch = [prompts[i] for i in rows] + [prompts[rows[-1]]] * fill
    ids, mask = left_pad(batch, im.pad_id, length)
    tokens = generate(im.model, ids, mask, np.stack(pixels + [pixels[-1]] * fill), config,
                      rng=jax.random.fold_in(rng, b), mesh=im.mesh)
    yield [im.decode(t) for t in until_stop(tokens, config.eos_ids)[:len(rows)]]


def answer_file(im: InferenceModel, questions_path: str, answers_path: str, *,
                config: GenerationConfig, model_id: str, batch_size: int = 8,
                image_folder: Optional[str] = None, seed: int = 0) -> int:
  """Answers every question of `questions_path` into `answers_path`; returns the count.

  image_folder defaults to the question file's directory.
  """
  questions = read_questions(questions_path)
  folder = os.path.dirname(os.path.abspath(questions_path)) if image_folder is None \
      else image_folder
  os.makedirs(os.path.dirname(os.path.abspath(answers_path)), exist_ok=True)
  done = 0
  with open(answers_path, "w") as out:
    for answers in answer_questions(im, questions, image_folder=folder, config=config,
                                    batch_size=batch_size, seed=seed):
      for q, a in zip(questions[done:done + len(answers)], answers):
        out.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                              "text": a, "answer_id": uuid.uuid4().hex[:22],
                              "model_id": model_id, "metadata": {}}) + "\n")
      out.flush()
      done += len(answers)
      log.info("answered %d / %d questions", done, len(questions))
  return done
