"""The paper's benchmarks from their released files: questions in, LLaVA's submission files out,
each benchmark's metric.

  gqa      GQA testdev-balanced: exact match after LLaVA's processing
  sqa      ScienceQA test: option letters, accuracy on the image questions (SQA-IMG)
  textvqa  TextVQA val: VQA accuracy with EvalAI's processing
  vizwiz   VizWiz: submission JSON for test-dev, VQA accuracy per answer type on val
  mme      MME: per-subtask acc + acc+, perception and cognition totals
  mmbench  MMBench TSV: circular evaluation, submission TSV
  mmvet    MM-Vet: answer JSON for its GPT-4 grader
  pope     POPE (scoring from `moe_vlm.eval.tasks`)
  vqav2    VQAv2 (scoring from `moe_vlm.eval.tasks`; submission JSON for test-dev)

Use:
  bench = TASKS["mme"]
  questions = bench.load_questions("MME_Benchmark_release_version")
  ...answer them (runner.answer)...
  bench.write_submission(questions, answers, out_dir)   # LLaVA's files for the official tools
  results = bench.score(questions, answers)             # {"headline": ..., "overall": ...}
  score_answer_file("mme", questions_path, "answers.jsonl")   # answers made elsewhere
  row.paper_row({"mme": results, ...}, model="ours")    # the paper's table row, markdown
"""

from __future__ import annotations

from typing import Any

from moe_vlm.eval.benchmarks import (common, gqa, mmbench, mme, mmvet, pope_vqav2, row, sqa,
                                     textvqa, vizwiz)
from moe_vlm.eval.benchmarks.common import AnswerFileError, Benchmark

TASKS: dict[str, Benchmark] = {b.name: b for b in (
    gqa.GQA(), sqa.ScienceQA(), textvqa.TextVQA(), vizwiz.VizWiz(), mme.MME(),
    mmbench.MMBench(), mmvet.MMVet(), pope_vqav2.Pope(), pope_vqav2.VQAv2())}


def get(task: str) -> Benchmark:
  if task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
  return TASKS[task]


def help_text() -> str:
  """One line per task, for `moe-vlm eval --help`."""
  return "\n".join(f"  {name:8s} {b.description}" for name, b in TASKS.items())


def score_answer_file(task: str, questions_path: str, answers_path: str, *,
                      missing: str = "error", **load_kw: Any) -> dict[str, Any]:
  """Scores an answers JSONL (ours, or LLaVA's model_vqa output) against a question file.

  load_kw go to the benchmark's `load_questions` (annotations=, image_dir=, limit=, ...);
  `missing` as in `common.match_answers`. The result is `score`'s dict plus "task",
  "questions", "answers", "num_questions", "missing_answers" and "unmatched_answers".
  """
  bench = get(task)
  questions = bench.load_questions(questions_path, **load_kw)
  texts, counts = common.match_answers(questions, common.read_answers(answers_path),
                                       path=answers_path, missing=missing)
  return {"task": task, "questions": questions_path, "answers": answers_path,
          "num_questions": len(questions), "missing_answers": counts["missing"],
          "unmatched_answers": counts["unmatched"], **bench.score(questions, texts)}


__all__ = ["TASKS", "AnswerFileError", "Benchmark", "get", "help_text", "score_answer_file",
           "row", "common"]
