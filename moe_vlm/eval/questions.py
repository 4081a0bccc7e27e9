"""Benchmark question files in, LLaVA-layout answer files out.

Read:
  * LLaVA's JSONL question files (POPE `llava_pope_test.jsonl`, VQAv2/GQA/TextVQA):
    one object per line with "question_id", "image", "text" and, for scoring, "label"
    (POPE) or "answer" / "answers" (VQA; a list of strings or of {"answer": ...});
    "category" when present splits the results.
  * Our synthetic `pope.json` / `eval.json`: one JSON list of records with "id",
    "image", "question", "label" or "answer", "category" or "type", "conversations".
Written: the answer JSONL that LLaVA's eval scripts (eval_pope.py, convert_*_for_submission)
read: {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Iterable, Mapping, Optional, Sequence

from moe_vlm.data.templates import IMAGE_PLACEHOLDER


class QuestionFileError(ValueError):
  """A question file or record does not have the expected layout."""


@dataclasses.dataclass(frozen=True)
class Question:
  question_id: Any  # kept as found (LLaVA's POPE ids are ints): answers echo it back
  text: str  # the prompt text, without the image placeholder
  image: Optional[str] = None  # path relative to the image root; None: text-only
  label: Optional[str] = None  # POPE: "yes" / "no"
  answers: tuple[str, ...] = ()  # VQA reference answers
  category: Optional[str] = None  # POPE negative sampling, VQA question type, ...
  # Multiple choice (ScienceQA, MMBench): the option texts in letter order A, B, C, ...
  choices: tuple[str, ...] = ()
  # Benchmark extras a scorer or submission writer needs (MME's original question, MMBench's
  # TSV row, ...); read-only by convention, and left out of the hash.
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


def _answers(value: Any, where: str) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (list, tuple)):
    out = []
    for a in value:
      a = a.get("answer") if isinstance(a, dict) else a
      if not isinstance(a, str):
        raise QuestionFileError(f"{where}: answers must be strings or {{'answer': str}}")
      out.append(a)
    return tuple(out)
  raise QuestionFileError(f"{where}: 'answers' is a {type(value).__name__}; expected a list")


def _text(record: dict, where: str) -> str:
  conversations = record.get("conversations")
  if isinstance(record.get("text"), str):
    text = record["text"]
  elif conversations:
    # Synthetic records: the first human turn is the exact prompt the model trained on.
    text = conversations[0].get("value") if isinstance(conversations[0], dict) else None
  else:
    text = record.get("question")
  if not isinstance(text, str):
    raise QuestionFileError(f"{where}: no 'text', 'conversations' or 'question' string")
  return text.replace(IMAGE_PLACEHOLDER, "").strip()


def parse_question(record: Any, where: str) -> Question:
  if not isinstance(record, dict):
    raise QuestionFileError(f"{where} is a {type(record).__name__}; expected an object")
  qid = record.get("question_id", record.get("id"))
  if qid is None:
    raise QuestionFileError(f"{where}: no 'question_id' (or 'id')")
  label = record.get("label")
  if label is not None and not isinstance(label, str):
    raise QuestionFileError(f"{where}: 'label' is {label!r}; expected 'yes' or 'no'")
  answers = _answers(record.get("answers", record.get("answer")), where)
  category = record.get("category", record.get("type"))
  return Question(question_id=qid, text=_text(record, where), image=record.get("image") or None,
                  label=label, answers=answers,
                  category=None if category is None else str(category))


def load_questions(path: str, limit: int = 0) -> list[Question]:
  """A JSONL file (one question per line) or a JSON list; `limit` > 0 keeps the first."""
  with open(path, encoding="utf-8") as f:
    content = f.read()
  if content.lstrip().startswith("["):
    records = [(f"{path}[{i}]", r) for i, r in enumerate(json.loads(content))]
  else:
    records = []
    for n, line in enumerate(content.splitlines(), 1):
      if not line.strip():
        continue
      try:
        records.append((f"{path}:{n}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise QuestionFileError(f"{path}:{n} is not JSON ({e.msg})") from None
  if limit:
    records = records[:limit]
  if not records:
    raise QuestionFileError(f"{path} holds no questions")
  return [parse_question(r, where) for where, r in records]


def answer_id(model_id: str, question_id: Any) -> str:
  # LLaVA draws a random shortuuid; a name-based one makes reruns byte-identical.
  return uuid.uuid5(uuid.NAMESPACE_URL, f"moe_vlm/{model_id}/{question_id}").hex


def answer_records(questions: Sequence[Question], texts: Sequence[str],
                   model_id: str) -> list[dict[str, Any]]:
  """LLaVA's model_vqa(_loader) output lines: "prompt" is the question text as asked."""
  if len(questions) != len(texts):
    raise ValueError(f"{len(texts)} answers for {len(questions)} questions")
  return [{"question_id": q.question_id, "prompt": q.text, "text": t,
           "answer_id": answer_id(model_id, q.question_id), "model_id": model_id,
           "metadata": {}} for q, t in zip(questions, texts)]


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
