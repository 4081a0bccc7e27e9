"""Batched answers to a JSONL question file, in the layout of LLaVA's `model_vqa.py`.

In:  one {"question_id", "image", "text"} object per line ("image" relative to the
     image folder; absent or empty for a text-only question).
Out: one {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} object
     per question, in input order. The questions (fields, types, images) are all checked
     before any model work, and the answers file is replaced only once it is complete.

All prompts are encoded first and left-padded to one bucketed length, and the last
batch is filled up with copies, so the whole file runs through one compiled program.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import uuid
from typing import Any, Iterator, Optional

import jax
import numpy as np

from moe_vlm.data import images as images_lib
from moe_vlm.data import templates
from moe_vlm.files import OutputExistsError
from moe_vlm.infer.generate import GenerationConfig, generate, left_pad, until_stop
from moe_vlm.infer.load import InferenceModel

log = logging.getLogger("moe_vlm")


class QuestionError(ValueError):
  """Entries of a question file that cannot be answered (found before any model work)."""


_LISTED = 20  # problems named in one QuestionError; the rest are counted


def _raise_problems(problems: list[str], what: str) -> None:
  if problems:
    more = len(problems) - _LISTED
    listed = "\n  ".join(problems[:_LISTED]) + (f"\n  ... and {more} more" if more > 0 else "")
    raise QuestionError(f"{len(problems)} {what}; nothing was generated or written:\n  "
                        f"{listed}")


def question_problems(q: Any) -> list[str]:
  """What makes one parsed question unanswerable: missing fields, wrong types, or
  `<image>` in a question without an image. Empty when it is fine. No file access."""
  if not isinstance(q, dict):
    return [f"is a JSON {type(q).__name__}; expected an object with \"question_id\", "
            "\"text\" and optionally \"image\""]
  problems = [f"lacks {key!r}" for key in ("question_id", "text") if key not in q]
  qid = q.get("question_id")
  if "question_id" in q and (isinstance(qid, bool) or not isinstance(qid, (str, int))):
    problems.append(f"\"question_id\" is a {type(qid).__name__}; expected a string or an "
                    "integer")
  text = q.get("text")
  if "text" in q and not isinstance(text, str):
    problems.append(f"\"text\" is a {type(text).__name__} ({text!r}); expected a string")
  image = q.get("image")
  if image is not None and not isinstance(image, str):
    problems.append(f"\"image\" is a {type(image).__name__} ({image!r}); expected a path")
  elif isinstance(text, str) and not image and templates.IMAGE_PLACEHOLDER in text:
    problems.append(f"\"text\" contains {templates.IMAGE_PLACEHOLDER} but the question has "
                    "no \"image\": it would be answered about blank pixels (give the image, "
                    f"or remove {templates.IMAGE_PLACEHOLDER})")
  return problems


def read_questions(path: str) -> list[dict[str, Any]]:
  """JSONL questions; blank lines skipped. Every line is parsed and checked
  (`question_problems`); a QuestionError names each bad line, its number and id."""
  questions, problems = [], []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        q = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append(f"{path}:{n}: not JSON ({e})")
        continue
      qid = f" (question_id {q['question_id']!r})" if isinstance(q, dict) and \
          "question_id" in q else ""
      problems += [f"{path}:{n}{qid}: {p}" for p in question_problems(q)]
      questions.append(q)
  _raise_problems(problems, "bad question lines")
  if not questions:
    raise QuestionError(f"{path} holds no questions; nothing was generated or written")
  return questions


def check_images(questions: list[dict[str, Any]], image_folder: str) -> None:
  """Opens (fully decodes) every question's image; a QuestionError names each question
  whose image is missing or unreadable, with the path tried."""
  def problem(q):
    path = os.path.join(image_folder, q["image"])
    try:
      images_lib.load_image(path)
    except images_lib.ImageError as e:
      return f"question_id {q['question_id']!r}: image {path}: {e}"
    return None

  with_image = [q for q in questions if q.get("image")]
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    problems = [p for p in pool.map(problem, with_image) if p]
  _raise_problems(problems, "questions whose image cannot be used")


def load_questions(path: str, image_folder: Optional[str] = None) -> list[dict[str, Any]]:
  """`read_questions` + `check_images`: everything about the input that can fail, checked
  before a model is needed. image_folder defaults to the question file's directory."""
  questions = read_questions(path)
  check_images(questions, default_image_folder(path, image_folder))
  return questions


def default_image_folder(questions_path: str, image_folder: Optional[str] = None) -> str:
  return (os.path.dirname(os.path.abspath(questions_path)) if image_folder is None
          else image_folder)


def question_turns(text: str, has_image: bool) -> list[dict[str, str]]:
  """A single human turn; with an image, `<image>\\n` goes first unless the text places it
  (model_vqa.py's `DEFAULT_IMAGE_TOKEN + '\\n' + qs`). `<image>` without an image is
  refused: the model would be fed blank pixels for it."""
  if not has_image and templates.IMAGE_PLACEHOLDER in text:
    raise QuestionError(f"a question without an image contains {templates.IMAGE_PLACEHOLDER}: "
                        f"{text!r}")
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
  path = lambda q: os.path.join(image_folder, q["image"]) if q.get("image") else None
  encoded = [im.encode(question_turns(q["text"], bool(q.get("image"))), with_router_mask=True,
                       image=path(q)) for q in questions]
  prompts, spans = [p for p, _ in encoded], [r for _, r in encoded]
  length = bucket(max((len(p) for p in prompts), default=1))
  rng = jax.random.key(seed)
  for b, rows in enumerate(_batches(len(questions), batch_size)):
    pixels, grids = [], []
    for i in rows:
      try:
        pixels.append(im.image(path(questions[i])))
        grids.append(im.grid(path(questions[i])))
      except images_lib.ImageError as e:
        raise type(e)(f"question {questions[i]['question_id']!r}: {e}") from e
    fill = batch_size - len(rows)  # fixed batch shape: one compilation for every batch
    batch = [prompts[i] for i in rows] + [prompts[rows[-1]]] * fill
    ids, mask = left_pad(batch, im.pad_id, length)
    span = left_pad([spans[i] for i in rows] + [spans[rows[-1]]] * fill, 0, length)[0]
    grid = None if grids[0] is None else np.stack(grids + [grids[-1]] * fill)  # Qwen2-VL
    tokens = generate(im.model, ids, mask, np.stack(pixels + [pixels[-1]] * fill), config,
                      rng=jax.random.fold_in(rng, b), mesh=im.mesh, router_mask=span,
                      image_grid_thw=grid)
    yield [im.decode(t) for t in until_stop(tokens, config.eos_ids)[:len(rows)]]


def check_answers_path(answers_path: str, overwrite: bool) -> None:
  """An existing answers file is a user's file: replaced only with `overwrite`."""
  if os.path.exists(answers_path) and not overwrite:
    raise OutputExistsError(f"{answers_path} exists; pass --overwrite to replace it, or "
                            "choose another answers path")


def answer_file(im: InferenceModel, questions_path: str, answers_path: str, *,
                config: GenerationConfig, model_id: str, batch_size: int = 8,
                image_folder: Optional[str] = None, seed: int = 0,
                overwrite: bool = False) -> int:
  """Answers every question of `questions_path` into `answers_path`; returns the count.

  image_folder defaults to the question file's directory. Every question is checked
  first (`load_questions`: fields, types, each image opens), so a bad input fails before
  any model work. The answers go to a temporary file beside `answers_path`, renamed over
  it only when all are written: a failure leaves an existing answers file untouched, and
  one is replaced at all only with `overwrite`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")
  questions = load_questions(questions_path, image_folder)
  folder = default_image_folder(questions_path, image_folder)
  target = os.path.realpath(answers_path)  # a symlink's target is replaced, not the link
  if target == os.path.realpath(questions_path):
    raise QuestionError(f"the answers path {answers_path} is the questions file; refusing "
                        "to overwrite it")
  check_answers_path(answers_path, overwrite)
  done = 0
  answered = answer_questions(im, questions, image_folder=folder, config=config,
                              batch_size=batch_size, seed=seed)
  if jax.process_index() != 0:  # every process answers (one sharded model); 0 writes
    return sum(len(answers) for answers in answered)
  directory = os.path.dirname(target)
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    # os.open with mode 0o666: the finished file gets the umask's permissions, as `open` would.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as out:
      for answers in answered:
        for q, a in zip(questions[done:done + len(answers)], answers):
          out.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                                "text": a, "answer_id": uuid.uuid4().hex[:22],
                                "model_id": model_id, "metadata": {}}) + "\n")
        out.flush()
        done += len(answers)
        log.info("answered %d / %d questions", done, len(questions))
      os.fsync(out.fileno())
    if os.path.exists(target):
      shutil.copymode(target, tmp)  # a replaced answers file keeps its permissions
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return done
