"""Answer normalisation (VQA-style exact match) and POPE metrics."""

from __future__ import annotations

import re
from typing import Sequence

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|]")


def normalize_answer(text: str) -> str:
  """VQA evaluation normalisation: lowercase, punctuation and articles removed, number
  words as digits, whitespace collapsed (the standard VQA script's main steps)."""
  text = text.lower().replace("\n", " ").replace("\t", " ").strip()
  text = _PUNCT.sub(" ", text)
  text = re.sub(r"(?<!\d)\.(?!\d)", " ", text)  # periods, but not decimal points
  words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
  return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(answer)


def yes_no(text: str) -> str:
  """POPE's reading of a free-form answer (LLaVA's eval_pope): no/not -> "no", else "yes"."""
  words = normalize_answer(text.split(".")[0]).split()
  return "no" if any(w in ("no", "not") for w in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """Accuracy, precision, recall, F1 (positive = "yes") and the yes-ratio, in percent."""
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  if not labels:
    raise ValueError("pope_metrics needs at least one example")
  pred = [yes_no(p) == "yes" for p in predictions]
  gold = []
  for i, label in enumerate(labels):
    if label not in ("yes", "no"):
      raise ValueError(f"label {i} is {label!r}; POPE labels are 'yes' or 'no'")
    gold.append(label == "yes")
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  fn = sum(not p and g for p, g in zip(pred, gold))
  tn = len(gold) - tp - fp - fn
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": 100 * (tp + tn) / len(gold), "precision": 100 * precision,
          "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": 100 * sum(pred) / len(pred)}
