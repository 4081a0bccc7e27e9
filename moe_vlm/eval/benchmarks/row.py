"""The paper-style results row (MoE-LLaVA's headline table) from per-task results.json files.

Columns, in the paper's order: VQAv2, GQA, VizWiz, SQA-IMG, TextVQA, POPE, MME, MMBench,
MM-Vet. Each cell is the task's "headline" (what the benchmark modules' `score` returns);
results.json files of `moe_vlm.eval.tasks` without one are read as the paper reads them:
POPE = F1 averaged over its categories, VQA = overall accuracy. A missing task, or one with
no local number (MM-Vet before its grader ran, test splits scored by a server), is "-".
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

# (results key, column title)
COLUMNS = (("vqav2", "VQAv2"), ("gqa", "GQA"), ("vizwiz", "VizWiz"), ("sqa", "SQA-IMG"),
           ("textvqa", "TextVQA"), ("pope", "POPE"), ("mme", "MME"), ("mmbench", "MMBench"),
           ("mmvet", "MM-Vet"))

# The published rows (MoE-LLaVA's model zoo; LLaVA-1.5-7B for reference), same columns.
PUBLISHED = {
    "MoE-LLaVA-1.6B×4-Top2 (StableLM)": (76.7, 60.3, 36.2, 62.6, 50.1, 85.7, 1318.1, 60.2, 26.9),
    "MoE-LLaVA-1.8B×4-Top2 (Qwen)": (76.2, 61.5, 32.6, 63.1, 48.0, 87.0, 1291.6, 59.6, 25.3),
    "MoE-LLaVA-2.7B×4-Top2 (Phi-2)": (77.6, 61.4, 43.9, 68.5, 51.4, 86.3, 1423.0, 65.2, 34.3),
    "MoE-LLaVA-2.7B×4-Top2-384 (Phi-2, SigLIP)": (79.9, 62.6, 43.7, 70.3, 57.0, 85.7, 1431.3,
                                                   68.0, 35.9),
    "LLaVA-1.5-7B": (78.5, 62.0, 50.0, 66.8, 58.2, 85.9, 1510.7, 64.3, 30.5),
}


def headline(results: Optional[Mapping[str, Any]]) -> Optional[float]:
  """The paper's number in one task's results (None: not there)."""
  if not results:
    return None
  if "headline" in results:
    value = results["headline"]
    return None if value is None else float(value)
  if results.get("task") == "pope":
    splits = results.get("categories") or {"all": results.get("overall") or {}}
    f1 = [m.get("f1") for m in splits.values()]
    return sum(f1) / len(f1) if f1 and None not in f1 else None
  value = (results.get("overall") or {}).get("accuracy")
  return None if value is None else float(value)


def _cell(value: Optional[float]) -> str:
  return "-" if value is None else f"{value:.1f}"


def header() -> str:
  titles = ["model"] + [title for _, title in COLUMNS]
  return "| " + " | ".join(titles) + " |\n|" + "---|" * len(titles) + "\n"


def paper_row(results: Mapping[str, Optional[Mapping[str, Any]]], model: str, *,
              with_header: bool = True, published: Sequence[str] = ()) -> str:
  """Markdown: the header (optional), `published` rows named as in PUBLISHED, our row.

  results: column key ("vqav2", "gqa", ...) -> that task's results dict (or None). Unknown
  keys are an error, so a typo cannot silently leave a column empty.
  """
  unknown = set(results) - {k for k, _ in COLUMNS}
  if unknown:
    raise ValueError(f"unknown result columns {sorted(unknown)}; expected some of "
                     f"{[k for k, _ in COLUMNS]}")
  lines = header() if with_header else ""
  for name in published:
    if name not in PUBLISHED:
      raise ValueError(f"no published row {name!r}; known: {sorted(PUBLISHED)}")
    lines += "| " + " | ".join([name] + [f"{v:.1f}" for v in PUBLISHED[name]]) + " |\n"
  cells = [model] + [_cell(headline(results.get(k))) for k, _ in COLUMNS]
  return lines + "| " + " | ".join(cells) + " |\n"


def load_results(paths: Mapping[str, str]) -> dict[str, dict[str, Any]]:
  """column key -> results.json path (a folder means <folder>/results.json) -> dicts."""
  out = {}
  for column, path in paths.items():
    if os.path.isdir(path):
      path = os.path.join(path, "results.json")
    try:
      with open(path, encoding="utf-8") as f:
        out[column] = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f"{column}: no results file {path}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{column}: {path} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(out[column], dict):
      raise ValueError(f"{column}: {path} holds a {type(out[column]).__name__}; expected an object")
  return out


def results_in(root: str) -> dict[str, str]:
  """The <root>/<column>/results.json files that exist (one eval --out folder per task)."""
  return {k: os.path.join(root, k, "results.json") for k, _ in COLUMNS
          if os.path.exists(os.path.join(root, k, "results.json"))}
