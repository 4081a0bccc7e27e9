"""GQA testdev-balanced: exact match after LLaVA's answer processing.

Questions, either
  * GQA's released `testdev_balanced_questions.json` ({qid: {"imageId", "question",
    "answer", "isBalanced", "types": {"structural", ...}, ...}}), asked as LLaVA-1.5 asks
    them: "<question>\\nAnswer the question using a single word or phrase.", image
    "<imageId>.jpg" (GQA's images/ folder); only balanced questions (eval.py scores those);
  * or LLaVA's `llava_gqa_testdev_balanced.jsonl` (prompt already suffixed), with the released
    file as `annotations` for the answers.
Submission: `testdev_balanced_predictions.json`, [{"questionId", "prediction"}], as LLaVA's
convert_gqa_for_eval.py writes it for GQA's eval.py (which needs every balanced question).
Metric: eval.py's accuracy, prediction == answer where the prediction is processed as
convert_gqa_for_eval does (trailing periods dropped, lowercased; we also strip
whitespace) - no article or punctuation normalisation, unlike VQA. Also eval.py's "binary"
(every structural type but "query") and "open" ("query") accuracies.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from moe_vlm.eval import questions as questions_lib
from moe_vlm.eval.benchmarks import common
from moe_vlm.eval.questions import Question, QuestionFileError


def prediction(text: str) -> str:
  """convert_gqa_for_eval.py: `text.rstrip('.').lower()` (whitespace stripped first)."""
  return text.strip().rstrip(".").lower()


def _is_released(doc: Any) -> bool:
  if not isinstance(doc, dict) or not doc:
    return False
  first = next(iter(doc.values()))
  return isinstance(first, dict) and "question" in first and "imageId" in first


def _structural(record: dict[str, Any]) -> Optional[str]:
  types = record.get("types")
  return types.get("structural") if isinstance(types, dict) else None


class GQA(common.Benchmark):
  name = "gqa"
  title = "GQA"
  description = "GQA testdev-balanced: exact match (LLaVA's processing), binary/open"

  def load_questions(self, path: str, *, limit: int = 0, annotations: Optional[str] = None,
                     suffix: str = common.SHORT_ANSWER) -> list[Question]:
    """path: the released questions JSON or LLaVA's JSONL (answers from `annotations`)."""
    doc = common.json_document(path)
    if _is_released(doc):
      questions = []
      for qid, r in doc.items():
        where = f"{path}[{qid!r}]"
        if not r.get("isBalanced", True):
          continue
        text = common.field(r, "question", str, where)
        image = common.field(r, "imageId", str, where)
        answer = r.get("answer")
        if answer is not None and not isinstance(answer, str):
          raise QuestionFileError(f"{where}: 'answer' is {answer!r}; expected a string")
        questions.append(Question(
            question_id=qid, text=f"{text}\n{suffix}" if suffix else text,
            image=f"{image}.jpg", answers=(answer,) if answer is not None else (),
            category=_structural(r)))
      return common.limited(questions, limit, path)
    questions = questions_lib.load_questions(path, limit)
    if annotations:
      released = common.read_json(annotations)
      if not _is_released(released):
        raise QuestionFileError(f"{annotations}: not GQA's released questions JSON "
                                "({qid: {'question', 'imageId', 'answer', ...}})")
      out = []
      for q in questions:
        r = released.get(str(q.question_id))
        if r is None:
          raise QuestionFileError(f"{annotations}: no question {q.question_id!r} (asked in "
                                  f"{path})")
        answer = common.field(r, "answer", str, f"{annotations}[{str(q.question_id)!r}]")
        out.append(dataclasses.replace(q, answers=(answer,), category=_structural(r)))
      questions = out
    return questions

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str, *, split: str = "testdev_balanced") -> list[str]:
    """`<split>_predictions.json` for GQA's eval.py --tier <split>."""
    common.check_lengths(questions, answers)
    records = [{"questionId": str(q.question_id), "prediction": prediction(a)}
               for q, a in zip(questions, answers)]
    return [common.write_json(os.path.join(out_dir, f"{split}_predictions.json"), records)]

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    common.check_lengths(questions, answers)
    common.require(questions, lambda q: q.answers, "GQA", "answer")
    hits = [float(prediction(a) == q.answers[0]) for q, a in zip(questions, answers)]
    typed = [(q.category, h) for q, h in zip(questions, hits) if q.category is not None]
    binary = [h for c, h in typed if c != "query"]
    open_ = [h for c, h in typed if c == "query"]
    overall = common.entry(hits)
    return {"overall": overall, "binary": common.entry(binary), "open": common.entry(open_),
            "categories": common.by_category(questions, hits), "headline": overall["accuracy"],
            "headline_metric": "accuracy (exact match after LLaVA's processing), percent"}
