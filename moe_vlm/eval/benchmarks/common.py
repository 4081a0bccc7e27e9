"""What the benchmark modules share: the `Benchmark` interface, reading files with errors
that name the file and field, matching an answer file to its questions, EvalAI's answer
processing, option letters and small markdown tables.

Answers are matched to questions by "question_id" (compared as strings, so 7 and "7"
agree). Where a question file repeats ids - LLaVA's MME file gives both questions of an
image the image's id, its TextVQA file uses the image id - answers are matched by
(question_id, prompt), the prompt compared with whitespace collapsed and "<image>" removed,
which is what LLaVA's own converters do for those benchmarks.
"""

from __future__ import annotations

import collections
import json
import os
import string
from typing import Any, Iterable, Optional, Sequence

from moe_vlm.data.templates import IMAGE_PLACEHOLDER
from moe_vlm.eval import metrics
from moe_vlm.eval.questions import Question, QuestionFileError

# The response-format prompts of LLaVA-1.5's (and MoE-LLaVA's) evaluation files and scripts.
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
LETTERS = string.ascii_uppercase


class AnswerFileError(ValueError):
  """An answer file does not have the expected layout or does not fit its questions."""


class Benchmark:
  """One benchmark: its released question files in, LLaVA's submission layout out, its metric.

  Subclasses set `name` (the `--task` name), `title` (as in the paper's table) and
  `description` (one line for `--help`), and implement the three methods below. `score`
  returns a JSON-able dict with at least "headline" (the paper's number for this
  benchmark, or None where no local metric exists) and "headline_metric" (what it is).
  """
  name: str = ""
  title: str = ""
  description: str = ""
  has_metric: bool = True  # False: scored elsewhere (MM-Vet's GPT grader)

  def load_questions(self, path: str, *, limit: int = 0, **kw: Any) -> list[Question]:
    """The benchmark's question file(s) as `Question`s with the prompt LLaVA-1.5 asks."""
    raise NotImplementedError

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str) -> list[str]:
    """Writes the answers in the layout LLaVA's scripts submit / convert; returns the paths."""
    raise NotImplementedError

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    """The benchmark's metric of `answers` (aligned with `questions`), in percent."""
    raise NotImplementedError

  def markdown(self, results: dict[str, Any]) -> str:
    """`score`'s result as a markdown table (overall, then per category)."""
    rows = [("all", results["overall"])] + list(results.get("categories", {}).items())
    return accuracy_table(f"{self.title}: {results['headline_metric']}", rows)

  def __repr__(self) -> str:
    return f"<benchmark {self.name}: {self.description}>"


# ------------------------------------------------------------------ files


def read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise QuestionFileError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise QuestionFileError(f"{path} is a directory; expected a file") from None


def read_json(path: str) -> Any:
  """A whole-file JSON document, or an error naming the file and the position."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise QuestionFileError(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None


def json_document(path: str) -> Optional[Any]:
  """The file as one JSON document, or None when it is not one (JSONL: one per line)."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError:
    return None


def field(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
  """record[key], checked to be a `kind`; the error names where the record came from."""
  if not isinstance(record, dict):
    raise QuestionFileError(f"{where} is a {type(record).__name__}; expected an object")
  if key not in record:
    raise QuestionFileError(f"{where}: no '{key}' field")
  value = record[key]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise QuestionFileError(f"{where}: '{key}' is {value!r}; expected {names}")
  return value


def limited(questions: list[Question], limit: int, path: str) -> list[Question]:
  if not questions:
    raise QuestionFileError(f"{path} holds no questions")
  return questions[:limit] if limit else questions


def require(questions: Sequence[Question], has: Any, task: str, what: str) -> None:
  """Raises when a question lacks the ground truth `has(q)` checks for (e.g. a test split)."""
  missing = [q.question_id for q in questions if not has(q)]
  if missing:
    raise QuestionFileError(
        f"{task}: {len(missing)} of {len(questions)} questions have no {what} (first: "
        f"{missing[0]!r}); load the split with its annotations to score it")


def check_lengths(questions: Sequence[Question], answers: Sequence[str]) -> None:
  if len(questions) != len(answers):
    raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
  if not questions:
    raise ValueError("no questions to score")


def write_json(path: str, obj: Any, indent: Optional[int] = None) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=indent, ensure_ascii=False)
  return path


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return path


# ------------------------------------------------------------------ answer files


def read_answers(path: str) -> list[tuple[str, dict[str, Any]]]:
  """(where, record) for each line of an answers JSONL (LLaVA's model_vqa layout: at least
  "question_id" and "text"; "prompt" where ids repeat)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise AnswerFileError(f"{path}: no such file") from None
  out = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise AnswerFileError(f"{where} is not JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise AnswerFileError(f"{where} is a {type(record).__name__}; expected an object")
    if record.get("question_id") is None:
      raise AnswerFileError(f"{where}: no 'question_id'")
    if not isinstance(record.get("text"), str):
      raise AnswerFileError(f"{where}: 'text' is {record.get('text')!r}; expected the answer "
                            "string")
    out.append((where, record))
  if not out:
    raise AnswerFileError(f"{path} holds no answers")
  return out


def prompt_key(prompt: str) -> str:
  return " ".join(prompt.replace(IMAGE_PLACEHOLDER, " ").split())


def match_answers(questions: Sequence[Question], records: Sequence[tuple[str, dict[str, Any]]],
                  *, path: str = "answers", missing: str = "error"
                  ) -> tuple[list[str], dict[str, int]]:
  """Each question's answer text from `read_answers` records, in question order.

  missing="error" raises when a question has no answer; "wrong" scores it as the empty
  answer (wrong under every metric here, as eval_science_qa's "FAILED"). Answers to
  questions not in the list are ignored and counted ("unmatched"). A second answer to the
  same question is an error (which one counts would be a guess).
  """
  if missing not in ("error", "wrong"):
    raise ValueError(f"missing={missing!r}: expected 'error' or 'wrong'")
  ids = [str(q.question_id) for q in questions]
  by_prompt = len(set(ids)) < len(ids)

  def key_of(q: Question) -> Any:
    return (str(q.question_id), prompt_key(q.text)) if by_prompt else str(q.question_id)

  pool: dict[Any, collections.deque] = collections.defaultdict(collections.deque)
  for where, r in records:
    if by_prompt:
      if not isinstance(r.get("prompt"), str):
        raise AnswerFileError(
            f"{where}: no 'prompt' string; the question file repeats question ids, so "
            "answers are matched by (question_id, prompt)")
      key = (str(r["question_id"]), prompt_key(r["prompt"]))
    else:
      key = str(r["question_id"])
    pool[key].append((where, r["text"]))
  wanted = collections.Counter(key_of(q) for q in questions)
  for key, items in pool.items():
    if 0 < wanted[key] < len(items):
      raise AnswerFileError(f"{items[wanted[key]][0]}: another answer to question "
                            f"{key[0] if by_prompt else key!r} (each question is answered once)")
  texts, absent = [], []
  for q in questions:
    items = pool.get(key_of(q))
    if items:
      texts.append(items.popleft()[1])
    else:
      absent.append(q.question_id)
      texts.append("")
  if absent and missing == "error":
    how = "(question_id, prompt)" if by_prompt else "question_id"
    raise AnswerFileError(
        f"{path}: no answer to {len(absent)} of {len(questions)} questions (first: "
        f"{absent[0]!r}, matched by {how}); pass missing='wrong' to score them as wrong")
  return texts, {"missing": len(absent), "unmatched": sum(len(v) for v in pool.values())}


# ------------------------------------------------------------------ answers


def evalai_answer(text: str) -> str:
  """EvalAI's answer processing (mmf's EvalAIAnswerProcessor, in LLaVA's m4c_evaluator.py):
  what LLaVA's VQAv2 / VizWiz converters submit and TextVQA's evaluator compares.

  It lowercases, drops commas and question marks, splits off "'s", then applies the VQA
  normalisation (`metrics.normalize_answer`, whose comma-in-number rule cannot fire once
  the commas are gone - as in EvalAI's).
  """
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  return metrics.normalize_answer(text)


def letters(n: int) -> str:
  if n > len(LETTERS):
    raise ValueError(f"{n} options; at most {len(LETTERS)} can be lettered")
  return LETTERS[:n]


def mean(values: Sequence[float]) -> Optional[float]:
  return 100 * sum(values) / len(values) if values else None


def entry(hits: Sequence[float]) -> dict[str, Any]:
  return {"accuracy": mean(hits), "n": len(hits)}


def by_category(questions: Sequence[Question], hits: Sequence[float]) -> dict[str, Any]:
  groups = collections.defaultdict(list)
  for q, h in zip(questions, hits):
    if q.category is not None:
      groups[q.category].append(h)
  return {k: entry(v) for k, v in sorted(groups.items())}


# ------------------------------------------------------------------ markdown


def fmt(value: Optional[float], digits: int = 2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def accuracy_table(title: str, rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
  lines = [f"## {title}", "", "| split | questions | accuracy |", "|---|---|---|"]
  lines += [f"| {name} | {m['n']} | {fmt(m['accuracy'])} |" for name, m in rows]
  return "\n".join(lines) + "\n"
