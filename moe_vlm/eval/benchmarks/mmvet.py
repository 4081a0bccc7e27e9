"""MM-Vet: open-ended answers for MM-Vet's GPT-4 grader (no local metric).

Questions, either
  * MM-Vet's released `mm-vet.json` ({"v1_0": {"imagename", "question", "answer",
    "capability": [...]}, ...}); asked as the bare question (LLaVA's llava-mm-vet.jsonl adds
    no instruction); question_id = the number N of "v1_N", as in LLaVA's file; images
    under images/;
  * or LLaVA's `llava-mm-vet.jsonl`.
Submission: `mmvet.json`, {"v1_N": answer}, as LLaVA's convert_mmvet_for_eval.py writes it for
MM-Vet's grader (mm-vet_evaluator / the online grader). The grader's total is the paper's
number; `score` only counts the answers, its result has headline None.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

from moe_vlm.eval import questions as questions_lib
from moe_vlm.eval.benchmarks import common
from moe_vlm.eval.questions import Question, QuestionFileError

_KEY = re.compile(r"v1_(\d+)")


def key(question_id: Any) -> str:
  """The grader's key of a question: "v1_<id>" (ids already of that form are kept)."""
  qid = str(question_id)
  return qid if _KEY.fullmatch(qid) else f"v1_{qid}"


class MMVet(common.Benchmark):
  name = "mmvet"
  title = "MM-Vet"
  description = "MM-Vet: answer file for its GPT-4 grader (scored there)"
  has_metric = False

  def load_questions(self, path: str, *, limit: int = 0) -> list[Question]:
    """path: the released mm-vet.json or LLaVA's llava-mm-vet.jsonl."""
    doc = common.json_document(path)
    if isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()):
      questions = []
      for k, r in doc.items():
        where = f"{path}[{k!r}]"
        found = _KEY.fullmatch(k)
        capability = r.get("capability") or []
        if not isinstance(capability, list):
          raise QuestionFileError(f"{where}: 'capability' is {capability!r}; expected a list")
        answer = r.get("answer")
        questions.append(Question(
            question_id=int(found.group(1)) if found else k,
            text=common.field(r, "question", str, where),
            image=common.field(r, "imagename", str, where),
            answers=(answer,) if isinstance(answer, str) else (),
            category=",".join(capability) or None))
      return common.limited(questions, limit, path)
    return questions_lib.load_questions(path, limit)

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str) -> list[str]:
    common.check_lengths(questions, answers)
    results = {key(q.question_id): a for q, a in zip(questions, answers)}
    return [common.write_json(os.path.join(out_dir, "mmvet.json"), results, indent=2)]

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    common.check_lengths(questions, answers)
    return {"overall": {"n": len(questions), "accuracy": None},
            "categories": {}, "headline": None,
            "headline_metric": "MM-Vet total from its GPT-4 grader (not run here: grade "
                               "mmvet.json, then set 'headline' in results.json)"}
