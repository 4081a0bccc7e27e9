"""The package's one cost model: chips, the real variants' dimensions, train-step FLOPs,
and bytes per device (parameters, memory, attention traffic, inter-chip traffic).

The benchmarks (`bench.config`, `bench.mfu`, `bench.train_step`, `bench.scaling`), the
stage cost estimate (`launch/estimate.py`) and the mesh presets' memory check
(`configs/topologies.py`) all read their figures from here, so a FLOP or byte count
printed by one is the count the others print, and a fix lands in all of them.

Parameter counts and matmul weights come from the model's real parameter tree
(`ParamCodec.abstract`: shapes only, nothing allocated), not from a second copy of the
architecture; what is not a parameter (attention scores, activations) is computed from
the config.

Importing this module needs no jax: `configs/topologies.py` imports it on machines
without the accelerator stack. The functions that build the parameter tree import the
model code when first called.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Optional, Union

from moe_vlm.train import stages as stages_lib

if TYPE_CHECKING:
  from moe_vlm.models.config import MoEConfig, VLMConfig

GiB = 1024 ** 3
# A stage's trainable set: a `moe_vlm.train.stages` preset name, or a predicate over
# dotted parameter names.
Train = Union[str, Callable[[str], bool]]

# ------------------------------------------------------------------------- chips


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip as Google publishes it (cloud.google.com/tpu/docs/v4, /v5e, /v5p).

  `hbm_bw` and the ICI figures are only filled in where the step-time estimate
  (`bench.scaling --paper-estimate`) uses them.
  """
  name: str
  peak_flops: float                 # dense bf16 FLOP/s
  hbm_gib: float                    # HBM per chip
  price_per_chip_hour: float        # USD, on-demand
  hbm_bw: Optional[float] = None    # bytes/s
  ici_bw: Optional[float] = None    # bidirectional inter-chip bytes/s per chip, all ports
  ici_ports: Optional[int] = None

  @property
  def hbm_bytes(self) -> float:
    return self.hbm_gib * GiB

  @property
  def ici_send_bw(self) -> float:
    """What a chip can send: half the bidirectional figure, every port busy."""
    if self.ici_bw is None:
      raise ValueError(f"{self.name}: no ICI bandwidth in moe_vlm.cost.CHIPS")
    return self.ici_bw / 2


# Prices are assumptions: Google Cloud's on-demand list prices per chip-hour in US
# regions as published in 2024 (v4 us-central2, v5e us-west4 / us-east1, v5p us-east5),
# not re-checked when this was written (no web access here, 2026-11-23): check
# cloud.google.com/tpu/pricing and pass launch/estimate.py --price.
CHIPS = {
    "v4": Chip("TPU v4", peak_flops=275e12, hbm_gib=32, price_per_chip_hour=3.22),
    "v5e": Chip("TPU v5e", peak_flops=197e12, hbm_gib=16, price_per_chip_hour=1.20,
                hbm_bw=819e9, ici_bw=400e9, ici_ports=4),
    "v5p": Chip("TPU v5p", peak_flops=459e12, hbm_gib=95, price_per_chip_hour=4.20,
                hbm_bw=2765e9, ici_bw=1200e9, ici_ports=6),
}

# --------------------------------------------------------- the real variants

# config.json of the checkpoints MoE-LLaVA starts from (configs/moe_llava.py `init`), the
# fields the importer reads: the one table of the variants' dimensions. Shapes only; no
# weights are needed.
HF_TEXT = {
    "stablelm": dict(  # stabilityai/stablelm-2-1_6b
        model_type="stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632,
        num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
        hidden_act="silu", layer_norm_eps=1e-5, partial_rotary_factor=0.25,
        rope_theta=10000, use_qkv_bias=True, use_parallel_residual=False,
        qk_layernorm=False, tie_word_embeddings=False),
    "qwen": dict(  # Qwen/Qwen1.5-1.8B
        model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=5504,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=False),
    "phi2": dict(  # microsoft/phi-2
        model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        hidden_act="gelu_new", layer_norm_eps=1e-5, partial_rotary_factor=0.4,
        rope_theta=10000.0, qk_layernorm=False, tie_word_embeddings=False),
}
HF_VISION = {
    "clip": dict(  # openai/clip-vit-large-patch14-336, vision_config
        model_type="clip_vision_model", image_size=336, patch_size=14, num_channels=3,
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip": dict(  # google/siglip-so400m-patch14-384, vision_config
        model_type="siglip_vision_model", image_size=384, patch_size=14, num_channels=3,
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}
# configs/moe_llava.py's variants: (LLM, vision tower).
VARIANTS = {"stablelm": ("stablelm", "clip"), "qwen": ("qwen", "clip"),
            "phi2": ("phi2", "clip"), "phi2_siglip": ("phi2", "siglip")}
# MoE-Tuning's trainable set per stage (configs/moe_llava.py `stages`).
STAGE_TRAIN = {1: "projector", 2: "projector_llm", 3: "moe_layers"}


def moe_llava_moe(num_experts: int = 4, **kw) -> "MoEConfig":
  """configs/moe_llava.py's MoE settings (top-2, every other layer, capacity 1.5), with
  `kw` replacing any of them: the stage-3 model's MoE where no config file is read."""
  from moe_vlm.models.config import MoEConfig
  base = dict(num_experts=num_experts, top_k=2, moe_mode="sparse", dispatch="capacity",
              capacity_factor=1.5, eval_capacity_factor=2.0, aux_loss_coef=0.01)
  return MoEConfig(**{**base, **kw})


def real_config(variant: str, moe: Optional["MoEConfig"] = None, *,
                layers: Optional[int] = None, vision_layers: Optional[int] = None,
                dtype: str = "bfloat16", remat: str = "full") -> "VLMConfig":
  """A MoE-LLaVA variant's VLMConfig through the importer `experiment.model_config` uses,
  with the paper's execution settings (bf16 compute, fp32 params, full remat) and the LLaVA
  wiring of configs/moe_llava.py (mlp2x_gelu projector, features of layer -2, the first
  token dropped). `layers` / `vision_layers` cut the depth (compile time); everything
  else is the real model."""
  from moe_vlm.convert import hf
  from moe_vlm.models.config import VLMConfig
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}: expected one of {sorted(VARIANTS)}")
  llm, tower = VARIANTS[variant]
  text = hf.text_config_from_hf(types.SimpleNamespace(**HF_TEXT[llm]), dtype)
  vision = hf.vision_config_from_hf(types.SimpleNamespace(**HF_VISION[tower]), dtype)
  text = dataclasses.replace(text, remat=remat, moe=moe, num_layers=layers or text.num_layers)
  vision = dataclasses.replace(vision, num_layers=vision_layers or vision.num_layers)
  cfg = VLMConfig(vision=vision, text=text, projector="mlp2x_gelu", vision_feature_layer=-2,
                  vision_feature_select_strategy="default",
                  image_token_id=text.vocab_size - 1)
  cfg.validate()
  return cfg


# ----------------------------------------------------------- the parameter tree


class Param(NamedTuple):
  name: str                # dotted path, as ParamCodec names it
  shape: tuple[int, ...]
  itemsize: int            # bytes per element (the config's param_dtype)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.itemsize


@functools.lru_cache(maxsize=32)
def param_table(cfg: "VLMConfig") -> tuple[Param, ...]:
  """Every parameter of `VLM(cfg)`, from its abstract tree (nothing is allocated).

  The vision tower is built with one layer and that layer's entries are repeated for
  each of its layers: ViT layers are identical, and building 24-27 more of them costs
  seconds per config (nnx's abstract init grows faster than linearly with depth)."""
  from flax import nnx
  from moe_vlm.models.params import ParamCodec
  from moe_vlm.models.vlm import VLM
  one = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_layers=1))
  shapes = ParamCodec.abstract(lambda: VLM(one, rngs=nnx.Rngs(0))).shapes
  out = []
  for name, a in shapes.items():
    layer0 = name.startswith("vision.layers.0.")
    for i in range(cfg.vision.num_layers if layer0 else 1):
      full = f"vision.layers.{i}." + name[len("vision.layers.0."):] if layer0 else name
      out.append(Param(full, tuple(a.shape), a.dtype.itemsize))
  return tuple(out)


def _trainable_fn(train: Train) -> Callable[[str], bool]:
  """The predicate over parameter names of a stage preset (or the predicate itself)."""
  return stages_lib.trainable_fn(train) if isinstance(train, str) else train


def _trainable_parts(cfg: "VLMConfig", train: Train) -> Callable[[str], bool]:
  """Whether any parameter under a dotted prefix trains (a gradient must reach it)."""
  trainable = _trainable_fn(train)
  names = [p.name for p in param_table(cfg) if trainable(p.name)]
  return lambda prefix: any(n.startswith(prefix) for n in names)


def _param_totals(cfg: "VLMConfig", train: Optional[Train],
                  measure: Callable[[Param], int]) -> dict[str, int]:
  trainable = _trainable_fn(train) if train is not None else (lambda _: False)
  keys = ("vision", "projector", "llm", "dense", "expert", "dense_trainable",
          "expert_trainable", "dense_decoder", "embed")
  out: dict[str, int] = dict.fromkeys(keys, 0)
  for p in param_table(cfg):
    n = measure(p)
    part = p.name.split(".")[0]  # vision, projector, llm (or another top-level module)
    out[part] = out.get(part, 0) + n
    kind = "expert" if ".mlp.experts." in p.name else "dense"
    out[kind] += n
    if trainable(p.name):
      out[f"{kind}_trainable"] += n
    if kind == "dense" and p.name.startswith("llm.layers."):
      out["dense_decoder"] += n
    if p.name.startswith("llm.embed"):
      out["embed"] += n
  return out


def param_counts(cfg: "VLMConfig", train: Optional[Train] = None) -> dict[str, int]:
  """Parameters of `VLM(cfg)` by part: "vision", "projector", "llm" (embeddings, decoder,
  head, experts included); "expert" (the routed experts' weights, sharded over the
  expert axis too) and "dense" (everything else, routers included), and of those what
  `train` trains ("*_trainable"); "dense_decoder" (dense weights inside decoder blocks)
  and "embed" (the token embedding table), which meshes gather differently."""
  return _param_totals(cfg, train, lambda p: p.size)


def param_bytes(cfg: "VLMConfig", train: Optional[Train] = None) -> dict[str, int]:
  """`param_counts` in bytes of the parameters' own dtype."""
  return _param_totals(cfg, train, lambda p: p.nbytes)


# -------------------------------------------------------------- matmul weights


class Group(NamedTuple):
  """Matmuls that read the same input, as (parameter name, weights per token) pairs: the
  names say which of them a stage trains (an MoE layer's experts: ONE expert's weights)."""
  members: tuple[tuple[str, int], ...] = ()

  @property
  def weights(self) -> int:
    return sum(w for _, w in self.members)


class Block(NamedTuple):
  """A decoder layer's matmuls in the two levels of each of its chains: the output
  projection (o) needs an input gradient when q, k or v train, the FFN's down
  projection when its gate/up (fc1) does, even with nothing trainable below."""
  attn_in: Group = Group()     # q, k, v
  attn_out: Group = Group()    # o
  ffn_in: Group = Group()      # gate and up (or fc1) of a dense FFN; an MoE layer's router
  ffn_out: Group = Group()     # down (fc2) of a dense FFN
  expert_in: Group = Group()   # one routed expert's gate and up (or fc1)
  expert_out: Group = Group()  # one routed expert's down (fc2)


@dataclasses.dataclass(frozen=True)
class Matmuls:
  """Matmul weights a token meets, per part of the model, from the parameter tree
  (which parameters are matmul weights: `_is_matmul`)."""
  vision_layer: int                 # one vision layer (all are alike)
  patch: int                        # the patch embedding: a matmul over each patch's pixels
  projector: tuple[Group, ...]      # each projector matmul, in forward order
  layers: tuple[Block, ...]         # each decoder layer
  lm_head: Group                    # tied embeddings: the embedding table

  def active(self, top_k: int) -> dict[str, int]:
    """Weights per token of each part with `top_k` routed experts active."""
    ffn = sum(b.ffn_in.weights + b.ffn_out.weights
              + top_k * (b.expert_in.weights + b.expert_out.weights) for b in self.layers)
    return dict(vision_layer=self.vision_layer, patch=self.patch,
                projector=sum(g.weights for g in self.projector),
                attention=sum(b.attn_in.weights + b.attn_out.weights for b in self.layers),
                ffn=ffn, lm_head=self.lm_head.weights)


def _is_matmul(p: Param, tied: bool) -> bool:
  """Whether a parameter multiplies activations: matrices (per expert: [E, in, out]),
  not biases (an MoE layer's are [E, out]) nor tables (the token embedding's gather,
  unless the head reuses it; the vision position embedding, an add)."""
  if p.name == "llm.embed":
    return tied
  last = p.name.rsplit(".", 1)[-1]
  return len(p.shape) >= 2 and not last.endswith("bias") and "embed" not in last


_OUTPUT_PROJECTIONS = ("out", "wo", "fc2")  # the second matmul of attention and FFNs


def _block_field(name: str) -> str:
  """Which `Block` field a decoder matmul weight `llm.layers.i.<module>...` belongs to."""
  parts = name.split(".")
  level = "out" if any(m in _OUTPUT_PROJECTIONS for m in parts[4:]) else "in"
  if parts[3] == "attn":
    return f"attn_{level}"
  if ".mlp.experts." in name:
    return f"expert_{level}"
  return f"ffn_{level}"


def _add(group: Group, weights: int, name: str) -> Group:
  return Group(group.members + ((name, weights),))


@functools.lru_cache(maxsize=32)
def matmul_weights(cfg: "VLMConfig") -> Matmuls:
  """The model's matmul weights per token (see `Matmuls`), read off `param_table`."""
  t = cfg.text
  vision_layer = patch = 0
  head, projector = Group(), {}
  layers = [Block() for _ in range(t.num_layers)]
  for p in param_table(cfg):
    name, size = p.name, p.size
    if not _is_matmul(p, t.tie_embeddings):
      continue
    if name.startswith("vision.layers."):
      vision_layer += size if name.split(".")[2] == "0" else 0
    elif name.startswith("vision."):
      patch += size
    elif name.startswith("projector."):
      prefix = name.rsplit(".", 1)[0]
      projector[prefix] = _add(projector.get(prefix, Group()), size, name)
    elif name.startswith(("llm.lm_head.", "llm.embed")):
      head = _add(head, size, name)
    elif name.startswith("llm.layers."):
      i, field = int(name.split(".")[2]), _block_field(name)
      size = size // t.moe.num_experts if field.startswith("expert") else size
      layers[i] = layers[i]._replace(**{field: _add(getattr(layers[i], field), size, name)})
    else:
      raise ValueError(f"moe_vlm.cost: no FLOP rule for the matrix parameter {name!r}")
  # Sorted names run in forward order: linear_1 before linear_2 (mlp2x_gelu).
  return Matmuls(vision_layer, patch, tuple(g for _, g in sorted(projector.items())),
                 tuple(layers), head)


# ------------------------------------------------------------------------ FLOPs


@dataclasses.dataclass(frozen=True)
class _Step:
  """What every decoder layer of one train step shares."""
  tokens: int
  scores: float          # q k^T and p v over the full L x L, forward, one layer
  exec_scores: float     # what the causal query blocks compute of it
  top_k: int
  rows_per_token: float  # expert rows executed per token (top_k: no waste)
  uncounted_rows: int    # expert rows per matmul XLA's cost analysis does not see
  remat: bool
  trainable: Callable[[str], bool]

  def trained(self, g: Group) -> bool:
    return any(self.trainable(n) for n, _ in g.members)

  def level(self, g: Group, below: bool) -> float:
    """Weights x passes of the matmuls reading one input: forward, the input gradient
    when anything below trains, the weight gradient of those that train."""
    return g.weights * (1 + below) + sum(w for n, w in g.members if self.trainable(n))


def _expert_rows(cfg: "VLMConfig", batch: int, seq: int,
                 backend: Optional[str]) -> tuple[float, int]:
  """(rows each MoE layer's expert matmuls execute, rows of them XLA's cost analysis
  leaves out) for `batch` x `seq` tokens, of which top_k x tokens are the useful ones.

  - capacity: every slot of the [E, C] buffers is computed, filled or not: E x C x groups;
  - dropless with `lax.ragged_dot`: TPU runs a grouped matmul (the useful rows); XLA:CPU
    has no kernel and lowers it densely (jax `_ragged_dot_general_impl`): each row meets
    all E experts under a mask, E x the useful rows (counted so off TPU too);
  - dropless with the blocked gmm (moe_vlm.models.gmm, "auto" on CPU): the useful rows
    plus fewer than gmm_block_size padding rows per expert, data-dependent and left out.
    XLA's cost analysis counts a while loop's body once, so it sees one block of
    min(block, rows) rows per expert matmul.
  """
  moe = cfg.text.moe
  active = moe.top_k * batch * seq
  if moe.dispatch == "capacity":
    group = moe.group_size or batch
    return moe.num_experts * moe.capacity(group * seq, train=True) * (batch // group), 0
  from moe_vlm.models import gmm
  impl = gmm.resolve_impl(moe.gmm_impl, backend)
  if impl == "blocked":
    return active, active - min(moe.gmm_block_size, active)
  if (backend or _default_backend()) == "tpu":
    return active, 0
  return moe.num_experts * active, 0


def _default_backend() -> str:
  import jax
  return jax.default_backend()


def _head_rows(seq: int, head_fraction: Optional[float]) -> int:
  """Positions per row the LM head runs on (`StepConfig.head_capacity`; all of them
  without a compact head)."""
  if head_fraction is None:
    return seq
  from moe_vlm.train.step import StepConfig
  return StepConfig(head_fraction=head_fraction).head_capacity(seq) or seq


def _step(cfg: "VLMConfig", batch: int, seq: int, backend: Optional[str],
          trainable: Callable[[str], bool]) -> _Step:
  from moe_vlm.models.layers import causal_pairs
  t = cfg.text
  tokens = batch * seq
  scores = 4.0 * batch * seq * seq * t.num_heads * t.dim_per_head
  exec_scores = scores * causal_pairs(seq, t.attention_causal_blocks) / (seq * seq)
  rows, uncounted = _expert_rows(cfg, batch, seq, backend) if t.moe else (0.0, 0)
  return _Step(tokens, scores, exec_scores, t.moe.top_k if t.moe else 0, rows / tokens,
               uncounted, t.remat == "full", trainable)


def _vision_flops(cfg: "VLMConfig", w: Matmuls, batch: int) -> float:
  """The frozen vision tower, forward only: the patch embedding, and the layers up to
  `vision_feature_layer` (-2 skips the last one) with their attention scores."""
  v = cfg.vision
  run = cfg.vision_feature_layer % (v.num_layers + 1)
  n_pos = v.num_positions
  return (2.0 * batch * (run * w.vision_layer * n_pos + w.patch * v.num_patches)
          + run * 4.0 * batch * n_pos * n_pos * v.hidden_size)


def _projector_flops(w: Matmuls, s: _Step, image_tokens: int) -> tuple[float, bool]:
  """The projector's matmuls in forward order, on the image tokens, and whether any of
  them trains. The first one reads the frozen vision tower's features: it never needs
  an input gradient; a later one does when an earlier one trains."""
  flops, below = 0.0, False
  for g in w.projector:
    flops += 2.0 * s.level(g, below) * image_tokens
    below = below or s.trained(g)
  return flops, below


def _chain(first: Group, second: Group, below: bool, s: _Step) -> float:
  """Weights x passes of a two-level chain (q/k/v ... o; gate/up then down)."""
  return s.level(first, below) + s.level(second, below or s.trained(first))


def _add_layer(out: dict[str, float], b: Block, below: bool, trains_any: bool,
               s: _Step) -> bool:
  """Add one decoder layer's FLOPs to `out` (`trains_any`: whether any of its
  parameters trains); return whether anything trainable lies below the next layer
  (then the gradient must pass through it)."""
  has_backward = below or trains_any
  attn = _chain(b.attn_in, b.attn_out, below, s)
  out["attention"] += 2.0 * attn * s.tokens
  grad_through_scores = below or s.trained(b.attn_in)
  out["attention_scores"] += s.scores * (1 + 2 * grad_through_scores)
  out["causal_skip"] += (s.scores - s.exec_scores) * (1 + 2 * grad_through_scores)
  below = below or s.trained(b.attn_in) or s.trained(b.attn_out)
  dense = _chain(b.ffn_in, b.ffn_out, below, s)
  experts = _chain(b.expert_in, b.expert_out, below, s)
  out["ffn"] += 2.0 * (dense + s.top_k * experts) * s.tokens
  out["expert_extra"] += 2.0 * (s.rows_per_token - s.top_k) * experts * s.tokens
  recompute = has_backward and s.remat
  if recompute:
    expert_w = b.expert_in.weights + b.expert_out.weights
    executed = (b.attn_in.weights + b.attn_out.weights + b.ffn_in.weights
                + b.ffn_out.weights + s.rows_per_token * expert_w)
    out["remat"] += 2.0 * executed * s.tokens + s.exec_scores
    experts += expert_w
  out["xla_uncounted"] += 2.0 * s.uncounted_rows * experts
  return has_backward


MODEL_PARTS = ("vision", "projector", "attention", "attention_scores", "ffn", "lm_head")


def train_step_flops(cfg: "VLMConfig", train: Train, batch: int, seq: int, *,
                     head_fraction: Optional[float] = None,
                     backend: Optional[str] = None) -> dict[str, float]:
  """Matmul FLOPs of one train step on `batch` sequences of `seq` tokens, one image each,
  training what `train` names (a stage preset or a predicate over parameter names).

  2 FLOPs per multiply-add, matmuls only: bias adds, norms, softmax, activations, the
  embedding gather, MoE dispatch and combine, the loss and the optimizer are left out.
  Walking the graph bottom-up (vision -> projector -> decoder blocks -> lm_head), a
  weight matmul costs 2 x W x T forward, 2 x W x T more for the input gradient when
  anything trainable lies below it (inside its own block too: a trained q/k/v needs the
  o projection's input gradient), and 2 x W x T for its weight gradient when it
  trains. Frozen weights get no weight gradient, and nothing below the lowest trainable
  weight runs a backward: the vision tower is frozen in every stage, so the projector's
  first matmul gets no input gradient, and in stage 3 layer 0's frozen attention runs
  forward only and its router and experts' gate/up get no input gradient. W is read off the parameter tree (`matmul_weights`); an MoE FFN counts
  its router and the top_k ACTIVE experts. Attention scores and weighted values
  (q k^T and p v) count 4 x L^2 x H x hd per sequence and layer forward, the full L x L
  matrix (the usual convention), twice that backward where a gradient passes. The LM
  head runs on `head_fraction` of each row's positions when given (the compact head of
  `StepConfig.head_fraction`), on all of them otherwise. Checked against the matmuls of
  the lowered step for every stage preset (tests/test_cost.py). Not modelled: a trained
  norm counts for the layers above it but not for its own layer's matmuls, and a
  partly trained attention (q alone) counts both backward products of the scores.

  Returns the parts `MODEL_PARTS` and their sum "model" (useful work: the MFU
  numerator), and what this implementation executes beyond or short of it:
  - "remat": `remat="full"` recomputes the forward of every block a gradient reaches;
  - "expert_extra": expert rows executed beyond the active ones (`_expert_rows`;
    `backend`: where the step runs, default jax's);
  - "causal_skip": the masked score pairs the causal query blocks never compute;
  - "hardware" = model + remat + expert_extra - causal_skip;
  - "xla_uncounted": expert FLOPs XLA's cost analysis misses (blocked gmm loops);
  - "tokens": batch x seq.
  """
  trainable = _trainable_fn(train)
  if any(trainable(p.name) for p in param_table(cfg) if p.name.startswith("vision.")):
    raise ValueError("train_step_flops: the vision tower is frozen in every MoE-Tuning stage")
  w, s = matmul_weights(cfg), _step(cfg, batch, seq, backend, trainable)
  out = dict.fromkeys(MODEL_PARTS + ("remat", "expert_extra", "causal_skip",
                                     "xla_uncounted"), 0.0)
  out["vision"] = _vision_flops(cfg, w, batch)
  out["projector"], below = _projector_flops(w, s, batch * cfg.num_image_tokens)
  below = below or trainable("llm.embed")
  for i, block in enumerate(w.layers):
    trains_any = any(trainable(p.name) for p in param_table(cfg)
                     if p.name.startswith(f"llm.layers.{i}."))
    below = _add_layer(out, block, below, trains_any, s)
  head_tokens = batch * _head_rows(seq, head_fraction)
  out["lm_head"] = 2.0 * s.level(w.lm_head, below) * head_tokens
  out["model"] = sum(out[k] for k in MODEL_PARTS)
  out["hardware"] = out["model"] + out["remat"] + out["expert_extra"] - out["causal_skip"]
  out["tokens"] = float(s.tokens)
  return out


# ------------------------------------------------------------------------ bytes


def attention_hbm_bytes(cfg: "VLMConfig", train: Train, batch: int, seq: int) -> float:
  """HBM traffic of the materialised [B, H, L, L] attention matrices (the implementation
  is plain einsum + fp32 softmax, no flash kernel): assumed one fp32 write and one read
  (8 bytes per element) per pass; passes: forward, the remat recomputation and two in
  the backward (probabilities and their gradient) for blocks a gradient passes through."""
  t = cfg.text
  trains = _trainable_parts(cfg, train)
  below = trains("projector.") or trains("llm.embed")
  elems = batch * t.num_heads * seq * seq
  total = 0.0
  for i in range(t.num_layers):
    pre = f"llm.layers.{i}."
    has_bwd = below or trains(pre)
    attn_bwd = below or trains(pre + "attn.")
    passes = 1 + (has_bwd and t.remat == "full") + 2 * attn_bwd
    total += 8.0 * elems * passes
    below = below or trains(pre)
  return total


@dataclasses.dataclass(frozen=True)
class CommModel:
  """How `ici_bytes` turns a layout into bytes. Defaults describe TPU; `CPU_COMM` what
  XLA:CPU compiles (bf16 dots computed in f32, so activations travel in f32; gradient
  reduce-scatter written as all-reduce + slice), for checking the formula against the
  compiled HLO of `bench.scaling`."""
  act_bytes: int = 2                   # bf16 activations
  grad_reduce: str = "reduce-scatter"  # or "all-reduce"
  ep_impl: str = "gspmd"


CPU_COMM = CommModel(act_bytes=4, grad_reduce="all-reduce")


def _ring(n: int) -> float:
  return (n - 1) / n


def _weight_traffic(cfg: "VLMConfig", train: Train, mesh: Mapping[str, int]
                    ) -> tuple[dict[str, float], float, float]:
  """FSDP all-gather bytes of one micro-batch (see `ici_bytes`), and the trainable dense
  and expert gradient bytes per model (and expert) shard."""
  f, m, e = (mesh.get(a, 1) for a in ("fsdp", "model", "expert"))
  pb = param_bytes(cfg, train)
  decoder_gathers = 2 if cfg.text.remat == "full" else 1
  once = pb["dense"] - pb["dense_decoder"] - pb["embed"]
  gather = {"fsdp all-gather": _ring(f) * (once / m + decoder_gathers * (
      pb["dense_decoder"] / m + pb["expert"] / (m * e)))}
  return gather, pb["dense_trainable"] / m, pb["expert_trainable"] / (m * e)


def ici_bytes(cfg: "VLMConfig", train: Train, mesh: Mapping[str, int], micro_batch: int,
              accum: int, seq: int, comm: CommModel = CommModel()) -> dict[str, float]:
  """Bytes each chip sends per step for the project's layout (default logical rules:
  weights over fsdp (embed) and model (heads/mlp/vocab), experts over expert, batch over
  data x fsdp x expert), ring algorithms, `accum` micro-batches of `micro_batch`
  sequences per chip. Counts per micro-batch, as the compiled HLO of `bench.scaling`
  shows them (fp32 parameters, remat full):
  - FSDP: every weight is all-gathered over fsdp (fp32) where it is used: the decoder
    blocks' twice with `remat="full"` (forward, then recomputation + backward share one
    gather), once without; lm_head, projector and vision tower once; the embedding
    table never (the lookup reads the shards). Trainable gradients are reduce-scattered
    over fsdp (fp32), then all-reduced over the batch axes that hold copies: data (and
    expert, for non-expert weights);
  - tensor parallel, per decoder layer: all-reduces of the attention and FFN outputs
    in the forward, of the attention output again in the recomputation (the FFN output
    is not needed by the backward), and where the layer's input needs a gradient one
    per input projection (q, k, v; gate and up, or the one plain fc1). An MoE layer's
    FFN tensors are its [E, C, D] buffer, capacity_factor x top_k rows per token
    (dropless: the top_k routed rows, what the ragged exchange moves);
  - expert parallel, per MoE layer: shard_map sends its [E, C, D] buffer in 5
    all-to-alls (dispatch and combine forward and backward, the recomputed dispatch);
    GSPMD in 3, and all-gathers the top_k-repeated tokens of the expert group twice
    (forward and recomputation) to scatter them into the buffers; where the layer's
    input needs a gradient, the transpose of that gather reduces them back
    (reduce-scatter; XLA:CPU: all-reduce).
  Not counted: collectives of routing statistics, losses and the vision tower under
  tensor parallelism (each < 1% in the measured HLO).
  """
  t = cfg.text
  d_, f, m, e = (mesh.get(a, 1) for a in ("data", "fsdp", "model", "expert"))
  out, g_dense, g_expert = _weight_traffic(cfg, train, mesh)
  # A reduce-scatter sends (f-1)/f of the gradients; XLA:CPU's all-reduce twice that.
  per_grad = _ring(f) * (1 if comm.grad_reduce == "reduce-scatter" else 2)
  out["gradient reduce over fsdp"] = per_grad * (g_dense + g_expert)
  out["gradient all-reduce over data/expert"] = (2 * _ring(d_ * e) * g_dense +
                                                2 * _ring(d_) * g_expert) / f
  act = micro_batch * seq * t.hidden_size * comm.act_bytes
  # An MoE layer's token exchange: capacity buffers of capacity_factor x top_k rows per
  # token, or dropless (the ragged all-to-all) only the top_k routed rows.
  rows = (t.moe.top_k if t.moe.dispatch == "dropless" else
          t.moe.capacity_factor * t.moe.top_k) if t.moe else 0.0
  buffer = rows * act
  trains = _trainable_parts(cfg, train)
  out["tensor all-reduce"] = 2 * _ring(m) * _tensor_parallel_bytes(cfg, trains, act, buffer)
  if t.moe_layers() and e > 1:
    out.update(_expert_parallel_bytes(cfg, trains, e, act, buffer, comm))
  out = {k: v * accum for k, v in out.items()}
  out["total"] = sum(out.values())
  return out


def _tensor_parallel_bytes(cfg: "VLMConfig", trains: Callable[[str], bool], act: float,
                           buffer: float) -> float:
  """Activation bytes all-reduced over the model axis per micro-batch (see `ici_bytes`),
  before the ring factor."""
  t = cfg.text
  mats_in = 2 if t.mlp == "gated" else 1
  below, tp = trains("projector.") or trains("llm.embed"), 0.0
  for i in range(t.num_layers):
    pre = f"llm.layers.{i}."
    ffn = buffer if i in t.moe_layers() else act
    tp += act + ffn + act * (below or trains(pre))  # forward, recomputation
    below = below or trains(pre + "attn.")
    tp += 3 * act * below                           # q, k, v input gradients
    below = below or trains(pre)
    tp += mats_in * ffn * below                     # FFN input gradients
  return tp


def _expert_parallel_bytes(cfg: "VLMConfig", trains: Callable[[str], bool], e: int,
                           act: float, buffer: float, comm: CommModel) -> dict[str, float]:
  """Expert-axis traffic per micro-batch (see `ici_bytes`)."""
  t = cfg.text
  moe_layers = len(t.moe_layers())
  if comm.ep_impl == "shard_map":
    return {"expert all-to-all": _ring(e) * 5 * buffer * moe_layers}
  out = {"expert all-to-all": _ring(e) * 3 * buffer * moe_layers}
  tokens = e * t.moe.top_k * act  # the gathered [e x b, k x L, D] tokens
  out["expert token all-gather"] = _ring(e) * 2 * tokens * moe_layers
  below, with_input_grad = trains("projector.") or trains("llm.embed"), 0
  for i in range(t.num_layers):
    pre = f"llm.layers.{i}."
    below = below or trains(pre + "attn.")
    with_input_grad += i in t.moe_layers() and below
    below = below or trains(pre)
  reduce = _ring(e) * (1 if comm.grad_reduce == "reduce-scatter" else 2)
  out["expert token gradient reduce"] = reduce * tokens * with_input_grad
  return out


def memory_per_device(cfg: "VLMConfig", train: Train, mesh: Mapping[str, int],
                      micro_batch: int, seq: int, *, bytes_per_param: int = 4,
                      act_bytes: int = 2) -> dict[str, float]:
  """Rough bytes per device: parameters, optimizer (gradients + AdamW moments of the
  trainable part, all `bytes_per_param`), activations of one micro-batch of
  `micro_batch` sequences. Experts are sharded over fsdp x model x expert, everything
  else over fsdp x model; activations count the block inputs that full remat saves
  (all of a block's tensors without it), one recomputed block, attention scores and
  fp32 logits (+ gradients). A back-of-envelope check; `moe_vlm.train.preflight`
  compiles the real step and reads XLA's numbers."""
  t = cfg.text
  fsdp, tp, ep = (mesh.get(a, 1) for a in ("fsdp", "model", "expert"))
  n = param_counts(cfg, train)
  per_device = lambda dense, expert: dense / (fsdp * tp) + expert / (fsdp * tp * ep)
  params = per_device(n["dense"], n["expert"]) * bytes_per_param
  optimizer = per_device(n["dense_trainable"], n["expert_trainable"]) * 3 * bytes_per_param
  tokens = micro_batch * seq
  mats = 3 if t.mlp == "gated" else 2
  block = tokens * (4 * t.hidden_size + mats * t.intermediate_size / tp) * act_bytes
  scores = micro_batch * (t.num_heads / tp) * seq ** 2 * 4
  saved = (t.num_layers * tokens * t.hidden_size * act_bytes if t.remat == "full"
           else t.num_layers * (3 * block + scores))
  logits = tokens * t.vocab_size / tp * 4
  activations = saved + 2 * (block + scores + logits)
  return dict(params=params, optimizer=optimizer, activations=activations,
              total=params + optimizer + activations)
