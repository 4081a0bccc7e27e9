"""What each MoE-Tuning stage trains.

- stage 1: the projector only (vision tower and LLM frozen);
- stage 2: projector + the whole LLM;
- stage 3: the model is upcycled (experts copied from the stage-2 FFNs, fresh routers)
  and, by default, only the MoE layers train - the paper's "experts + routers" preset.
  `moe_llava_code` reproduces what the reference code really trains: every FFN (experts,
  routers and the dense FFNs of non-MoE layers) plus the projector. `lora_experts` is
  Awaker2.5-VL's stage: only the LoRA experts and their routers (the base stays frozen).
HyperLLaVA's experts live under `projector.` (visual) and `llm.` (language), so stage 1
trains the visual expert with the projector and stage 2 the language expert with the LLM.
The vision tower is frozen in every stage; a selection that matches nothing fails.
Only its pre-training before stage 1 (`vision_pretrain`, the stand-in for CLIP's
pre-training; not a MoE-Tuning preset) trains the tower, with a throwaway decoder.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

PRESETS = ("projector", "projector_llm", "moe_layers", "moe_llava_code", "lora_experts")
VISION_PRETRAIN = "vision_pretrain"  # every parameter of the tower's captioning model


class StageConfigError(ValueError):
  """A stage's trainable-parameter selection is invalid."""


def _is_moe(name: str) -> bool:
  return ".mlp.experts." in name or ".mlp.router." in name


def _is_ffn(name: str) -> bool:
  return name.startswith("llm.layers.") and ".mlp." in name


def trainable_fn(preset: str, extra_modules: Sequence[str] = ()) -> Callable[[str], bool]:
  """Predicate over dotted parameter names for a stage preset (+ extra substrings)."""
  rules: dict[str, Callable[[str], bool]] = {
      "projector": lambda n: n.startswith("projector."),
      "projector_llm": lambda n: n.startswith(("projector.", "llm.")),
      "moe_layers": _is_moe,
      "moe_llava_code": lambda n: _is_ffn(n) or n.startswith("projector."),
      "lora_experts": lambda n: ".lora_mlp." in n or ".lora_attn." in n,
  }
  if preset == VISION_PRETRAIN:
    return lambda name: True
  if preset not in rules:
    raise StageConfigError(f"stage train preset {preset!r}: expected one of {PRESETS}")
  base = rules[preset]
  extra = tuple(extra_modules)

  def trainable(name: str) -> bool:
    if name.startswith("vision."):
      return False  # the vision tower is frozen in every MoE-Tuning stage
    return base(name) or any(m in name for m in extra)

  return trainable


def describe(names: Iterable[str], trainable: Callable[[str], bool]) -> dict[str, int]:
  """Counts of trainable / frozen parameter tensors, for the run log."""
  names = list(names)
  n = sum(map(trainable, names))
  return {"trainable_tensors": n, "frozen_tensors": len(names) - n}
