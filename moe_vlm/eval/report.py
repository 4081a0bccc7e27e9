"""Held-out evaluation of trained stages and the stage-2 (dense) vs stage-3 (MoE) report.

For the synthetic data set: exact-match accuracy per question type on `eval.json`,
POPE metrics per negative-sampling category on `pope.json`, and for MoE models the
share of image and text tokens each expert receives per MoE layer (the paper's
routing figure as a table). Written to `<workdir>/report.json` and `report.md`.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_vlm.data import templates
from moe_vlm.eval import runner
from moe_vlm.eval.metrics import exact_match, pope_metrics
from moe_vlm.experiment import Experiment
from moe_vlm.files import write_json, write_text
from moe_vlm.infer.generate import left_pad
from moe_vlm.models.config import VLMConfig
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement


def _records(path: str, limit: int) -> list[dict]:
  with open(path) as f:
    records = json.load(f)
  return records[:limit] if limit else records


_ROUTING_KEYS = ("layers/top1_per_expert_image", "layers/top1_per_expert_text",
                 "layers/tokens_per_expert_image", "layers/tokens_per_expert_text")


@nnx.jit
def _routing_stats(model: VLM, ids, pixels, mask) -> dict:
  _, aux = model(ids, pixels, mask, dispatch="dropless")
  return {k: aux[k] for k in _ROUTING_KEYS}


def routing_stats(model: VLM, ids: np.ndarray, pixels: np.ndarray, mask: np.ndarray,
                  mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, np.ndarray]:
  """Per-expert token counts of one prompt batch (on `mesh` when the model is there)."""
  if mesh is None:
    stats = _routing_stats(model, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
  else:
    with mesh_lib.activation_sharding(mesh):
      stats = _routing_stats(model, *(mesh_lib.place_batch(x, mesh) for x in (ids, pixels, mask)))
  return {k: placement.host_value(v) for k, v in stats.items()}


def answer_questions(model: VLM, records: list[dict], tokenizer: Any, cfg: VLMConfig, *,
                     data_dir: str, template: str, normalization: str, batch_size: int,
                     max_new_tokens: int, mesh: Optional[jax.sharding.Mesh] = None
                     ) -> tuple[list[str], dict[str, np.ndarray]]:
  """Greedy answers to each record's first human turn, and summed routing statistics."""
  encoded = [templates.encode_prompt(r["conversations"][:1], tokenizer, template,
                                     num_image_tokens=cfg.num_image_tokens,
                                     image_token_id=cfg.image_token_id, with_router_mask=True)
             for r in records]
  prompts, spans = [p for p, _ in encoded], [r for _, r in encoded]
  load = runner.pixels_loader(data_dir, cfg.vision.image_size, normalization)
  routing: dict[str, np.ndarray] = collections.defaultdict(lambda: 0)

  def add_routing(batch: runner.Batch) -> None:
    ids, mask = left_pad(batch.prompts, templates.pad_id(tokenizer), batch.prompt_length)
    mask[batch.size:] = 0  # filler rows add nothing to the statistics
    for key, value in routing_stats(model, ids, batch.pixels, mask, mesh).items():
      routing[key] = routing[key] + value

  tokens = runner.generate_batches(
      model, tokenizer, prompts, lambda i: load(records[i].get("image")), batch_size=batch_size,
      max_new_tokens=max_new_tokens, on_batch=add_routing if cfg.text.moe is not None else None,
      mesh=mesh, router_masks=spans)
  return runner.decode(tokenizer, tokens), dict(routing)


def evaluate(model: VLM, cfg: VLMConfig, tokenizer: Any, c: ml_collections.ConfigDict,
             data_dir: str, mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
  kw = dict(tokenizer=tokenizer, cfg=cfg, data_dir=data_dir, template=c.stages.stage3.template,
            normalization=c.data.normalization, batch_size=c.eval.batch_size,
            max_new_tokens=c.eval.max_new_tokens, mesh=mesh)
  qa = _records(os.path.join(data_dir, c.data.eval_file), c.eval.max_examples)
  answers, routing = answer_questions(model, qa, **kw)
  by_type = collections.defaultdict(list)
  for r, a in zip(qa, answers):
    by_type[r["type"]].append(exact_match(a, r["answer"]))
  result: dict[str, Any] = {
      "accuracy": 100 * float(np.mean([x for v in by_type.values() for x in v])),
      "accuracy_by_type": {k: 100 * float(np.mean(v)) for k, v in sorted(by_type.items())},
      "examples": [{"q": r["question"], "answer": r["answer"], "prediction": a}
                   for r, a in list(zip(qa, answers))[:8]],
  }
  pope = _records(os.path.join(data_dir, c.data.pope_file), c.eval.max_examples)
  pope_answers, pope_routing = answer_questions(model, pope, **kw)
  result["pope"] = {"all": pope_metrics(pope_answers, [r["label"] for r in pope])}
  for cat in sorted({r["category"] for r in pope}):
    idx = [i for i, r in enumerate(pope) if r["category"] == cat]
    result["pope"][cat] = pope_metrics([pope_answers[i] for i in idx],
                                       [pope[i]["label"] for i in idx])
  if routing:
    total = {k: routing[k] + pope_routing[k] for k in routing}
    result["routing"] = {k.split("/")[1]: (v / np.maximum(v.sum(-1, keepdims=True), 1)).tolist()
                         for k, v in total.items()}
  return result


def stage_report(c: ml_collections.ConfigDict, workdir: str, *,
                 routing_plots: Optional[bool] = None) -> str:
  """Evaluates stage 2 and stage 3 finals; writes report.json/.md; returns the markdown.

  With `routing_plots` (default: config eval.routing_plots) the stage-3 routing figures
  go to <workdir>/routing_image_text.png, routing_top1_heatmap.png and
  routing_modality_mix.png (prompt tokens of the held-out questions). With several
  processes the models stay on the training mesh; every process evaluates (the same
  questions: the batches are split over the mesh) and process 0 writes the files.
  """
  exp = Experiment(c, workdir)
  mesh = exp.mesh() if jax.process_count() > 1 else None
  results, cfgs = {}, {}
  for k in (2, 3):
    cfgs[k] = exp.model_config(k)
    results[f"stage{k}"] = evaluate(exp.load_model(k, mesh), cfgs[k], exp.tokenizer, c,
                                    exp.data_dir, mesh)
  md = to_markdown(results, c)
  write_json(exp.path("report.json"), results)
  write_text(exp.path("report.md"), md)
  if routing_plots is None:
    routing_plots = exp.settings.eval.routing_plots
  if routing_plots and results["stage3"].get("routing") and jax.process_index() == 0:
    from moe_vlm.eval import routing
    routing.write_plots(routing.shares_from_report(results["stage3"]["routing"]),
                        cfgs[3].text.moe_layers(), workdir)
  return md


def to_markdown(results: dict[str, Any], c: ml_collections.ConfigDict) -> str:
  types = sorted(results["stage2"]["accuracy_by_type"])
  lines = ["## Held-out synthetic evaluation: stage 2 (dense) vs stage 3 (MoE)", "",
           "| model | accuracy | " + " | ".join(types) +
           " | POPE acc | POPE F1 | POPE yes-ratio |",
           "|---" * (len(types) + 5) + "|"]
  for k, name in (("stage2", "stage 2 dense"),
                  ("stage3", f"stage 3 MoE {c.moe.num_experts}x top-{c.moe.top_k}")):
    r = results[k]
    p = r["pope"]["all"]
    lines.append(f"| {name} | {r['accuracy']:.1f} | " +
                 " | ".join(f"{r['accuracy_by_type'][t]:.1f}" for t in types) +
                 f" | {p['accuracy']:.1f} | {p['f1']:.1f} | {p['yes_ratio']:.1f} |")
  lines += ["", "POPE by negative sampling (stage 3): " + ", ".join(
      f"{cat} acc {m['accuracy']:.1f} / F1 {m['f1']:.1f}"
      for cat, m in results["stage3"]["pope"].items() if cat != "all")]
  routing = results["stage3"].get("routing")
  if routing:
    lines += ["", "Top-1 expert share per MoE layer (image tokens | text tokens):", "",
              "| layer | " + " | ".join(f"e{e} img" for e in range(c.moe.num_experts)) + " | " +
              " | ".join(f"e{e} txt" for e in range(c.moe.num_experts)) + " |",
              "|---" * (2 * c.moe.num_experts + 1) + "|"]
    for layer, (img, txt) in enumerate(zip(routing["top1_per_expert_image"],
                                           routing["top1_per_expert_text"])):
      lines.append(f"| {layer} | " + " | ".join(f"{v:.2f}" for v in img) + " | " +
                   " | ".join(f"{v:.2f}" for v in txt) + " |")
  return "\n".join(lines) + "\n"
