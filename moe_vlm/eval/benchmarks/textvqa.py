"""TextVQA val: VQA accuracy over 10 annotators with EvalAI's answer processing.

Questions, either
  * TextVQA's released `TextVQA_0.5.1_val.json` ({"data": [{"question_id", "image_id",
    "question", "answers", ...}]}), asked as "<question>[\\nReference OCR token: t1, t2, ...]
    \\nAnswer the question using a single word or phrase." - the OCR line (LLaVA-1.5 uses it:
    `llava_textvqa_val_v051_ocr.jsonl`) only with `ocr`: a TextVQA OCR JSON ({"data":
    [{"image_id", "ocr_tokens"}]}, e.g. the Rosetta release) or True to read each record's
    own "ocr_tokens"; images "<image_id>.jpg" under train_images/;
  * or LLaVA's `llava_textvqa_val_v051_ocr.jsonl`, answers from the released file given as
    `annotations`, matched as eval_textvqa.py does: (question_id, which there is the image
    id, question line of the prompt lowercased).
Submission: `textvqa_answers.jsonl`, eval_textvqa.py's --result-file layout (question_id = the
image id, prompt, text), and `textvqa_submission.json`, [{"question_id", "answer"}] with
EvalAI's processing, for the test server, when the real question ids are known.
Metric: m4c_evaluator's TextVQAAccuracyEvaluator: EvalAI processing of prediction and
answers, then min(#matches/3, 1) averaged over the 10 leave-one-out subsets.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional, Sequence, Union

from moe_vlm.eval import metrics, questions as questions_lib
from moe_vlm.eval.benchmarks import common
from moe_vlm.eval.questions import Question, QuestionFileError

_OCR_LINE = "Reference OCR token: "


def accuracy(prediction: str, answers: Sequence[str]) -> float:
  """TextVQA accuracy in [0, 1]: EvalAI processing, then the leave-one-out VQA formula."""
  tokenized = lambda t: t.lower().replace(",", "").replace("?", "").replace("'s", " 's")
  return metrics.vqa_accuracy(tokenized(prediction), [tokenized(a) for a in answers])


def question_of(prompt: str) -> str:
  """eval_textvqa.py's prompt_processor: the question line of a LLaVA prompt, lowercased."""
  if prompt.startswith("OCR tokens: "):
    found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    if found:
      return found.group(1).lower()
  lines = prompt.split("\n")
  if len(lines) == 3 and _OCR_LINE in prompt and lines[0].startswith(_OCR_LINE.strip()):
    return lines[1].lower()
  return lines[0].lower()


def _records(doc: Any, path: str) -> list[Any]:
  data = doc.get("data") if isinstance(doc, dict) else None
  if not isinstance(data, list):
    raise QuestionFileError(f"{path}: no 'data' list (TextVQA's released layout)")
  return data


def _ocr_tokens(path: str) -> dict[str, list[str]]:
  out = {}
  for i, r in enumerate(_records(common.read_json(path), path)):
    where = f"{path}['data'][{i}]"
    out[str(common.field(r, "image_id", str, where))] = common.field(r, "ocr_tokens", list, where)
  return out


class TextVQA(common.Benchmark):
  name = "textvqa"
  title = "TextVQA"
  description = "TextVQA val: VQA accuracy (EvalAI processing, 10 annotators)"

  def load_questions(self, path: str, *, limit: int = 0, annotations: Optional[str] = None,
                     ocr: Union[str, bool, None] = None,
                     suffix: str = common.SHORT_ANSWER) -> list[Question]:
    """path: the released TextVQA JSON, or LLaVA's JSONL with `annotations` for answers."""
    doc = common.json_document(path)
    if isinstance(doc, dict) and "data" in doc:
      tokens = _ocr_tokens(ocr) if isinstance(ocr, str) else None
      questions = []
      for i, r in enumerate(_records(doc, path)):
        where = f"{path}['data'][{i}]"
        qid = common.field(r, "question_id", (int, str), where)
        image_id = common.field(r, "image_id", str, where)
        text = common.field(r, "question", str, where)
        if ocr:
          found = tokens.get(image_id) if tokens is not None else r.get("ocr_tokens")
          if not isinstance(found, list):
            raise QuestionFileError(f"{where}: no OCR tokens for image {image_id!r} in "
                                    f"{ocr if isinstance(ocr, str) else path}")
          text += f"\n{_OCR_LINE}{', '.join(found)}"
        if suffix:
          text += f"\n{suffix}"
        answers = r.get("answers") or ()
        if not all(isinstance(a, str) for a in answers):
          raise QuestionFileError(f"{where}: 'answers' must be a list of strings")
        questions.append(Question(question_id=qid, text=text, image=f"{image_id}.jpg",
                                  answers=tuple(answers),
                                  meta={"image_id": image_id, "question_id": qid}))
      return common.limited(questions, limit, path)
    questions = questions_lib.load_questions(path, limit)
    if not annotations:
      return questions
    table = {}
    for i, r in enumerate(_records(common.read_json(annotations), annotations)):
      where = f"{annotations}['data'][{i}]"
      key = (common.field(r, "image_id", str, where),
             common.field(r, "question", str, where).lower())
      table[key] = r
    out = []
    for q in questions:
      r = table.get((str(q.question_id), question_of(q.text)))
      if r is None:
        raise QuestionFileError(
            f"{annotations}: no question {question_of(q.text)!r} on image {q.question_id!r} "
            f"(asked in {path}; LLaVA's TextVQA file uses the image id as question_id)")
      out.append(dataclasses.replace(
          q, answers=tuple(r.get("answers") or ()),
          meta={"image_id": str(q.question_id), "question_id": r.get("question_id")}))
    return out

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str, *, model_id: str = "moe_vlm") -> list[str]:
    common.check_lengths(questions, answers)
    records = questions_lib.answer_records(questions, answers, model_id)
    for r, q in zip(records, questions):
      r["question_id"] = q.meta.get("image_id", q.question_id)
    paths = [common.write_jsonl(os.path.join(out_dir, "textvqa_answers.jsonl"), records)]
    if all(q.meta.get("question_id") is not None for q in questions):
      server = [{"question_id": q.meta["question_id"], "answer": common.evalai_answer(a)}
                for q, a in zip(questions, answers)]
      paths.append(common.write_json(os.path.join(out_dir, "textvqa_submission.json"), server))
    return paths

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    common.check_lengths(questions, answers)
    common.require(questions, lambda q: q.answers, "TextVQA", "answers")
    hits = [accuracy(a, q.answers) for q, a in zip(questions, answers)]
    overall = common.entry(hits)
    return {"overall": overall, "categories": common.by_category(questions, hits),
            "headline": overall["accuracy"],
            "headline_metric": "VQA accuracy (EvalAI processing, leave-one-out), percent"}
