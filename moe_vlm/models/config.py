"""Model configuration as plain frozen dataclasses.

Configs are data: ml_collections experiment files in `configs/` build these, the HF
importer derives them from `config.json`, and modules only read them. Every check that
can be made without weights is made in `validate()` so a bad config fails before any
parameter is allocated, with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any, Literal, Mapping, Optional


class ConfigError(ValueError):
  """A model config field has a value the model cannot honour."""


MoEMode = Literal["sparse", "dense", "first_half", "second_half"]
Dispatch = Literal["capacity", "dropless"]
AttentionImpl = Literal["auto", "einsum", "blocked", "cudnn", "splash"]
EPImpl = Literal["gspmd", "shard_map"]
GmmImpl = Literal["auto", "ragged_dot", "blocked"]
EPExchange = Literal["auto", "ragged", "padded"]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """MoE-LLaVA's MoE layer (DeepSpeed `MoE` with the LLM's MLP as expert).

  Defaults follow the MoE-LLaVA scripts: 4 experts, top-2, MoE in every other layer,
  capacity factor 1.5 in training and 2.0 at evaluation, aux loss coefficient 0.01.
  """

  num_experts: int = 4
  top_k: int = 2
  moe_mode: MoEMode = "sparse"
  # Explicit layer list; overrides `moe_mode` when given.
  moe_layers_idx: Optional[tuple[int, ...]] = None
  # "capacity": MoE-LLaVA's token dropping; "dropless": every routed token is computed.
  dispatch: Dispatch = "capacity"
  capacity_factor: float = 1.5
  eval_capacity_factor: float = 2.0
  min_capacity: int = 0
  # Sequences per routing group for the capacity path: capacity is computed, and tokens
  # compete for it, within a group (DeepSpeed's group is one rank's micro-batch). None
  # makes the whole batch of the call one group. Either way the result does not depend
  # on the mesh; the dropless path has no groups. Packed rows (`data.packing`) change
  # what a group holds, not its size: a group is still group_size rows of L tokens
  # (S = group_size x L, so the same slots per expert), but those tokens are nearly all
  # real tokens of several samples instead of one sample and its padding, so more real
  # tokens compete for the same slots (padding routes and takes slots too, as in
  # DeepSpeed; the aux loss counts it as before). Per real token, capacity is thus
  # lower than with padded rows.
  group_size: Optional[int] = None
  # Renormalise the kept top-k gate values to sum to one (MoE-LLaVA top-2 does).
  renormalize: bool = True
  aux_loss_coef: float = 0.01
  z_loss_coef: float = 0.0
  # Intermediate size of each expert; None keeps the dense FFN's size (upcycling).
  expert_intermediate_size: Optional[int] = None
  # Expert parallelism under a mesh: "gspmd" lets the partitioner relayout tokens to
  # experts; "shard_map" routes per device and exchanges tokens with explicit
  # all-to-alls (moe_vlm.parallel.expert_parallel; the capacity path then needs
  # `group_size`). Same results either way; no effect without a mesh.
  ep_impl: EPImpl = "gspmd"
  # How the dropless shard_map path moves tokens to their expert shard and back:
  # "ragged" = jax.lax.ragged_all_to_all, only the routed rows travel (TPU/GPU; XLA:CPU
  # does not implement it); "padded" = the same exchange emulated with a dense
  # all_to_all, each peer a slot sized for the worst case (runs anywhere; moves up to
  # ep times the routed rows); "auto" = "padded" on a CPU mesh, "ragged" otherwise.
  # Same results either way; only read with ep_impl="shard_map", dispatch="dropless".
  ep_exchange: EPExchange = "auto"
  # "gumbel": in training, sample the second expert as DeepSpeed 0.9.5 does (top-2
  # only); evaluation is always deterministic top-k.
  second_expert_noise: Literal["none", "gumbel"] = "none"
  # Grouped matmul of the dropless experts (moe_vlm.models.gmm): "ragged_dot" is
  # jax.lax.ragged_dot, native on TPU/GPU but lowered densely on CPU (every row times
  # all E experts); "blocked" loops over row blocks of each expert, cost proportional
  # to the rows; "auto" picks "blocked" on CPU and "ragged_dot" elsewhere. Same results.
  gmm_impl: GmmImpl = "auto"
  # Rows per block of the "blocked" grouped matmul: each expert computes at most
  # gmm_block_size - 1 padding rows.
  gmm_block_size: int = 128

  def layer_indices(self, num_layers: int) -> tuple[int, ...]:
    """Which decoder layers hold an MoE FFN (MoE-LLaVA's `moe_mode` semantics)."""
    if self.moe_layers_idx is not None:
      return tuple(sorted(self.moe_layers_idx))
    if self.moe_mode == "sparse":
      return tuple(range(num_layers))[::2]
    if self.moe_mode == "dense":
      return tuple(range(num_layers))
    if self.moe_mode == "first_half":
      return tuple(range(num_layers // 2))
    if self.moe_mode == "second_half":
      return tuple(range(num_layers // 2, num_layers))
    raise ConfigError(
        f"moe.moe_mode={self.moe_mode!r}: expected one of sparse, dense, first_half, "
        "second_half (or set moe.moe_layers_idx)")

  def capacity(self, num_tokens: int, train: bool) -> int:
    """Slots per expert: ceil(S / E * factor * k), floored at `min_capacity`."""
    factor = self.capacity_factor if train else self.eval_capacity_factor
    cap = math.ceil(num_tokens / self.num_experts * factor * self.top_k)
    return max(cap, self.min_capacity)

  def validate(self, num_layers: int) -> None:
    if self.num_experts < 1:
      raise ConfigError(f"moe.num_experts={self.num_experts}: expected >= 1")
    if not 1 <= self.top_k <= self.num_experts:
      raise ConfigError(
          f"moe.top_k={self.top_k}: expected 1 <= top_k <= num_experts "
          f"({self.num_experts})")
    if self.dispatch not in ("capacity", "dropless"):
      raise ConfigError(
          f"moe.dispatch={self.dispatch!r}: expected 'capacity' or 'dropless'")
    if self.ep_impl not in ("gspmd", "shard_map"):
      raise ConfigError(f"moe.ep_impl={self.ep_impl!r}: expected 'gspmd' or 'shard_map'")
    if self.ep_exchange not in ("auto", "ragged", "padded"):
      raise ConfigError(f"moe.ep_exchange={self.ep_exchange!r}: expected 'auto', 'ragged' or "
                        "'padded'")
    if self.gmm_impl not in ("auto", "ragged_dot", "blocked"):
      raise ConfigError(f"moe.gmm_impl={self.gmm_impl!r}: expected 'auto', 'ragged_dot' or "
                        "'blocked'")
    if not isinstance(self.gmm_block_size, int) or self.gmm_block_size < 1:
      raise ConfigError(f"moe.gmm_block_size={self.gmm_block_size!r}: expected an int >= 1")
    if self.second_expert_noise not in ("none", "gumbel"):
      raise ConfigError(f"moe.second_expert_noise={self.second_expert_noise!r}: expected "
                        "'none' or 'gumbel'")
    if self.second_expert_noise == "gumbel" and (self.top_k != 2 or self.ep_impl != "gspmd"):
      raise ConfigError("moe.second_expert_noise='gumbel' needs top_k=2 and ep_impl='gspmd' "
                        f"(got top_k={self.top_k}, ep_impl={self.ep_impl!r})")
    if self.group_size is not None and self.group_size < 1:
      raise ConfigError(f"moe.group_size={self.group_size}: expected None or >= 1")
    if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
      raise ConfigError("moe.capacity_factor and moe.eval_capacity_factor must be > 0")
    idx = self.layer_indices(num_layers)
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
      raise ConfigError(
          f"moe.moe_layers_idx={list(self.moe_layers_idx or ())}: layers {bad} out of "
          f"range for a model with {num_layers} layers")
    if len(set(idx)) != len(idx):
      raise ConfigError(f"moe.moe_layers_idx has duplicates: {list(idx)}")
    if not idx:
      raise ConfigError(
          f"moe selects no layer (moe_mode={self.moe_mode!r}, num_layers={num_layers})")


@dataclasses.dataclass(frozen=True)
class HyperExpertConfig:
  """HyperLLaVA's dynamic expert (arXiv 2403.13447): a HyperNetwork reads a per-sample
  guidance vector, encodes it (layer-specific encoder, `expert_dim` wide) and generates
  the weights of an adapter x -> W_u SwiGLU(W_d x) with `bottleneck` channels. The
  paper's best sizes are the defaults. The generator of W_u starts at zero, so a fresh
  expert adds nothing and the model equals its static self.

  As `VLMConfig.visual_expert` it shifts the projector (guidance: the image's features);
  as `TextConfig.language_expert` it runs beside the FFN of `layers` (default: the
  posterior half) with guidance = the hidden state entering layer `guidance_layer`
  (default L/2). Guidance vectors are means over the prompt (the tokens before the first
  answer token), so no answer token ever shapes the weights that predict it.
  """

  expert_dim: int = 64
  bottleneck: int = 16
  layers: Optional[tuple[int, ...]] = None
  guidance_layer: Optional[int] = None

  def language_layers(self, num_layers: int) -> tuple[int, ...]:
    if self.layers is not None:
      return tuple(sorted(self.layers))
    return tuple(range(self.guide_layer(num_layers), num_layers))

  def guide_layer(self, num_layers: int) -> int:
    return num_layers // 2 if self.guidance_layer is None else self.guidance_layer

  def validate(self, field: str, num_layers: Optional[int] = None) -> None:
    for name in ("expert_dim", "bottleneck"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{field}.{name}={getattr(self, name)}: expected >= 1")
    if num_layers is None:
      return
    g = self.guide_layer(num_layers)
    if not 0 <= g < num_layers:
      raise ConfigError(f"{field}.guidance_layer={g}: expected 0 <= layer < {num_layers}")
    layers = self.language_layers(num_layers)
    early = [i for i in layers if not g <= i < num_layers]
    if early or not layers:
      raise ConfigError(f"{field}.layers={list(layers)}: expected a non-empty list of layers "
                        f"in [guidance_layer={g}, {num_layers}) (an expert can only read "
                        "guidance computed before it)")


LORA_TARGETS = ("qkv", "attn_out", "mlp")


@dataclasses.dataclass(frozen=True)
class LoRAMoEConfig:
  """Awaker2.5-VL's parameter-efficient MoE (arXiv 2411.10669; the official layer is
  `LoraLinear` in MetabrainAGI/Awaker's `peft/tuners/moe/layer.py`). On frozen base
  weights:

  - "qkv": the attention's query/key/value projections get one plain LoRA each;
  - "attn_out", "mlp": the attention output projection, and the MLP's gate/up/down
    projections (one router shared by the three, as the official gate_proj hands its
    gates to up_proj and down_proj), get `num_experts` routed LoRA experts plus one
    always-on global (shared) LoRA expert:

      y = W0 x + G_max E_m(x) + (1 - G_max) E_g(x),     E(x) = (alpha / rank) B A drop(x)
      G = top_k(softmax((W_G RMSNorm(u) + b_G + noise) / temperature)),

    G_max the largest kept gate (top_k=1: the paper's formula). Each router is its own
    learnable RMSNorm (eps `norm_eps`) followed by a biased linear layer. The router
    input u is the embedding-layer output with the image features spliced in, detached:
    per token (`routing="token"`), or for the whole sample (`"instance"`, the release)
    its mean over the router span, from the image start to the end of the first user
    turn (`data.templates`' `router_mask`). Gaussian noise (std `noise_std`) only in
    training; LoRA dropout `dropout` on every LoRA input, in training only.

  `release_double_gate`: the released code scales the combined routed experts by their
  gates and then again by G_max (G_max^2 E_m + (1 - G_max) E_g); the paper's formula
  (False, the default) gates them once. True reproduces the released checkpoints.

  `single`: Awaker's stage I, one plain LoRA on every target projection (no experts, no
  routers). Set per stage by its preset (`lora_single`, `moe_vlm.train.stages`), never
  in an experiment's `lora_moe` block; stage II starts every expert (and the global one)
  as a copy of it. Defaults are the release's (r=256, alpha=512 = 2 x rank, dropout
  0.05, 4 experts, top-1, noise 0.1, temperature 1). B starts at zero: a fresh LoRA
  adds 0.
  """

  num_experts: int = 4
  top_k: int = 1
  rank: int = 256
  # LoRA scale alpha / rank; None: 2 x rank, the release's ratio (r=256, alpha=512), so
  # that a smaller rank keeps the released scale of 2.
  alpha: Optional[float] = None
  dropout: float = 0.05
  targets: tuple[str, ...] = LORA_TARGETS
  routing: Literal["token", "instance"] = "instance"
  shared_expert: bool = True
  temperature: float = 1.0
  noise_std: float = 0.1
  norm_eps: float = 1e-6
  release_double_gate: bool = False
  single: bool = False
  # Decoder layers that get LoRA; None = all.
  layers: Optional[tuple[int, ...]] = None

  @property
  def scale(self) -> float:
    return (2.0 * self.rank if self.alpha is None else self.alpha) / self.rank

  def layer_indices(self, num_layers: int) -> tuple[int, ...]:
    return tuple(range(num_layers)) if self.layers is None else tuple(sorted(self.layers))

  def validate(self, num_layers: int) -> None:
    if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
      raise ConfigError(f"lora_moe: expected num_experts >= 1 and 1 <= top_k <= num_experts, "
                        f"got num_experts={self.num_experts}, top_k={self.top_k}")
    if self.rank < 1:
      raise ConfigError(f"lora_moe.rank={self.rank}: expected >= 1")
    if self.alpha is not None and not self.alpha > 0:
      raise ConfigError(f"lora_moe.alpha={self.alpha}: expected > 0 (or None: 2 x rank)")
    if not 0 <= self.dropout < 1:
      raise ConfigError(f"lora_moe.dropout={self.dropout}: expected 0 <= dropout < 1")
    bad = [t for t in self.targets if t not in LORA_TARGETS]
    if bad or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ConfigError(f"lora_moe.targets={list(self.targets)}: expected a non-empty subset "
                        f"of {list(LORA_TARGETS)}")
    if self.routing not in ("token", "instance"):
      raise ConfigError(f"lora_moe.routing={self.routing!r}: expected 'token' or 'instance'")
    if self.temperature <= 0 or self.noise_std < 0 or self.norm_eps <= 0:
      raise ConfigError("lora_moe.temperature and lora_moe.norm_eps must be > 0 and "
                        "lora_moe.noise_std >= 0")
    out = [i for i in self.layer_indices(num_layers) if not 0 <= i < num_layers]
    if out:
      raise ConfigError(f"lora_moe.layers: {out} out of range for {num_layers} layers")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """One decoder covering Llama/Qwen2, Phi-2 and StableLM-2 through switches."""

  family: str = "llama"  # informative: llama | qwen2 | phi | stablelm | qwen2_moe
  vocab_size: int = 32000
  hidden_size: int = 512
  intermediate_size: int = 1408
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 8
  head_dim: Optional[int] = None
  norm: Literal["rms", "layer"] = "rms"
  norm_eps: float = 1e-6
  # "gated": down(act(gate(x)) * up(x)) (Llama, Qwen2, StableLM); "plain": fc2(act(fc1(x))) (Phi).
  mlp: Literal["gated", "plain"] = "gated"
  activation: str = "silu"
  mlp_bias: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  # Phi-2: attention and MLP read the same normed input and are summed into the residual.
  parallel_residual: bool = False
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 1.0
  tie_embeddings: bool = False
  lm_head_bias: bool = False
  moe: Optional[MoEConfig] = None
  # HyperLLaVA's language expert, and Awaker2.5-VL's LoRA experts (both optional).
  language_expert: Optional[HyperExpertConfig] = None
  lora_moe: Optional[LoRAMoEConfig] = None
  # Compute dtype of activations and matmuls; parameters stay in `param_dtype`.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Rematerialisation of each decoder block in the backward pass: "none", "full"
  # (save only block inputs), "dots" (save matmul outputs), "dots_no_batch".
  remat: str = "none"
  # Causal self-attention runs its queries in this many blocks, each attending only
  # the keys up to its last query: (n + 1) / 2n of the full L x L work, same result.
  # 1 computes the full score matrix under the mask.
  attention_causal_blocks: int = 4
  # Causal self-attention kernel (moe_vlm.models.attention): "auto" = Pallas splash on
  # TPU, cuDNN flash attention on GPU, on CPU the blocked kernel for packed rows and the
  # einsum path otherwise; or one of "einsum", "blocked", "cudnn", "splash". Decoding
  # with a KV cache always runs the einsum path.
  attention_impl: AttentionImpl = "auto"
  # Query/key block of the "blocked" kernel: a packed row costs about the work of the
  # blocks its segments touch, so smaller blocks skip more (64 was fastest on a CPU).
  attention_block_size: int = 64
  # Rotary positions: "default" (one position per token) or "mrope" (Qwen2-VL's
  # multimodal RoPE: three position rows, temporal / height / width, and the rotary
  # frequencies split into `mrope_section` chunks, chunk i rotated by row i % 3; text
  # tokens carry the same position in all three rows, image tokens their grid cell).
  rope_type: Literal["default", "mrope"] = "default"
  # Frequencies per chunk (sum = rotary_dim / 2); Qwen2-VL's is (16, 24, 24).
  mrope_section: tuple[int, ...] = (16, 24, 24)

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.dim_per_head * self.partial_rotary_factor)

  def moe_layers(self) -> tuple[int, ...]:
    return self.moe.layer_indices(self.num_layers) if self.moe else ()

  def validate(self) -> None:
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ConfigError(
          f"text.hidden_size={self.hidden_size} is not divisible by "
          f"text.num_heads={self.num_heads}; set text.head_dim")
    if self.attention_causal_blocks < 1:
      raise ConfigError(f"text.attention_causal_blocks={self.attention_causal_blocks}: "
                        "expected an integer >= 1")
    if self.attention_impl not in ("auto", "einsum", "blocked", "cudnn", "splash"):
      raise ConfigError(f"text.attention_impl={self.attention_impl!r}: expected one of "
                        "auto, einsum, blocked, cudnn, splash")
    if self.attention_block_size < 1:
      raise ConfigError(f"text.attention_block_size={self.attention_block_size}: "
                        "expected an integer >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"text.num_heads={self.num_heads} is not a multiple of "
          f"text.num_kv_heads={self.num_kv_heads}")
    if self.rotary_dim % 2:
      raise ConfigError(
          f"rotary dim {self.rotary_dim} (head_dim x partial_rotary_factor) must be even")
    if self.norm not in ("rms", "layer"):
      raise ConfigError(f"text.norm={self.norm!r}: expected 'rms' or 'layer'")
    if self.rope_type not in ("default", "mrope"):
      raise ConfigError(f"text.rope_type={self.rope_type!r}: expected 'default' or 'mrope'")
    if self.rope_type == "mrope" and (
        len(self.mrope_section) != 3 or min(self.mrope_section) < 1
        or sum(self.mrope_section) != self.rotary_dim // 2):
      raise ConfigError(f"text.mrope_section={list(self.mrope_section)}: expected 3 positive "
                        f"chunks summing to rotary_dim / 2 = {self.rotary_dim // 2}")
    if self.mlp not in ("gated", "plain"):
      raise ConfigError(f"text.mlp={self.mlp!r}: expected 'gated' or 'plain'")
    check_activation(self.activation, "text.activation")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"text.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    if self.moe is not None:
      self.moe.validate(self.num_layers)
    if self.language_expert is not None:
      self.language_expert.validate("text.language_expert", self.num_layers)
    if self.lora_moe is not None:
      self.lora_moe.validate(self.num_layers)

  def guides(self) -> tuple[str, ...]:
    """Per-sample guidance vectors the decoder computes from the prompt (see DecoderLM)."""
    out = []
    if self.language_expert is not None:
      out.append("language_expert")
    lm = self.lora_moe
    if lm is not None and not lm.single and lm.routing == "instance":
      out.append("lora_router")
    return tuple(out)


VISION_VARIANTS = ("clip", "siglip", "qwen2_vl")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT: CLIP (class token, pre-layernorm, quick_gelu), SigLIP (neither, gelu_tanh), or
  Qwen2-VL's native-resolution tower (`variant="qwen2_vl"`, `moe_vlm.models.qwen2_vl`):
  no class token and no position table, 2D rotary positions (row, column of each patch)
  in every attention layer, patches of `temporal_patch_size` x patch x patch pixels
  embedded by one linear map, and `spatial_merge_size`^2 neighbouring patches merged
  into one LLM token by the `qwen2_vl_merger` projector.

  Qwen2-VL keeps static shapes through a patch budget: an image is resized
  (`data.images.smart_resize`: sides multiples of patch x merge, area within
  [min_pixels, max_pixels]) and its patches fill the first t*h*w of `max_patches` slots;
  the rest are padding, masked out of attention and mapped to no LLM token. `image_size`
  is not read by it.
  """

  variant: Literal["clip", "siglip", "qwen2_vl"] = "clip"
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 256
  intermediate_size: int = 1024
  num_layers: int = 4
  num_heads: int = 4
  norm_eps: float = 1e-5
  activation: str = "quick_gelu"
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Qwen2-VL only (variant="qwen2_vl"):
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  rope_theta: float = 10000.0

  @property
  def native(self) -> bool:
    """Native resolution (Qwen2-VL): patches + grid instead of a fixed square image."""
    return self.variant == "qwen2_vl"

  @property
  def class_token(self) -> bool:
    return self.variant == "clip"

  @property
  def pre_norm(self) -> bool:
    return self.variant == "clip"

  @property
  def patch_bias(self) -> bool:
    return self.variant == "siglip"

  @property
  def patch_dim(self) -> int:
    """Values per patch (Qwen2-VL: channels x temporal x patch x patch, HF's order)."""
    t = self.temporal_patch_size if self.native else 1
    return self.num_channels * t * self.patch_size ** 2

  @property
  def max_patches(self) -> int:
    """Qwen2-VL's patch budget per image: max_pixels / patch^2, whole merge groups."""
    group = self.spatial_merge_size ** 2
    return self.max_pixels // self.patch_size ** 2 // group * group

  @property
  def num_patches(self) -> int:
    if self.native:
      return self.max_patches
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + int(self.class_token)

  def validate(self) -> None:
    if self.variant not in VISION_VARIANTS:
      raise ConfigError(f"vision.variant={self.variant!r}: expected one of "
                        f"{', '.join(VISION_VARIANTS)}")
    if self.native:
      self._validate_native()
    # Not a multiple is fine: the stride-p VALID conv drops the remainder, as HF does
    # (siglip-so400m-patch14-384: 384 px -> 27 x 27 patches).
    if self.image_size < self.patch_size:
      raise ConfigError(
          f"vision.image_size={self.image_size} is smaller than "
          f"vision.patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ConfigError(
          f"vision.hidden_size={self.hidden_size} not divisible by "
          f"vision.num_heads={self.num_heads}")
    check_activation(self.activation, "vision.activation")

  def _validate_native(self) -> None:
    for name in ("spatial_merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
      if getattr(self, name) < 1:
        raise ConfigError(f"vision.{name}={getattr(self, name)}: expected >= 1")
    factor = self.patch_size * self.spatial_merge_size
    if self.max_pixels < factor ** 2:
      raise ConfigError(f"vision.max_pixels={self.max_pixels}: expected at least one merged "
                        f"patch, (patch_size x spatial_merge_size)^2 = {factor ** 2}")
    if self.min_pixels > self.max_pixels:
      raise ConfigError(f"vision.min_pixels={self.min_pixels} > vision.max_pixels="
                        f"{self.max_pixels}")
    if (self.hidden_size // self.num_heads) % 4:
      raise ConfigError(f"vision head dim {self.hidden_size // self.num_heads} (hidden_size / "
                        "num_heads): Qwen2-VL's 2D rotary needs a multiple of 4")
    if not self.rope_theta > 0:
      raise ConfigError(f"vision.rope_theta={self.rope_theta}: expected > 0")


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
  """IDEFICS2's connector (`projector="perceiver"`): a SwiGLU modality projection to the
  text width, then a perceiver resampler that compresses the P patch features into
  `n_latents` image tokens (transformers' `Idefics2Connector`).

  The resampler runs at the text hidden size; its MLPs are 4x that wide (as in IDEFICS2).
  Defaults are idefics2-8b's resampler except `norm_eps` (HF's perceiver default).
  """

  n_latents: int = 64
  depth: int = 3
  num_heads: int = 16
  head_dim: int = 96
  num_kv_heads: int = 4
  # Intermediate size of the modality projection; None: the text model's (as IDEFICS2).
  intermediate_size: Optional[int] = None
  norm_eps: float = 1e-6
  # Activation of both SwiGLU MLPs (IDEFICS2 uses silu for both).
  activation: str = "silu"

  def validate(self) -> None:
    for name in ("n_latents", "depth", "num_heads", "head_dim", "num_kv_heads"):
      if getattr(self, name) < 1:
        raise ConfigError(f"perceiver.{name}={getattr(self, name)}: expected >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"perceiver.num_heads={self.num_heads} is not a multiple of "
          f"perceiver.num_kv_heads={self.num_kv_heads}")
    if self.intermediate_size is not None and self.intermediate_size < 1:
      raise ConfigError(
          f"perceiver.intermediate_size={self.intermediate_size}: expected None or >= 1")
    if not self.norm_eps > 0:
      raise ConfigError(f"perceiver.norm_eps={self.norm_eps}: expected > 0")
    check_activation(self.activation, "perceiver.activation")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """LLaVA-1.5 style: vision tower -> projector -> image tokens spliced into the text."""

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  # "qwen2_vl_merger": Qwen2-VL's patch merger (LayerNorm, spatial_merge_size^2 patches
  # concatenated, Linear-GELU-Linear), the projector of a vision.variant="qwen2_vl" tower.
  projector: Literal["linear", "mlp2x_gelu", "perceiver", "qwen2_vl_merger"] = "mlp2x_gelu"
  # Which hidden state of the vision tower feeds the projector (-2 in LLaVA).
  vision_feature_layer: int = -2
  # "default" drops the first token (CLIP's CLS; MoE-LLaVA also drops SigLIP's token 0),
  # "full" keeps every token.
  vision_feature_select_strategy: Literal["default", "full"] = "default"
  image_token_id: int = 32000
  # Read only when projector == "perceiver".
  perceiver: PerceiverConfig = dataclasses.field(default_factory=PerceiverConfig)
  # HyperLLaVA's visual expert: a dynamic shift of the mlp2x_gelu projector's hidden layer.
  visual_expert: Optional[HyperExpertConfig] = None

  @property
  def num_image_tokens(self) -> int:
    """LLM tokens per image; for Qwen2-VL (native resolution) the most an image may take,
    its patch budget merged: an image of grid (t, h, w) takes t*h*w / merge^2."""
    if self.projector == "perceiver":
      return self.perceiver.n_latents  # a fixed cost per image, whatever the tower
    if self.vision.native:
      return self.vision.max_patches // self.vision.spatial_merge_size ** 2
    n = self.vision.num_positions
    return n - 1 if self.vision_feature_select_strategy == "default" else n

  def validate(self) -> None:
    self.vision.validate()
    self.text.validate()
    if self.projector not in PROJECTORS:
      raise ConfigError(f"projector={self.projector!r}: expected one of "
                        f"{', '.join(map(repr, PROJECTORS))}")
    if (self.projector == "qwen2_vl_merger") != self.vision.native:
      raise ConfigError(f"projector={self.projector!r} with vision.variant="
                        f"{self.vision.variant!r}: the qwen2_vl_merger projector and the "
                        "qwen2_vl tower go together (the merger reads the tower's merge "
                        "groups)")
    if self.vision.native and self.vision_feature_select_strategy != "full":
      raise ConfigError(f"vision_feature_select_strategy="
                        f"{self.vision_feature_select_strategy!r}: the qwen2_vl tower has no "
                        "class token to drop; expected 'full'")
    if self.projector == "perceiver":
      self.perceiver.validate()
    if self.visual_expert is not None:
      if self.projector != "mlp2x_gelu":
        raise ConfigError(f"visual_expert needs projector='mlp2x_gelu' (the HyperLLaVA "
                          f"design shifts its hidden layer), got {self.projector!r}")
      self.visual_expert.validate("visual_expert")
    n = self.vision.num_layers
    if not -(n + 1) <= self.vision_feature_layer <= n:
      raise ConfigError(
          f"vision_feature_layer={self.vision_feature_layer} out of range for a "
          f"{n}-layer vision tower ({n + 1} hidden states)")
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ConfigError(
          f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: "
          "expected 'default' or 'full'")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ConfigError(
          f"image_token_id={self.image_token_id} outside the vocabulary "
          f"(vocab_size={self.text.vocab_size})")


PROJECTORS = ("linear", "mlp2x_gelu", "perceiver", "qwen2_vl_merger")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_tanh",
                "quick_gelu", "relu")


def check_activation(name: str, field: str) -> None:
  if name not in _ACTIVATIONS:
    raise ConfigError(f"{field}={name!r}: expected one of {', '.join(_ACTIVATIONS)}")


def from_dict(cls: type, d: Mapping[str, Any], field: str = "") -> Any:
  """A config dataclass from plain data (JSON, ml_collections): nested configs are
  rebuilt by their type hints, lists become tuples, and a value of the wrong type or an
  unknown key is an error that names the field."""
  hints = typing.get_type_hints(cls)
  if not hasattr(d, "keys"):
    raise ConfigError(f"{field or cls.__name__}: expected a block of fields, got {d!r}")
  d = dict(d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f"{field or cls.__name__}: unknown fields {unknown}; expected some of "
                      f"{sorted(names)}")
  return cls(**{k: _coerce(hints[k], v, f"{field}.{k}" if field else k) for k, v in d.items()})


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, field: str) -> Any:
  """`value` checked against the type hint `tp` (and converted where JSON / the command
  line spell it differently: lists for tuples, ints for floats)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    tp = next(a for a in args if a is not type(None))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return value
  if value is None:
    raise ConfigError(f"{field}: expected {_type_name(tp)}, got None")
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{field}={value!r}: expected one of {', '.join(map(repr, args))}")
    return value
  if dataclasses.is_dataclass(tp):
    if not hasattr(value, "keys"):  # dict or ConfigDict
      raise ConfigError(f"{field}: expected a block of {tp.__name__} fields, got {value!r}")
    return from_dict(tp, value, field)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{field}={value!r}: expected a tuple")
    item = args[0] if args else Any
    return tuple(_coerce(item, v, f"{field}[{i}]") for i, v in enumerate(value))
  if origin is dict:
    if not hasattr(value, "keys"):
      raise ConfigError(f"{field}={value!r}: expected a mapping")
    return {k: _coerce(args[1], v, f"{field}.{k}") for k, v in value.items()}
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{field}={value!r}: expected true or false")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ConfigError(f"{field}={value!r}: expected an integer")
    return int(value)
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise ConfigError(f"{field}={value!r}: expected a number")
    return float(value)
  if tp is str and not isinstance(value, str):
    raise ConfigError(f"{field}={value!r}: expected a string")
  return value
