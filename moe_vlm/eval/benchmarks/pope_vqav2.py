"""POPE and VQAv2 in the benchmark registry; their scoring is `moe_vlm.eval.tasks`'.

POPE: LLaVA's `llava_pope_test.jsonl` (prompt already suffixed, "label" yes/no, "category"
random / popular / adversarial); eval_pope.py reads the runner's answers.jsonl as it is, so
there is no extra submission file. The paper's POPE column is the F1 averaged over the three
categories (MoE-LLaVA-1.8Bx4: (88.0 + 87.7 + 85.4) / 3 = 87.0).
VQAv2: LLaVA's `llava_vqav2_mscoco_test-dev2015.jsonl` (or any LLaVA VQA JSONL with answers
for a local score); `vqav2_submission.json`, [{"question_id", "answer"}] with EvalAI's
processing, is what convert_vqav2_for_submission.py uploads to the test-dev server (the
paper's number comes from there).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from moe_vlm.eval import questions as questions_lib
from moe_vlm.eval.benchmarks import common
from moe_vlm.eval.questions import Question


class Pope(common.Benchmark):
  name = "pope"
  title = "POPE"
  description = "POPE: accuracy, precision, recall, F1, yes-ratio per negative sampling"

  def load_questions(self, path: str, *, limit: int = 0) -> list[Question]:
    return questions_lib.load_questions(path, limit)

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str) -> list[str]:
    """Nothing beyond answers.jsonl, which eval_pope.py reads directly."""
    common.check_lengths(questions, answers)
    return []

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    from moe_vlm.eval import tasks  # lazy: tasks imports the model stack

    common.check_lengths(questions, answers)
    out = tasks.score_pope(questions, answers)
    splits = out["categories"] or {"all": out["overall"]}
    return {**out, "headline": sum(m["f1"] for m in splits.values()) / len(splits),
            "headline_metric": "F1 averaged over the negative-sampling categories, percent"}

  def markdown(self, results: dict[str, Any]) -> str:
    lines = [f"## POPE: {results['headline_metric']} = {results['headline']:.1f}", "",
             "| split | questions | accuracy | precision | recall | F1 | yes-ratio |",
             "|---|---|---|---|---|---|---|"]
    rows = [("all", results["overall"])] + list(results["categories"].items())
    lines += [f"| {name} | {m['n']} | {m['accuracy']:.1f} | {m['precision']:.1f} | "
              f"{m['recall']:.1f} | {m['f1']:.1f} | {m['yes_ratio']:.1f} |" for name, m in rows]
    return "\n".join(lines) + "\n"


class VQAv2(common.Benchmark):
  name = "vqav2"
  title = "VQAv2"
  description = "VQAv2: test-dev submission JSON, or VQA accuracy where answers are given"

  def load_questions(self, path: str, *, limit: int = 0) -> list[Question]:
    return questions_lib.load_questions(path, limit)

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str) -> list[str]:
    common.check_lengths(questions, answers)
    records = [{"question_id": q.question_id, "answer": common.evalai_answer(a)}
               for q, a in zip(questions, answers)]
    return [common.write_json(os.path.join(out_dir, "vqav2_submission.json"), records)]

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    from moe_vlm.eval import tasks  # lazy: tasks imports the model stack

    common.check_lengths(questions, answers)
    out = tasks.score_vqa(questions, answers)
    out.pop("per_question")
    return {**out, "headline": out["overall"]["accuracy"],
            "headline_metric": "VQA accuracy (official normalisation, leave-one-out), percent"}
