"""Routing analysis: which experts image and text tokens go to, per MoE layer.

The paper's routing figures (MoE-LLaVA Fig. 5-7, `moellava/vis/vis{1,2,3}.py`) come
from the router logits of each MoE layer: top-1 = argmax, split into image positions
and text positions; per expert, text counts are rescaled by #image/#text tokens so
the two modalities weigh the same; and the top-1 expert of single tokens is followed
across layers ("paths"). Here:

  * `router_choices` runs the model once and returns every MoE layer's router logits
    and top-k experts per token, captured from the routers themselves
    (`nnx.capture`), so they are exactly the choices the forward pass made;
  * `RoutingCounter` accumulates counts per layer x modality x expert, for the top-1
    choice and for all k choices, plus top-1 paths;
  * `RoutingStats` turns them into shares (each layer's shares sum to 1 per modality),
    JSON, a markdown table and PNG figures.

Counts are pooled over tokens (the paper's scripts average per-sample shares; with
prompts of similar length the two agree closely).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_vlm.models.moe import IMAGE, PAD, TEXT, Router, top_k_gating
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement

# Token modalities are the model's own codes (moe.IMAGE, moe.TEXT, moe.PAD). The count
# arrays' modality axis holds MODALITIES in this order: slot i counts code CODES[i].
MODALITIES = ("image", "text")
CODES = (IMAGE, TEXT)


class NoMoEError(ValueError):
  """Routing analysis asked of a model without MoE layers."""


# ------------------------------------------------------------------ capture choices


def router_paths(model: nnx.Module) -> tuple[tuple[Any, ...], ...]:
  """Graph paths of the MoE routers, in layer order."""
  paths = tuple(p for p, node in nnx.iter_graph(model) if isinstance(node, Router))
  if not paths:
    raise NoMoEError("the model has no MoE layers: routing analysis needs a stage-3 model")
  return paths


def moe_layer_indices(paths: Sequence[tuple[Any, ...]]) -> tuple[int, ...]:
  """Decoder layer index of each router path ('llm', 'layers', i, 'mlp', 'router')."""
  return tuple(int(p[p.index("layers") + 1]) if "layers" in p else n
               for n, p in enumerate(paths))


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _choices(graphdef, state, ids, pixels, mask, paths, top_k, grid=None):
  model = nnx.merge(graphdef, state)
  # method_outputs sows what every module method returns; only the routers' __call__
  # outputs are read below, XLA drops the rest.
  forward = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
  _, captured = forward(ids, pixels, mask, dispatch="dropless", image_grid_thw=grid)
  flat = dict(nnx.to_flat_state(captured))
  missing = [p for p in paths if p + ("__call__",) not in flat]
  if missing:
    # The expert-parallel path (a mesh with ep_impl="shard_map") calls the routers
    # inside shard_map, where nothing can be captured: analyse without a mesh.
    raise RuntimeError(f"no router logits captured for {missing}; run the routing "
                       "analysis outside a device mesh")
  logits = jnp.stack([flat[p + ("__call__",)].get_value()[0] for p in paths])  # [n, B*L, E]
  _, _, idx = top_k_gating(logits, top_k)  # the model's own choice (same tie-breaking)
  b, l = ids.shape
  return logits.reshape(len(paths), b, l, -1), idx.reshape(len(paths), b, l, top_k)


def router_choices(model: nnx.Module, ids: np.ndarray, pixels: Optional[np.ndarray],
                   mask: np.ndarray, mesh: Optional[jax.sharding.Mesh] = None,
                   grids: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
  """Router logits [n_moe, B, L, E] (fp32) and top-k experts [n_moe, B, L, k]. With
  `mesh` (the model's parameters on it), the batch is placed there too. `grids`:
  Qwen2-VL's image grids [B, 3]."""
  paths = router_paths(model)
  graphdef, state = nnx.split(model)
  top_k = model.cfg.text.moe.top_k
  place = jnp.asarray if mesh is None else lambda x: mesh_lib.place_batch(x, mesh)
  logits, idx = _choices(graphdef, state, place(ids),
                         None if pixels is None else place(pixels), place(mask), paths, top_k,
                         None if grids is None else place(grids))
  return placement.host_value(logits), placement.host_value(idx)


def modality_of(ids: np.ndarray, mask: np.ndarray, image_token_id: int) -> np.ndarray:
  """[B, L] -> the model's modality code per token: IMAGE, TEXT, or PAD where the mask
  is 0 (as `VLM` computes it for the MoE layers' statistics)."""
  out = np.where(ids == image_token_id, IMAGE, TEXT)
  return np.where(np.asarray(mask).astype(bool), out, PAD)


# ------------------------------------------------------------------ accumulate


@dataclasses.dataclass
class RoutingStats:
  """Routing counts of one model over a set of samples."""
  layers: tuple[int, ...]  # decoder layer of each MoE layer
  num_experts: int
  top_k: int
  top1: np.ndarray  # [n_moe, 2 (image, text), E] tokens whose first choice is e
  topk: np.ndarray  # [n_moe, 2, E] all k choices (each token counted k times)
  paths: dict[str, collections.Counter] = dataclasses.field(
      default_factory=lambda: {m: collections.Counter() for m in MODALITIES})
  examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  @property
  def tokens(self) -> dict[str, int]:
    return {m: int(self.top1[0, i].sum()) for i, m in enumerate(MODALITIES)}

  def shares(self) -> dict[str, dict[str, np.ndarray]]:
    """{"top1"|"topk": {"image"|"text": [n_moe, E]}}, each row summing to 1 (0 if empty)."""
    norm = lambda c: c / np.maximum(c.sum(-1, keepdims=True), 1)
    return {kind: {m: norm(counts[:, i].astype(np.float64)) for i, m in enumerate(MODALITIES)}
            for kind, counts in (("top1", self.top1), ("topk", self.topk))}

  def common_paths(self, n: int = 5) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for m in MODALITIES:
      total = sum(self.paths[m].values())
      out[m] = [{"path": list(p), "share": c / total}
                for p, c in self.paths[m].most_common(n)]
    return out

  def to_json(self) -> dict[str, Any]:
    shares = self.shares()
    return {
        "moe_layers": list(self.layers), "num_experts": self.num_experts,
        "top_k": self.top_k, "tokens": self.tokens,
        "top1_share": {m: v.tolist() for m, v in shares["top1"].items()},
        "topk_share": {m: v.tolist() for m, v in shares["topk"].items()},
        "image_fraction_per_expert": _nan_to_none(image_fraction(shares["top1"])),
        "top1_counts": self.top1.tolist(), "topk_counts": self.topk.tolist(),
        "common_paths": self.common_paths(), "token_paths": self.examples,
    }


def image_fraction(top1_share: dict[str, np.ndarray]) -> np.ndarray:
  """[n_moe, E]: the image part of each expert's top-1 load with text counts rescaled by
  #image/#text tokens (MoE-LLaVA vis1.py), i.e. share_img / (share_img + share_text);
  NaN for an expert no token picked."""
  img, txt = top1_share["image"], top1_share["text"]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(img + txt > 0, img / (img + txt), np.nan)


def _nan_to_none(a: np.ndarray) -> list:
  return [[None if np.isnan(v) else float(v) for v in row] for row in a]


class RoutingCounter:
  """Feeds batches through `router_choices` and accumulates `RoutingStats`."""

  def __init__(self, model: nnx.Module, *, image_token_id: int, num_examples: int = 4,
               token_text: Optional[Callable[[int], str]] = None,
               mesh: Optional[jax.sharding.Mesh] = None):
    paths = router_paths(model)
    moe = model.cfg.text.moe
    n, e = len(paths), moe.num_experts
    self.model = model
    self.mesh = mesh
    self.image_token_id = image_token_id
    self.num_examples = num_examples
    self.token_text = token_text or str
    self.stats = RoutingStats(layers=moe_layer_indices(paths), num_experts=e, top_k=moe.top_k,
                              top1=np.zeros((n, 2, e), np.int64),
                              topk=np.zeros((n, 2, e), np.int64))
    self.samples = 0

  def add(self, ids: np.ndarray, pixels: Optional[np.ndarray], mask: np.ndarray,
          rows: Optional[int] = None, grids: Optional[np.ndarray] = None) -> np.ndarray:
    """Counts the first `rows` rows of a batch (the rest are shape filler); returns the
    top-k choices [n_moe, B, L, k] for callers that look further."""
    _, idx = router_choices(self.model, ids, pixels, mask, self.mesh, grids)
    counted = np.asarray(mask).copy()
    if rows is not None:
      counted[rows:] = 0  # after the forward pass: filler rows still run unmasked
    self.add_choices(ids, counted, idx)
    return idx

  def add_choices(self, ids: np.ndarray, mask: np.ndarray, idx: np.ndarray) -> None:
    s, e = self.stats, self.stats.num_experts
    modality = modality_of(np.asarray(ids), mask, self.image_token_id)
    for slot, code in enumerate(CODES):
      chosen = idx[:, modality == code]  # [n_moe, T, k]
      for layer in range(len(s.layers)):
        s.top1[layer, slot] += np.bincount(chosen[layer, :, 0], minlength=e)
        s.topk[layer, slot] += np.bincount(chosen[layer].reshape(-1), minlength=e)
      s.paths[MODALITIES[slot]].update(map(tuple, chosen[:, :, 0].T.tolist()))
    self._examples(np.asarray(ids), modality, idx)
    self.samples += int(np.any(modality != PAD, axis=1).sum())

  def _examples(self, ids: np.ndarray, modality: np.ndarray, idx: np.ndarray) -> None:
    """A few tokens of the first sample with an image: evenly spaced per modality."""
    if self.stats.examples or not self.num_examples:
      return
    rows = [r for r in range(ids.shape[0]) if np.any(modality[r] == IMAGE)]
    if not rows:
      return
    r = rows[0]
    start = int(np.argmax(modality[r] != PAD))  # first real token (prompts are left-padded)
    for slot, code in enumerate(CODES):
      where = np.flatnonzero(modality[r] == code)
      pick = where[np.linspace(0, len(where) - 1, min(self.num_examples, len(where)))
                   .round().astype(int)] if len(where) else []
      for pos in pick:
        token = (f"<image {int(np.sum(modality[r, :pos] == IMAGE))}>" if code == IMAGE
                 else self.token_text(int(ids[r, pos])))
        self.stats.examples.append({
            "sample": self.samples + r, "position": int(pos - start),
            "modality": MODALITIES[slot], "token": token,
            "path": [int(e) for e in idx[:, r, pos, 0]]})


# ------------------------------------------------------------------ report


def to_markdown(stats_json: dict[str, Any]) -> str:
  """Tables of the top-1 and all-k shares per MoE layer, and the common top-1 paths."""
  e = stats_json["num_experts"]
  head = ("| MoE layer | " + " | ".join(f"e{i} img" for i in range(e)) + " | " +
          " | ".join(f"e{i} txt" for i in range(e)) + " |")
  rule = "|---" * (2 * e + 1) + "|"
  lines = [f"Routing over {stats_json['tokens']['image']} image and "
           f"{stats_json['tokens']['text']} text tokens ({e} experts, top-{stats_json['top_k']}).",
           ""]
  for key, title in (("top1_share", "Top-1 expert share"),
                     ("topk_share", f"Share of all top-{stats_json['top_k']} assignments")):
    lines += [f"{title} per MoE layer (image tokens | text tokens):", "", head, rule]
    for n, layer in enumerate(stats_json["moe_layers"]):
      img, txt = stats_json[key]["image"][n], stats_json[key]["text"][n]
      lines.append(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in img) + " | " +
                   " | ".join(f"{v:.3f}" for v in txt) + " |")
    lines.append("")
  frac = stats_json.get("image_fraction_per_expert")
  if frac:
    lines += ["Image part of each expert's top-1 load (text rescaled by #image/#text):", "",
              "| MoE layer | " + " | ".join(f"e{i}" for i in range(e)) + " |",
              "|---" * (e + 1) + "|"]
    for n, layer in enumerate(stats_json["moe_layers"]):
      lines.append(f"| {layer} | " + " | ".join("-" if v is None else f"{v:.3f}"
                                                for v in frac[n]) + " |")
    lines.append("")
  common = stats_json.get("common_paths") or {}
  for m in MODALITIES:
    if common.get(m):
      lines.append(f"Most common top-1 paths ({m} tokens, expert per MoE layer): " + ", ".join(
          f"{'-'.join(map(str, p['path']))} ({100 * p['share']:.1f}%)" for p in common[m]))
  return "\n".join(lines).rstrip() + "\n"


def write(stats: RoutingStats, out_dir: str, *, plots: bool = True) -> dict[str, str]:
  """routing.json, routing.md and (with `plots`) the PNG figures; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  data = stats.to_json()
  files = {"json": os.path.join(out_dir, "routing.json"),
           "markdown": os.path.join(out_dir, "routing.md")}
  with open(files["json"], "w") as f:
    json.dump(data, f, indent=2)
  with open(files["markdown"], "w") as f:
    f.write(to_markdown(data))
  if plots:
    files.update(write_plots(stats.shares(), stats.layers, out_dir,
                             paths=stats.common_paths(8), examples=stats.examples))
  return files


# ------------------------------------------------------------------ figures

_COLORS = ("#62A0CA", "#FFA556", "#6BBC6B", "#E26868", "#9D7FC7", "#A1887F", "#E991C4",
           "#9E9E9E")  # the paper's four first, then more for larger expert counts


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt
  return plt


def _color(e: int) -> str:
  return _COLORS[e % len(_COLORS)]


def write_plots(shares: dict[str, dict[str, np.ndarray]], layers: Sequence[int], out_dir: str,
                *, paths: Optional[dict[str, list[dict[str, Any]]]] = None,
                examples: Sequence[dict[str, Any]] = ()) -> dict[str, str]:
  """The figures from per-modality shares ({"top1"|"topk": {"image"|"text": [n_moe, E]}}):
  routing_image_text.png (stacked expert shares per modality over layers),
  routing_top1_heatmap.png, routing_modality_mix.png and, given paths,
  routing_paths.png."""
  plt = _pyplot()
  os.makedirs(out_dir, exist_ok=True)
  out = {}
  shares = {k: {m: np.asarray(v, np.float64) for m, v in d.items()} for k, d in shares.items()}
  out["image_text"] = _plot_stacked(plt, shares, layers, os.path.join(out_dir,
                                                                      "routing_image_text.png"))
  out["top1_heatmap"] = _plot_heatmap(plt, shares["top1"], layers,
                                      os.path.join(out_dir, "routing_top1_heatmap.png"))
  out["modality_mix"] = _plot_mix(plt, image_fraction(shares["top1"]), layers,
                                  os.path.join(out_dir, "routing_modality_mix.png"))
  if paths and any(paths.values()):
    e = shares["top1"]["image"].shape[-1]
    out["paths"] = _plot_paths(plt, paths, examples, layers, e,
                               os.path.join(out_dir, "routing_paths.png"))
  return out


def _layer_axis(ax, layers: Sequence[int]) -> np.ndarray:
  """x ticks labelled with the decoder layer index of each MoE layer."""
  x = np.arange(len(layers))
  ax.set_xticks(x)
  ax.set_xticklabels([str(l) for l in layers])
  ax.set_xlabel("MoE layer")
  return x


def _plot_stacked(plt, shares, layers, path: str) -> str:
  kinds = [k for k in ("top1", "topk") if k in shares]
  e = shares["top1"]["image"].shape[-1]
  fig, axes = plt.subplots(len(kinds), 2, figsize=(5 + 0.8 * len(layers), 3.4 * len(kinds)),
                           sharey=True, squeeze=False, layout="constrained")
  for row, kind in enumerate(kinds):
    for col, m in enumerate(("text", "image")):  # the paper's order: text left, image right
      ax = axes[row, col]
      x = _layer_axis(ax, layers)
      bottom = np.zeros(len(layers))
      for i in range(e):
        ax.bar(x, shares[kind][m][:, i], bottom=bottom, color=_color(i), label=f"expert {i}")
        bottom += shares[kind][m][:, i]
      for q in range(1, e):
        ax.axhline(q / e, color="gray", linestyle="--", linewidth=0.8)
      ax.set_ylim(0, 1.0)
      ax.set_title(f"{m.capitalize()} tokens: {'top-1' if kind == 'top1' else 'all top-k'}")
      if col == 0:
        ax.set_ylabel("share of tokens")
  axes[0, 1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plot_heatmap(plt, top1, layers, path: str) -> str:
  e = top1["image"].shape[-1]
  fig, axes = plt.subplots(1, 2, figsize=(3 + 0.7 * e * 2, max(3.0, 1.5 + 0.45 * len(layers))),
                           squeeze=False, layout="constrained")
  for ax, m in zip(axes[0], ("image", "text")):
    im = ax.imshow(top1[m], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (r, c), v in np.ndenumerate(top1[m]):
      ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
              color="white" if v < 0.5 else "black")
    ax.set_xticks(range(e))
    ax.set_xticklabels([f"e{i}" for i in range(e)])
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(l) for l in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Top-1 share, {m} tokens")
  fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plot_mix(plt, frac: np.ndarray, layers, path: str) -> str:
  e = frac.shape[-1]
  fig, axes = plt.subplots(1, e, figsize=(2.2 + 2.2 * e, 3.2), sharey=True, squeeze=False,
                           layout="constrained")
  img = np.nan_to_num(frac, nan=0.0)
  txt = np.where(np.isnan(frac), 0.0, 1.0 - frac)
  for i, ax in enumerate(axes[0]):
    x = _layer_axis(ax, layers)
    ax.bar(x, txt[:, i], color=_color(i), alpha=0.55, label="text (rescaled)")
    ax.bar(x, img[:, i], bottom=txt[:, i], color=_color(i), label="image")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, 1.0)
    ax.set_title(f"Expert {i}")
    ax.legend(loc="lower left", fontsize=7)
  axes[0, 0].set_ylabel("part of the expert's top-1 load")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plot_paths(plt, paths, examples, layers, e: int, path: str) -> str:
  fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 3 + 0.9 * len(layers)), 6), sharex=True,
                           squeeze=False, layout="constrained")
  x = np.arange(len(layers))
  for ax, m in zip(axes[:, 0], ("text", "image")):
    common = paths.get(m) or []
    top = max((p["share"] for p in common), default=1.0)
    for rank, p in enumerate(common):
      jitter = (rank - len(common) / 2) * 0.025  # overlapping paths stay distinguishable
      ax.plot(x, np.asarray(p["path"]) + jitter, marker="o", color=f"C{rank % 10}",
              linewidth=0.8 + 4.0 * p["share"] / top, alpha=0.85,
              label=f"{100 * p['share']:.1f}%")
    for ex in examples:
      if ex["modality"] == m:
        ax.plot(x, ex["path"], linestyle=":", marker="x", color="black", alpha=0.5,
                linewidth=0.8)
    ax.set_yticks(range(e))
    ax.set_yticklabels([f"e{i}" for i in range(e)])
    ax.set_ylim(-0.5, e - 0.5)
    ax.invert_yaxis()
    ax.set_ylabel("top-1 expert")
    ax.set_title(f"{m.capitalize()} tokens: common top-1 paths (dotted: single tokens)")
    if common:
      ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title="share")
  _layer_axis(axes[1, 0], layers)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def shares_from_report(routing: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """`evaluate()`'s result["routing"] (aux statistics, prompt tokens) -> `write_plots` input."""
  return {"top1": {m: np.asarray(routing[f"top1_per_expert_{m}"]) for m in MODALITIES},
          "topk": {m: np.asarray(routing[f"tokens_per_expert_{m}"]) for m in MODALITIES}}
