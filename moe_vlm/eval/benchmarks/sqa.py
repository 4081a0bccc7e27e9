"""ScienceQA (the paper's SQA-IMG column): multiple choice answered with the option's letter.

Questions, either
  * ScienceQA's released `problems.json` ({pid: {"question", "choices", "answer" (index),
    "hint", "image", "subject", "split", ...}}) with `pid_splits.json` beside it (or the
    problems' own "split" field), split "test"; the prompt is LLaVA's CQM-A format
    (convert_sqa_to_llava.py): "Context: <hint or N/A>\\nQuestion: <q>\\nOptions: (A) x (B) y",
    then model_vqa_science.py's --single-pred-prompt line "Answer with the option's letter
    from the given choices directly."; images "<pid>/image.png" under images/test;
  * or LLaVA's `llava_test_CQM-A.json` (its human turn is the prompt, the letter line is
    appended), answers from the `problems.json` beside it (or `problems=`).
Submission: `scienceqa_answers.jsonl`, model_vqa_science's layout for eval_science_qa.py,
whose IMG split is the questions whose "prompt" holds "<image>" - so image questions are
written with "<image>\\n" in front, which the runner's answers.jsonl leaves out.
Metric: eval_science_qa.py's: the letter is the whole answer, or "X. ..." at its start, or the
one "The answer is X." in it; anything else is wrong. Accuracy over all questions and over
those with an image (IMG, the paper's number), and per subject. eval_science_qa only reads
the letters A-E; we read as many letters as the question has options (ScienceQA has at most
5, so the numbers agree on it).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional, Sequence

from moe_vlm.data.templates import IMAGE_PLACEHOLDER
from moe_vlm.eval import questions as questions_lib
from moe_vlm.eval.benchmarks import common
from moe_vlm.eval.questions import Question, QuestionFileError

_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def choice(text: str, num_choices: int = 0) -> Optional[str]:
  """eval_science_qa.py's reading of an answer into a letter (None: no letter)."""
  valid = common.letters(num_choices) if num_choices else common.LETTERS
  text = text.strip()
  if text in valid and len(text) == 1:
    return text
  if len(text) >= 3 and text[0] in valid and text[1:3] == ". ":
    return text[0]
  found = _THE_ANSWER_IS.findall(text)
  return found[0] if len(found) == 1 and found[0] in valid else None


def prompt(problem: dict[str, Any], where: str) -> str:
  """LLaVA's CQM-A input (build_prompt_chatbot, use_caption=False), without the letter line."""
  question = common.field(problem, "question", str, where)
  choices = common.field(problem, "choices", list, where)
  hint = problem.get("hint") or ""
  if not isinstance(hint, str):
    raise QuestionFileError(f"{where}: 'hint' is {hint!r}; expected a string")
  context = hint.strip() or "N/A"
  options = " ".join(f"({l}) {c}" for l, c in zip(common.letters(len(choices)), choices))
  text = f"Context: {context}\nQuestion: {question}\nOptions: {options}\n"
  return text.replace("  ", " ").strip()


def _problem_fields(problem: dict[str, Any], where: str) -> dict[str, Any]:
  choices = common.field(problem, "choices", list, where)
  if not choices or not all(isinstance(c, str) for c in choices):
    raise QuestionFileError(f"{where}: 'choices' must be a non-empty list of strings")
  answer = common.field(problem, "answer", int, where)
  if not 0 <= answer < len(choices):
    raise QuestionFileError(f"{where}: 'answer' {answer} is not an index into its "
                            f"{len(choices)} choices")
  subject = problem.get("subject")
  return {"choices": tuple(choices), "answers": (common.LETTERS[answer],),
          "category": subject if isinstance(subject, str) else None}


def _split_ids(problems: dict[str, Any], path: str, split: Optional[str],
               splits: Optional[str]) -> list[str]:
  if not split:
    return list(problems)
  splits = splits or os.path.join(os.path.dirname(path), "pid_splits.json")
  if os.path.exists(splits):
    table = common.read_json(splits)
    if not isinstance(table, dict) or split not in table:
      raise QuestionFileError(f"{splits}: no split {split!r}")
    return [str(pid) for pid in table[split]]
  return [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]


class ScienceQA(common.Benchmark):
  name = "sqa"
  title = "SQA-IMG"
  description = "ScienceQA test: option letters (eval_science_qa), accuracy on image questions"

  def load_questions(self, path: str, *, limit: int = 0, split: Optional[str] = "test",
                     splits: Optional[str] = None, problems: Optional[str] = None,
                     suffix: str = common.LETTER_ANSWER) -> list[Question]:
    """path: `problems.json` (released) or LLaVA's `llava_test_CQM-A.json`."""
    doc = common.json_document(path)
    if isinstance(doc, dict):  # the released problems, keyed by problem id
      questions = []
      for pid in _split_ids(doc, path, split, splits):
        where = f"{path}[{pid!r}]"
        if pid not in doc:
          raise QuestionFileError(f"{where}: listed in the {split!r} split but not in the file")
        p = doc[pid]
        if not isinstance(p, dict):
          raise QuestionFileError(f"{where} is a {type(p).__name__}; expected an object")
        text = prompt(p, where)
        image = p.get("image")
        questions.append(Question(question_id=pid, text=f"{text}\n{suffix}" if suffix else text,
                                  image=f"{pid}/{image}" if image else None,
                                  **_problem_fields(p, where)))
      return common.limited(questions, limit, path)
    questions = questions_lib.load_questions(path, limit)
    if suffix:
      questions = [dataclasses.replace(q, text=f"{q.text}\n{suffix}") for q in questions]
    problems = problems or os.path.join(os.path.dirname(path), "problems.json")
    if not os.path.exists(problems):
      return questions  # answers unknown: can be answered and written, not scored
    table = common.read_json(problems)
    out = []
    for q in questions:
      p = table.get(str(q.question_id)) if isinstance(table, dict) else None
      if p is None:
        raise QuestionFileError(f"{problems}: no problem {q.question_id!r} (asked in {path})")
      out.append(dataclasses.replace(q, **_problem_fields(p, f"{problems}[{q.question_id!r}]")))
    return out

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str, *, model_id: str = "moe_vlm") -> list[str]:
    """`scienceqa_answers.jsonl` for eval_science_qa.py --result-file."""
    common.check_lengths(questions, answers)
    records = questions_lib.answer_records(questions, answers, model_id)
    for r, q in zip(records, questions):
      if q.image:
        r["prompt"] = f"{IMAGE_PLACEHOLDER}\n{r['prompt']}"
    return [common.write_jsonl(os.path.join(out_dir, "scienceqa_answers.jsonl"), records)]

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    common.check_lengths(questions, answers)
    common.require(questions, lambda q: q.answers and q.choices, "ScienceQA",
                   "answer letter and choices")
    parsed = [choice(a, len(q.choices)) for q, a in zip(questions, answers)]
    hits = [float(p == q.answers[0]) for q, p in zip(questions, parsed)]
    img = [h for q, h in zip(questions, hits) if q.image]
    overall = {**common.entry(hits), "correct": int(sum(hits))}
    return {"overall": overall, "img": {**common.entry(img), "correct": int(sum(img))},
            "categories": common.by_category(questions, hits),
            "unparsed": sum(p is None for p in parsed), "headline": common.mean(img),
            "headline_metric": "accuracy on the questions with an image (IMG), percent"}

  def markdown(self, results: dict[str, Any]) -> str:
    rows = [("all", results["overall"]), ("IMG", results["img"])]
    rows += list(results["categories"].items())
    return (common.accuracy_table(f"{self.title}: {results['headline_metric']}", rows) +
            f"\nAnswers with no readable letter: {results['unparsed']}.\n")
