"""Answer scoring: VQA answer normalisation and accuracy, POPE yes/no metrics.

`normalize_answer` follows the official VQA evaluation (vqaEval.py: processPunctuation
then processDigitArticle), so exact-match numbers are comparable with the VQAv2 /
TextVQA / GQA scripts LLaVA and MoE-LLaVA report.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Sequence

# vqaEval.manualMap: number words -> digits ("none" is 0 there too).
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit ("2." -> "2", "2.5" stays). The official pattern
# `(?!<=\d)(\.)(?!\d)` meant a look-behind too but, as written, only the look-ahead acts;
# we keep what it does, not what it meant.
_PERIOD = re.compile(r"\.(?!\d)")

# Contractions written without their apostrophes, mapped back (vqaEval.contractions).
# Derived from the canonical forms: every spelling with some apostrophes dropped. Forms
# whose apostrophe-less spelling is an ordinary word (he'll/hell, we'd/wed, it's/its,
# let's/lets, she'd/shed, ...) are left out, as in the official table; its capitalised
# I-forms are left out because the text is lowercased before the lookup there as well.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am "
    "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't "
    "she'd've should've shouldn't shouldn't've somebody'd somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's "
    "won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've").split()


def _contraction_table(forms: Sequence[str]) -> dict[str, str]:
  table = {}
  for form in forms:
    cuts = [i for i, ch in enumerate(form) if ch == "'"]
    for r in range(1, len(cuts) + 1):
      for drop in itertools.combinations(cuts, r):
        table["".join(ch for i, ch in enumerate(form) if i not in drop)] = form
  return table


_CONTRACTIONS = _contraction_table(_CONTRACTED)


def _strip_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: a mark next to a space (or any text with a 1,000-style
  number) is deleted, otherwise it becomes a space ("t-shirt" -> "t shirt")."""
  delete = _COMMA_IN_NUMBER.search(text) is not None
  out = text
  for p in _PUNCT:
    out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
  return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
  """The VQA evaluation normalisation: punctuation, lowercase, number words as digits,
  articles dropped, apostrophe-less contractions restored, whitespace collapsed."""
  text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(answer)


def vqa_accuracy(prediction: str, answers: Sequence[str], *, leave_one_out: bool = True) -> float:
  """VQA accuracy in [0, 1] of one prediction against its reference answers.

  One reference: exact match. Several: min(#matching references / 3, 1) - three
  annotators agreeing is full credit. With `leave_one_out` (the official VQAv2 /
  TextVQA scripts, hence the published numbers) that formula is averaged over the n
  subsets of n - 1 references, so 3 matches out of 10 give 0.9 rather than 1.0.
  """
  if not answers:
    raise ValueError("vqa_accuracy needs at least one reference answer")
  pred = normalize_answer(prediction)
  refs = [normalize_answer(a) for a in answers]
  if len(refs) == 1:
    return float(pred == refs[0])
  matches = sum(r == pred for r in refs)
  if not leave_one_out:
    return min(matches / 3, 1.0)
  # Leaving out a matching reference drops the count by one, any other keeps it.
  return (matches * min((matches - 1) / 3, 1.0) +
          (len(refs) - matches) * min(matches / 3, 1.0)) / len(refs)


def yes_no(text: str) -> str:
  """How POPE reads a free-form answer (LLaVA's eval_pope.py): only the first sentence
  counts; "no" if it holds the word no or not, else "yes". "No, there is not." -> no.

  eval_pope splits on spaces after deleting commas and matches "No"/"no"/"not" case-
  sensitively, so it reads "NO" or "no!" as yes; we compare normalised words, which
  agrees with it on every answer it does not misread.
  """
  words = normalize_answer(text.split(".")[0]).split()
  return "no" if any(w in ("no", "not") for w in words) else "yes"


@dataclasses.dataclass(frozen=True)
class Confusion:
  """POPE counts with "yes" (object present) as the positive class."""
  tp: int
  fp: int
  fn: int
  tn: int

  @property
  def n(self) -> int:
    return self.tp + self.fp + self.fn + self.tn


def pope_confusion(predictions: Sequence[str], labels: Sequence[str]) -> Confusion:
  """Free-form predictions (read by `yes_no`) against "yes"/"no" labels."""
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  if not labels:
    raise ValueError("pope_metrics needs at least one example")
  gold = []
  for i, label in enumerate(labels):
    label = label.strip().lower() if isinstance(label, str) else label
    if label not in ("yes", "no"):
      raise ValueError(f"label {i} is {label!r}; POPE labels are 'yes' or 'no'")
    gold.append(label == "yes")
  pred = [yes_no(p) == "yes" for p in predictions]
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  fn = sum(not p and g for p, g in zip(pred, gold))
  return Confusion(tp=tp, fp=fp, fn=fn, tn=len(gold) - tp - fp - fn)


def metrics_from_confusion(c: Confusion) -> dict[str, float]:
  """Accuracy, precision, recall, F1 and yes-ratio in percent (eval_pope's definitions;
  an undefined ratio, e.g. precision with no "yes" predictions, is reported as 0)."""
  precision = c.tp / (c.tp + c.fp) if c.tp + c.fp else 0.0
  recall = c.tp / (c.tp + c.fn) if c.tp + c.fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": 100 * (c.tp + c.tn) / c.n, "precision": 100 * precision,
          "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": 100 * (c.tp + c.fp) / c.n}


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """Accuracy, precision, recall, F1 (positive = "yes") and the yes-ratio, in percent."""
  return metrics_from_confusion(pope_confusion(predictions, labels))
