"""MMBench: multiple choice with circular evaluation.

Questions: MMBench's released TSV (LLaVA uses `mmbench_dev_20230712.tsv`): columns index,
question, hint, A, B, C, D (as many letters as options), answer (not in test splits),
category, l2-category, split, image (base64; a short all-digit value refers to another
row's image by index). The circular copies are rows of their own: the same question with
its options rotated, index = base index + k * 1,000,000. Asked as LLaVA's
model_vqa_mmbench.py --single-pred-prompt: "[<hint>\\n]<question>\\nA. <a>\\nB. <b>...\\nAnswer
with the option's letter from the given choices directly."; an option cell that pandas
reads as missing (empty, "nan", "None", "N/A", ...) ends the options. The images are
decoded into `image_dir` (default: "<tsv name>_images/" beside it) as "<index>.<ext>".
Submission: `mmbench_submission.tsv`, what LLaVA's convert_mmbench_for_submission.py
uploads as xlsx (the TSV's columns without hint, category, source, image, comment,
l2-category, with "prediction" inserted as the 7th column), tab-separated because
openpyxl is not available here: open it in a spreadsheet and save as xlsx to upload.
Metric: circular accuracy as MMBench's evaluator (VLMEvalKit) computes it in its
exact-matching mode (no GPT helper): an answer's letter is the one option letter standing
alone in it (after replacing .()[],:;!*#{} by spaces), else the one option whose text it
contains (case-insensitive), else none (wrong); a question counts as right only if every
row sharing its index % 1,000,000 is right. Also the plain accuracy of the original rows
(index < 1,000,000), and circular accuracy per category and l2-category.
"""

from __future__ import annotations

import base64
import binascii
import collections
import csv
import os
import sys
from typing import Any, Optional, Sequence

from moe_vlm.eval.benchmarks import common
from moe_vlm.eval.questions import Question, QuestionFileError

CIRCULAR = 1_000_000
# The cells pandas' read_table reads as NaN by default, plus model_vqa_mmbench's is_none.
_MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                      "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                      "nan", "null"})
_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
_SPLITTERS = ".()[],:;!*#{}"


def is_missing(value: Optional[str]) -> bool:
  return value is None or value in _MISSING or value.strip().lower() in ("nan", "none", "")


def infer_letter(text: str, choices: Sequence[str]) -> Optional[str]:
  """The option letter an answer names (VLMEvalKit's can_infer: option first, then text)."""
  valid = common.letters(len(choices))
  spaced = text
  for ch in _SPLITTERS:
    spaced = spaced.replace(ch, " ")
  named = {w for w in spaced.split() if len(w) == 1 and w in valid}
  if len(named) == 1:
    return named.pop()
  lowered = text.lower()
  contained = [l for l, c in zip(valid, choices) if str(c).lower() in lowered]
  return contained[0] if len(contained) == 1 else None


def _read_tsv(path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the 128 KiB default
  try:
    with open(path, encoding="utf-8", newline="") as f:
      rows = list(csv.reader(f, delimiter="\t"))
  except FileNotFoundError:
    raise QuestionFileError(f"{path}: no such file") from None
  except csv.Error as e:
    raise QuestionFileError(f"{path} is not a readable TSV ({e})") from None
  if not rows:
    raise QuestionFileError(f"{path} is empty")
  header = rows[0]
  for column in ("index", "question", "A", "B"):
    if column not in header:
      raise QuestionFileError(f"{path}: no '{column}' column (MMBench's TSV has index, "
                              "question, hint, A, B, C, D, answer, category, image, ...)")
  out = []
  for n, row in enumerate(rows[1:], 2):
    if not any(cell.strip() for cell in row):
      continue
    if len(row) != len(header):
      raise QuestionFileError(f"{path}:{n}: {len(row)} cells for {len(header)} columns")
    out.append((n, dict(zip(header, row))))
  return header, out


def _extension(data: bytes) -> str:
  if data.startswith(b"\x89PNG"):
    return ".png"
  if data.startswith(b"GIF8"):
    return ".gif"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return ".webp"
  return ".jpg"


def _write_images(path: str, rows: list[tuple[int, dict[str, str]]],
                  all_rows: list[tuple[int, dict[str, str]]], image_dir: str) -> dict[int, str]:
  """index -> decoded image file for `rows`; a row whose image cell is an index shares that
  row's file (looked up in `all_rows`, so a `limit` may cut the row referred to)."""
  os.makedirs(image_dir, exist_ok=True)
  by_index = {int(r["index"]): (n, r) for n, r in all_rows}
  files: dict[int, str] = {}

  def decode(index: int, n: int, r: dict[str, str], seen: tuple[int, ...] = ()) -> str:
    if index in files:
      return files[index]
    cell = (r.get("image") or "").strip()
    if not cell:
      raise QuestionFileError(f"{path}:{n}: empty 'image' cell")
    if cell.isdigit() and len(cell) < 16:
      target = int(cell)
      if target not in by_index or target in seen + (index,):
        raise QuestionFileError(f"{path}:{n}: 'image' refers to index {target}, which has no "
                                "image")
      files[index] = decode(target, *by_index[target], seen + (index,))
      return files[index]
    try:
      data = base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError):
      raise QuestionFileError(f"{path}:{n}: 'image' is not base64") from None
    file = os.path.join(image_dir, f"{index}{_extension(data)}")
    if not (os.path.exists(file) and os.path.getsize(file) == len(data)):
      with open(file, "wb") as f:
        f.write(data)
    files[index] = file
    return file

  return {int(r["index"]): decode(int(r["index"]), n, r) for n, r in rows}


class MMBench(common.Benchmark):
  name = "mmbench"
  title = "MMBench"
  description = "MMBench (TSV): circular evaluation of option letters, submission TSV"

  def load_questions(self, path: str, *, limit: int = 0, image_dir: Optional[str] = None,
                     suffix: str = common.LETTER_ANSWER) -> list[Question]:
    """path: the released TSV; its base64 images are written to `image_dir`."""
    header, rows = _read_tsv(path)
    for n, r in rows:
      try:
        int(r["index"])
      except ValueError:
        raise QuestionFileError(f"{path}:{n}: 'index' is {r['index']!r}; expected an "
                                "integer") from None
    all_rows, rows = rows, rows[:limit] if limit else rows
    images = {}
    if "image" in header:
      images = _write_images(path, rows, all_rows,
                             image_dir or os.path.splitext(path)[0] + "_images")
    option_columns = [l for l in common.LETTERS if l in header]
    questions = []
    for n, r in rows:
      choices = []
      for column in option_columns:
        if is_missing(r[column]):
          break
        choices.append(r[column])
      if len(choices) < 2:
        raise QuestionFileError(f"{path}:{n}: fewer than two options in columns "
                                f"{', '.join(option_columns)}")
      text = r["question"]
      if not is_missing(r.get("hint")):
        text = f"{r['hint']}\n{text}"
      text += "".join(f"\n{l}. {c}" for l, c in zip(common.LETTERS, choices))
      if suffix:
        text += f"\n{suffix}"
      answer = r.get("answer")
      if not is_missing(answer) and answer.strip() not in set(common.letters(len(choices))):
        raise QuestionFileError(f"{path}:{n}: 'answer' is {answer!r}; expected one of "
                                f"{', '.join(common.letters(len(choices)))}")
      index = int(r["index"])
      questions.append(Question(
          question_id=index, text=text, image=images.get(index),
          answers=() if is_missing(answer) else (answer.strip(),),
          category=None if is_missing(r.get("category")) else r["category"],
          choices=tuple(choices),
          meta={"row": {k: v for k, v in r.items() if k != "image"}, "header": header,
                "l2-category": None if is_missing(r.get("l2-category")) else r["l2-category"],
                "split": r.get("split")}))
    return common.limited(questions, 0, path)

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str, *, name: str = "mmbench_submission") -> list[str]:
    """`<name>.tsv` with convert_mmbench_for_submission.py's columns."""
    common.check_lengths(questions, answers)
    header = questions[0].meta.get("header") or ["index", "question", "A", "B", "C", "D",
                                                 "answer", "split"]
    columns = [c for c in header if c not in _DROPPED]
    columns.insert(min(6, len(columns)), "prediction")
    path = os.path.join(out_dir, f"{name}.tsv")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
      writer = csv.writer(f, delimiter="\t", lineterminator="\n")
      writer.writerow(columns)
      for q, a in zip(questions, answers):
        row = dict(q.meta.get("row") or {})
        row.setdefault("index", str(q.question_id))
        row["prediction"] = a
        writer.writerow([row.get(c, "") for c in columns])
    return [path]

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    common.check_lengths(questions, answers)
    common.require(questions, lambda q: q.answers and q.choices, "MMBench",
                   "answer (test splits are scored by MMBench's server)")
    groups: dict[int, list[bool]] = collections.defaultdict(list)
    main: dict[int, Question] = {}
    plain = []
    for q, a in zip(questions, answers):
      index = int(q.question_id)
      hit = infer_letter(a, q.choices) == q.answers[0]
      groups[index % CIRCULAR].append(hit)
      if index < CIRCULAR:
        main[index] = q
        plain.append(float(hit))
      else:
        main.setdefault(index % CIRCULAR, q)
    circular = {base: float(all(hits)) for base, hits in groups.items()}
    by = {"categories": lambda q: q.category, "l2_categories": lambda q: q.meta.get("l2-category")}
    out: dict[str, Any] = {}
    for key, name_of in by.items():
      split = collections.defaultdict(list)
      for base, hit in circular.items():
        name = name_of(main[base])
        if name is not None:
          split[name].append(hit)
      out[key] = {k: common.entry(v) for k, v in sorted(split.items())}
    overall = {**common.entry(list(circular.values())), "rows": len(questions),
               "plain_accuracy": common.mean(plain), "plain_n": len(plain)}
    return {"overall": overall, **out, "headline": overall["accuracy"],
            "headline_metric": "circular accuracy (every rotation right), percent"}

  def markdown(self, results: dict[str, Any]) -> str:
    o = results["overall"]
    rows = [("all", o)] + list(results["l2_categories"].items())
    rows += list(results["categories"].items())
    return (common.accuracy_table(f"{self.title}: {results['headline_metric']}", rows) +
            f"\n{o['n']} questions in {o['rows']} rows; without the circular copies: "
            f"{common.fmt(o['plain_accuracy'])} on {o['plain_n']} original rows.\n")
