"""What each MoE-Tuning stage trains.

- stage 1: the projector only (vision tower and LLM frozen);
- stage 2: projector + the whole LLM;
- stage 3: the model is upcycled (experts copied from the stage-2 FFNs, fresh routers)
  and, by default, only the MoE layers train - the paper's "experts + routers" preset.
  `moe_llava_code` reproduces what the reference code really trains: every FFN (experts,
  routers and the dense FFNs of non-MoE layers) plus the projector.
Awaker2.5-VL's recipe (`lora_moe`, on a frozen base) is three presets, each also fixing
the LoRA's form in its stage's model (`LORA_FORMS`):
- `lora_single` (its stage I): one plain LoRA on every target projection;
- `lora_experts_routers` (stage II): the routed experts (stage II starts each, and the
  global one, as a copy of stage I's LoRA: `train.upcycle.lora_upcycle_params`), their
  routers (RMSNorm + linear gate) and the plain q/k/v LoRA;
- `lora_experts` (stage III): the same without the routers (frozen, bit-identical).
A stage's `extra_modules` adds parameter-name substrings to its preset and its
`frozen_modules` removes them (removal wins), e.g. `moe_layers` minus ".mlp.router."
trains MoE-LLaVA's experts but not its routers.
HyperLLaVA's experts live under `projector.` (visual) and `llm.` (language), so stage 1
trains the visual expert with the projector and stage 2 the language expert with the LLM.
The vision tower is frozen in every stage; a selection that matches nothing fails.
Only its pre-training before stage 1 (`vision_pretrain`, the stand-in for CLIP's
pre-training; not a MoE-Tuning preset) trains the tower, with a throwaway decoder.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

PRESETS = ("projector", "projector_llm", "moe_layers", "moe_llava_code", "lora_single",
           "lora_experts_routers", "lora_experts")
# The form of `lora_moe` a preset's stage model carries: "single" (one plain LoRA per
# target projection) or "experts" (routed experts + global expert; plain LoRA on q/k/v).
LORA_FORMS = {"lora_single": "single", "lora_experts_routers": "experts",
              "lora_experts": "experts"}
VISION_PRETRAIN = "vision_pretrain"  # every parameter of the tower's captioning model


class StageConfigError(ValueError):
  """A stage's trainable-parameter selection is invalid."""


def _is_moe(name: str) -> bool:
  return ".mlp.experts." in name or ".mlp.router." in name


def _is_ffn(name: str) -> bool:
  return name.startswith("llm.layers.") and ".mlp." in name


def _is_lora(name: str) -> bool:
  return ".lora_" in name


def _is_lora_router(name: str) -> bool:  # router (linear gate), router_bias, router_norm
  return ".lora_" in name and ".router" in name


def trainable_fn(preset: str, extra_modules: Sequence[str] = (),
                 frozen_modules: Sequence[str] = ()) -> Callable[[str], bool]:
  """Predicate over dotted parameter names for a stage preset, plus the names holding
  one of `extra_modules`, minus those holding one of `frozen_modules`."""
  rules: dict[str, Callable[[str], bool]] = {
      "projector": lambda n: n.startswith("projector."),
      "projector_llm": lambda n: n.startswith(("projector.", "llm.")),
      "moe_layers": _is_moe,
      "moe_llava_code": lambda n: _is_ffn(n) or n.startswith("projector."),
      "lora_single": _is_lora,
      "lora_experts_routers": _is_lora,
      "lora_experts": lambda n: _is_lora(n) and not _is_lora_router(n),
  }
  if preset == VISION_PRETRAIN:
    return lambda name: True
  if preset not in rules:
    raise StageConfigError(f"stage train preset {preset!r}: expected one of {PRESETS}")
  base = rules[preset]
  extra, frozen = tuple(extra_modules), tuple(frozen_modules)

  def trainable(name: str) -> bool:
    if name.startswith("vision."):
      return False  # the vision tower is frozen in every MoE-Tuning stage
    if any(m in name for m in frozen):
      return False
    return base(name) or any(m in name for m in extra)

  return trainable


def stage_trainable(s) -> Callable[[str], bool]:
  """`trainable_fn` of a stage's settings (`schema.StageSettings`)."""
  return trainable_fn(s.train, tuple(s.extra_modules), tuple(s.frozen_modules))


def describe(names: Iterable[str], trainable: Callable[[str], bool]) -> dict[str, int]:
  """Counts of trainable / frozen parameter tensors, for the run log."""
  names = list(names)
  n = sum(map(trainable, names))
  return {"trainable_tensors": n, "frozen_tensors": len(names) - n}
