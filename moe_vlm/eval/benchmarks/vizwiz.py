"""VizWiz-VQA: VQA accuracy, with "unanswerable" as an answer in its own right.

Questions, either
  * VizWiz's released `val.json` / `test.json` ([{"image", "question", "answers":
    [{"answer", "answer_confidence"}], "answer_type", "answerable"}], test without answers),
    asked as LLaVA-1.5 asks them: "<question>\\nWhen the provided information is insufficient,
    respond with 'Unanswerable'.\\nAnswer the question using a single word or phrase.";
    question_id = the position in the file;
  * or LLaVA's `llava_test.jsonl` (prompt already suffixed), optionally with the released
    file as `annotations` for the answers (matched by image name).
Submission: `vizwiz_submission.json`, [{"image", "answer"}] with EvalAI's processing, as
LLaVA's convert_vizwiz_for_submission.py writes it for the test-dev server (the paper's
number comes from there). Metric here (val, which has answers): the VQA accuracy VizWiz's
evaluation uses - the official normalisation, min(#matches/3, 1) averaged over the
leave-one-out subsets of the 10 answers - overall and per answer type ("unanswerable",
"yes/no", "number", "other"). An unanswerable question counts as right when the model says
"unanswerable" (any case, with punctuation) and enough annotators said so too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from moe_vlm.eval import metrics, questions as questions_lib
from moe_vlm.eval.benchmarks import common
from moe_vlm.eval.questions import Question, QuestionFileError

SUFFIX = f"{common.UNANSWERABLE}\n{common.SHORT_ANSWER}"


def _answers(record: dict[str, Any], where: str) -> tuple[str, ...]:
  answers = record.get("answers")
  if answers is None:
    return ()
  if not isinstance(answers, list):
    raise QuestionFileError(f"{where}: 'answers' is {answers!r}; expected a list")
  out = []
  for a in answers:
    a = a.get("answer") if isinstance(a, dict) else a
    if not isinstance(a, str):
      raise QuestionFileError(f"{where}: answers must be strings or {{'answer': str}}")
    out.append(a)
  return tuple(out)


def _is_released(doc: Any) -> bool:
  return (isinstance(doc, list) and bool(doc) and isinstance(doc[0], dict) and
          "question" in doc[0] and "image" in doc[0] and "text" not in doc[0])


class VizWiz(common.Benchmark):
  name = "vizwiz"
  title = "VizWiz"
  description = "VizWiz-VQA: submission JSON (test-dev) or VQA accuracy per answer type (val)"

  def load_questions(self, path: str, *, limit: int = 0, annotations: Optional[str] = None,
                     suffix: str = SUFFIX) -> list[Question]:
    """path: the released val/test JSON, or LLaVA's JSONL (answers from `annotations`)."""
    doc = common.json_document(path)
    if _is_released(doc):
      questions = []
      for i, r in enumerate(doc):
        where = f"{path}[{i}]"
        text = common.field(r, "question", str, where)
        answer_type = r.get("answer_type")
        questions.append(Question(
            question_id=i, text=f"{text}\n{suffix}" if suffix else text,
            image=common.field(r, "image", str, where), answers=_answers(r, where),
            category=answer_type if isinstance(answer_type, str) else None))
      return common.limited(questions, limit, path)
    questions = questions_lib.load_questions(path, limit)
    if not annotations:
      return questions
    released = common.read_json(annotations)
    if not _is_released(released):
      raise QuestionFileError(f"{annotations}: not VizWiz's released layout ([{{'image', "
                              "'question', 'answers', ...}])")
    by_image = {r.get("image"): (i, r) for i, r in enumerate(released)}
    out = []
    for q in questions:
      found = by_image.get(q.image)
      if found is None:
        raise QuestionFileError(f"{annotations}: no question on image {q.image!r} (asked in "
                                f"{path} as {q.question_id!r})")
      i, r = found
      answer_type = r.get("answer_type")
      out.append(dataclasses.replace(q, answers=_answers(r, f"{annotations}[{i}]"),
                                     category=answer_type if isinstance(answer_type, str)
                                     else q.category))
    return out

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str) -> list[str]:
    common.check_lengths(questions, answers)
    missing = [q.question_id for q in questions if not q.image]
    if missing:
      raise QuestionFileError(f"VizWiz: question {missing[0]!r} has no image; the submission "
                              "is keyed by image name")
    records = [{"image": os.path.basename(q.image), "answer": common.evalai_answer(a)}
               for q, a in zip(questions, answers)]
    return [common.write_json(os.path.join(out_dir, "vizwiz_submission.json"), records)]

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    common.check_lengths(questions, answers)
    common.require(questions, lambda q: q.answers, "VizWiz", "answers (the test split has none: "
                   "submit vizwiz_submission.json)")
    hits = [metrics.vqa_accuracy(a, q.answers) for q, a in zip(questions, answers)]
    overall = common.entry(hits)
    return {"overall": overall, "categories": common.by_category(questions, hits),
            "headline": overall["accuracy"],
            "headline_metric": "VQA accuracy (official normalisation, leave-one-out), percent"}
