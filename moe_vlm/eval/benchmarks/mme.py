"""MME: yes/no questions, two per image; per subtask acc + acc+, perception and cognition.

Questions, either
  * the released `MME_Benchmark_release_version/` folder: one folder per subtask, holding
    either images/ and questions_answers_YN/ (artwork, celebrity, landmark, posters, scene)
    or the images beside their .txt files; each .txt (named as its image) has lines
    "question<TAB>Yes|No". Asked as LLaVA-1.5 asks them (llava_mme.jsonl): the question
    without its " Please answer yes or no." plus "\\nAnswer the question using a single word
    or phrase."; question_id = the image path, as LLaVA's (both questions of an image share
    it, so answers are matched by (question_id, prompt));
  * or LLaVA's `llava_mme.jsonl`, labels from the released folder given as `annotations`
    (matched by subtask, image name and question, as LLaVA's convert_answer_to_mme.py).
Submission: `mme/<subtask>.txt`, lines "image<TAB>question<TAB>Yes|No<TAB>answer" (each image's
two lines adjacent), the layout of MME's eval_tool (calculation.py --results_dir mme).
Metric: calculation.py's. An answer is "yes"/"no" when it is exactly that (lowercased), else
by whether its first 4 characters hold "yes" (then "no"), else "other" (always wrong).
Per subtask acc = right questions / questions, acc+ = images with both questions right /
images, score = 100 * (acc + acc+); perception = the sum over its 10 subtasks, cognition over
its 4 (a partial run sums the subtasks present and lists the missing ones). The paper's MME
column is the perception total.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any, Optional, Sequence

from moe_vlm.eval import questions as questions_lib
from moe_vlm.eval.benchmarks import common
from moe_vlm.eval.questions import Question, QuestionFileError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
_YES_NO = re.compile(r"\s*Please answer yes or no\.\s*$")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def yes_no(text: str) -> str:
  """calculation.py's parse_pred_ans: "yes", "no" or "other" (whitespace stripped first)."""
  text = text.strip().lower()
  if text in ("yes", "no"):
    return text
  return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def bare_question(text: str) -> str:
  """The question without the yes/no instruction or LLaVA's suffix, whitespace collapsed:
  what a released question and a LLaVA prompt for it have in common."""
  text = text.replace(common.SHORT_ANSWER, "")
  return " ".join(_YES_NO.sub("", text.strip()).split())


def _subtask_dirs(root: str) -> list[tuple[str, str, str]]:
  """(subtask, image folder, question folder) for each subtask folder of the release."""
  if not os.path.isdir(root):
    raise QuestionFileError(f"{root}: not a folder; MME's release is the folder "
                            "MME_Benchmark_release_version/")
  out = []
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder) or name.startswith((".", "_")) or name == "eval_tool":
      continue
    if os.path.isdir(os.path.join(folder, "questions_answers_YN")):
      out.append((name, os.path.join(folder, "images"),
                  os.path.join(folder, "questions_answers_YN")))
    else:
      out.append((name, folder, folder))
  if not out:
    raise QuestionFileError(f"{root}: no subtask folders (existence/, count/, ...)")
  return out


def _read_release(root: str) -> list[dict[str, Any]]:
  """One dict per released question: subtask, image (relative to root), question, answer."""
  out = []
  for subtask, image_dir, qa_dir in _subtask_dirs(root):
    images = {}
    if os.path.isdir(image_dir):
      images = {os.path.splitext(f)[0]: f for f in os.listdir(image_dir)
                if f.lower().endswith(_IMAGE_EXTENSIONS)}
    for txt in sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt")):
      path = os.path.join(qa_dir, txt)
      stem = os.path.splitext(txt)[0]
      if stem not in images:
        raise QuestionFileError(f"{path}: no image named {stem}.* in {image_dir}")
      image = os.path.relpath(os.path.join(image_dir, images[stem]), root).replace(os.sep, "/")
      for n, line in enumerate(common.read_text(path).splitlines(), 1):
        if not line.strip():
          continue
        parts = line.strip().split("\t")
        if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
          raise QuestionFileError(f"{path}:{n}: expected 'question<TAB>Yes|No', got {line!r}")
        out.append({"subtask": subtask, "image": image, "txt": txt, "question": parts[0],
                    "answer": parts[1].strip()})
  return out


def _question(r: dict[str, Any], text: str, qid: Any) -> Question:
  return Question(question_id=qid, text=text, image=r["image"], label=r["answer"].lower(),
                  category=r["subtask"],
                  meta={"question": r["question"], "answer": r["answer"], "txt": r["txt"]})


class MME(common.Benchmark):
  name = "mme"
  title = "MME"
  description = "MME: per-subtask acc + acc+ (perception, cognition totals), eval_tool files"

  def load_questions(self, path: str, *, limit: int = 0, annotations: Optional[str] = None,
                     suffix: str = common.SHORT_ANSWER) -> list[Question]:
    """path: the release folder, or LLaVA's llava_mme.jsonl with the folder as `annotations`."""
    if os.path.isdir(path):
      questions = []
      for r in _read_release(path):
        text = _YES_NO.sub("", r["question"].strip())
        questions.append(_question(r, f"{text}\n{suffix}" if suffix else text, r["image"]))
      return common.limited(questions, limit, path)
    questions = questions_lib.load_questions(path, limit)
    if not annotations:
      return questions
    table = {}
    for r in _read_release(annotations):
      stem = os.path.splitext(r["txt"])[0]
      table[(r["subtask"], stem, bare_question(r["question"]))] = r
    out = []
    for q in questions:
      qid = str(q.question_id)
      key = (qid.split("/")[0], os.path.splitext(qid.split("/")[-1])[0], bare_question(q.text))
      r = table.get(key)
      if r is None:
        raise QuestionFileError(f"{annotations}: no question {key[2]!r} for image "
                                f"{key[0]}/{key[1]} (asked in {path} as {q.question_id!r})")
      out.append(dataclasses.replace(_question(r, q.text, q.question_id), image=q.image))
    return out

  def write_submission(self, questions: Sequence[Question], answers: Sequence[str],
                       out_dir: str) -> list[str]:
    """mme/<subtask>.txt for MME's eval_tool/calculation.py."""
    common.check_lengths(questions, answers)
    common.require(questions, lambda q: q.label and q.category, "MME", "label and subtask")
    files: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    for q, a in zip(questions, answers):
      question = q.meta.get("question") or f"{bare_question(q.text)} Please answer yes or no."
      answer = q.meta.get("answer") or q.label.capitalize()
      line = "\t".join((os.path.basename(q.image or str(q.question_id)), question, answer,
                        " ".join(a.split())))
      files[q.category].setdefault(q.image or str(q.question_id), []).append(line)
    paths = []
    for subtask, by_image in sorted(files.items()):
      path = os.path.join(out_dir, "mme", f"{subtask}.txt")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        for lines in by_image.values():
          f.writelines(line + "\n" for line in lines)
      paths.append(path)
    return paths

  def score(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
    common.check_lengths(questions, answers)
    common.require(questions, lambda q: q.label in ("yes", "no") and q.category, "MME",
                   "yes/no label and subtask")
    images: dict[str, dict[str, list[bool]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    other = collections.Counter()
    for q, a in zip(questions, answers):
      read = yes_no(a)
      other[q.category] += read == "other"
      images[q.category][q.image or str(q.question_id)].append(read == q.label)
    subtasks = {}
    for name, by_image in sorted(images.items()):
      hits = [h for hs in by_image.values() for h in hs]
      acc = 100 * sum(hits) / len(hits)
      acc_plus = 100 * sum(all(hs) for hs in by_image.values()) / len(by_image)
      subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                        "questions": len(hits), "images": len(by_image), "other": other[name]}
    totals = {}
    for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
      present = [n for n in names if n in subtasks]
      totals[group] = {"score": sum(subtasks[n]["score"] for n in present) if present else None,
                       "subtasks": len(present), "missing": [n for n in names if n not in subtasks]}
    return {"subtasks": subtasks, **totals,
            "overall": {"perception": totals["perception"]["score"],
                        "cognition": totals["cognition"]["score"], "n": len(questions)},
            "other_subtasks": sorted(set(subtasks) - set(PERCEPTION) - set(COGNITION)),
            "headline": totals["perception"]["score"],
            "headline_metric": "perception score (sum of 10 subtasks' acc + acc+, percent)"}

  def markdown(self, results: dict[str, Any]) -> str:
    lines = [f"## MME: perception {common.fmt(results['perception']['score'])}, cognition "
             f"{common.fmt(results['cognition']['score'])}", "",
             "| subtask | group | images | questions | acc | acc+ | score | other |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in results["subtasks"].items():
      group = "perception" if name in PERCEPTION else "cognition" if name in COGNITION else "-"
      lines.append(f"| {name} | {group} | {m['images']} | {m['questions']} | "
                   f"{m['acc']:.2f} | {m['acc_plus']:.2f} | {m['score']:.2f} | {m['other']} |")
    for group in ("perception", "cognition"):
      if results[group]["missing"]:
        lines.append(f"\n{group} is missing: {', '.join(results[group]['missing'])}.")
    return "\n".join(lines) + "\n"
