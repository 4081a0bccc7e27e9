"""HF <-> moe_vlm parameter tables, one function per component and family.

A `Rule` ties some of our parameters to some HF tensors with a pair of inverse
functions, so the same table drives import (HF -> JAX) and export (JAX -> HF) and a
round trip is exact by construction. Paths on our side are dotted NNX state paths
(`llm.layers.3.attn.query.kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig

Arrays = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: tuple[str, ...]
  hf: tuple[str, ...]
  to_ours: Callable[[Arrays], Arrays]
  to_hf: Callable[[Arrays], Arrays]


def _same(a: Arrays) -> Arrays:
  return [np.asarray(x) for x in a]


def _transpose(a: Arrays) -> Arrays:
  # torch Linear stores [out, in]; our kernels are [in, out].
  return [np.ascontiguousarray(np.swapaxes(x, -1, -2)) for x in a]


def _transpose_view(a: Arrays) -> Arrays:
  # Import side: a view, so placing one shard of a memory-mapped tensor reads only it.
  return [np.swapaxes(x, -1, -2) for x in a]


def copy(ours: str, hf: str) -> Rule:
  return Rule((ours,), (hf,), _same, _same)


def linear(ours: str, hf: str, bias: bool) -> list[Rule]:
  """A Dense layer: `<ours>.kernel` <-> `<hf>.weight` (transposed), optional bias."""
  rules = [Rule((f"{ours}.kernel",), (f"{hf}.weight",), _transpose_view, _transpose)]
  if bias:
    rules.append(copy(f"{ours}.bias", f"{hf}.bias"))
  return rules


def norm(ours: str, hf: str, with_bias: bool) -> list[Rule]:
  rules = [copy(f"{ours}.scale", f"{hf}.weight")]
  if with_bias:
    rules.append(copy(f"{ours}.bias", f"{hf}.bias"))
  return rules


def conv_patch(ours: str, hf: str) -> Rule:
  # torch Conv2d [out, in, kh, kw] <-> our HWIO [kh, kw, in, out].
  return Rule((ours,), (hf,), lambda a: [a[0].transpose(2, 3, 1, 0)],
              lambda a: [np.ascontiguousarray(a[0].transpose(3, 2, 0, 1))])


def _split_gate_up(a: Arrays) -> Arrays:
  fused = a[0]  # [E, 2F, D]: rows [0, F) are the gate, [F, 2F) the up projection
  f = fused.shape[1] // 2
  return _transpose_view([fused[:, :f], fused[:, f:]])


def _fuse_gate_up(a: Arrays) -> Arrays:
  gate, up = _transpose(a)
  return [np.concatenate([gate, up], axis=1)]


def _stack(a: Arrays) -> Arrays:
  return [np.stack(_transpose_view(a))]


def _unstack(a: Arrays) -> Arrays:
  return _transpose(list(a[0]))


# --------------------------------------------------------------------------- text


def _attn_out_name(cfg: TextConfig) -> str:
  return "dense" if cfg.family == "phi" else "o_proj"


def _dense_mlp_rules(cfg: TextConfig, o: str, h: str) -> list[Rule]:
  if cfg.mlp == "gated":
    names = (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj"))
  else:
    names = (("wi", "fc1"), ("wo", "fc2"))
  return [r for ours, theirs in names
          for r in linear(f"{o}.{ours}", f"{h}.{theirs}", cfg.mlp_bias)]


def _moe_rules(cfg: TextConfig, moe: MoEConfig, o: str, h: str, layout: str) -> list[Rule]:
  """Expert weights in transformers' fused Qwen2-MoE layout or MoE-LLaVA's DeepSpeed one."""
  e = moe.num_experts
  if layout == "qwen2_moe":
    if cfg.mlp != "gated" or cfg.mlp_bias:
      raise ValueError("the qwen2_moe layout holds gated experts without bias only; "
                       f"this model's experts are {cfg.mlp!r} (bias={cfg.mlp_bias})")
    return [
        Rule((f"{o}.router.kernel",), (f"{h}.gate.weight",), _transpose_view, _transpose),
        Rule((f"{o}.experts.wi_gate", f"{o}.experts.wi_up"), (f"{h}.experts.gate_up_proj",),
             _split_gate_up, _fuse_gate_up),
        Rule((f"{o}.experts.wo",), (f"{h}.experts.down_proj",), _transpose_view, _transpose),
    ]
  if layout == "moe_llava":
    d = f"{h}.deepspeed_moe"
    rules = [Rule((f"{o}.router.kernel",), (f"{d}.gate.wg.weight",), _transpose_view,
                  _transpose)]
    if cfg.mlp == "gated":
      names = (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj"))
    else:
      names = (("wi", "fc1"), ("wo", "fc2"))
    for ours, theirs in names:
      experts = tuple(f"{d}.experts.deepspeed_experts.{i}.{theirs}" for i in range(e))
      rules.append(Rule((f"{o}.experts.{ours}",), tuple(f"{x}.weight" for x in experts),
                        _stack, _unstack))
      if cfg.mlp_bias:
        rules.append(Rule((f"{o}.experts.{ours}_bias",), tuple(f"{x}.bias" for x in experts),
                          lambda a: [np.stack(a)], lambda a: list(a[0])))
    return rules
  raise ValueError(f"moe layout {layout!r}: expected 'qwen2_moe' or 'moe_llava'")


def text_rules(cfg: TextConfig, ours: str = "", hf_model: str = "model.",
               hf_lm_head: str = "lm_head", moe_layout: str = "qwen2_moe") -> list[Rule]:
  """Rules for a decoder LM. `hf_model` prefixes the body (`model.` for *ForCausalLM,
  `model.language_model.` inside LLaVA); `ours` prefixes our paths (`llm.` in the VLM)."""
  layer_norm = cfg.norm == "layer"
  final_norm = "final_layernorm" if cfg.family == "phi" else "norm"
  moe_layers = set(cfg.moe_layers())
  rules = [copy(f"{ours}embed", f"{hf_model}embed_tokens.weight")]
  for i in range(cfg.num_layers):
    o, h = f"{ours}layers.{i}", f"{hf_model}layers.{i}"
    rules += norm(f"{o}.input_norm", f"{h}.input_layernorm", layer_norm)
    for mine, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      rules += linear(f"{o}.attn.{mine}", f"{h}.self_attn.{theirs}", cfg.qkv_bias)
    rules += linear(f"{o}.attn.out", f"{h}.self_attn.{_attn_out_name(cfg)}", cfg.o_bias)
    if not cfg.parallel_residual:
      rules += norm(f"{o}.post_attn_norm", f"{h}.post_attention_layernorm", layer_norm)
    if i in moe_layers:
      rules += _moe_rules(cfg, cfg.moe, f"{o}.mlp", f"{h}.mlp", moe_layout)
    else:
      rules += _dense_mlp_rules(cfg, f"{o}.mlp", f"{h}.mlp")
  rules += norm(f"{ours}final_norm", f"{hf_model}{final_norm}", layer_norm)
  if not cfg.tie_embeddings:
    rules += linear(f"{ours}lm_head", hf_lm_head, cfg.lm_head_bias)
  return rules


# ------------------------------------------------------------------------- vision


def vision_rules(cfg: VisionConfig, ours: str = "", hf: str = "") -> list[Rule]:
  """Rules for CLIPVisionModel / SiglipVisionModel bodies (`hf` is their key prefix)."""
  rules = [conv_patch(f"{ours}patch_kernel", f"{hf}embeddings.patch_embedding.weight"),
           copy(f"{ours}pos_embedding", f"{hf}embeddings.position_embedding.weight")]
  if cfg.patch_bias:
    rules.append(copy(f"{ours}patch_bias", f"{hf}embeddings.patch_embedding.bias"))
  if cfg.class_token:
    rules.append(copy(f"{ours}class_embedding", f"{hf}embeddings.class_embedding"))
  if cfg.pre_norm:
    rules += norm(f"{ours}pre_norm", f"{hf}pre_layrnorm", True)
  for i in range(cfg.num_layers):
    o, h = f"{ours}layers.{i}", f"{hf}encoder.layers.{i}"
    rules += norm(f"{o}.norm1", f"{h}.layer_norm1", True)
    rules += norm(f"{o}.norm2", f"{h}.layer_norm2", True)
    for mine, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                         ("out", "out_proj")):
      rules += linear(f"{o}.attn.{mine}", f"{h}.self_attn.{theirs}", True)
    rules += linear(f"{o}.mlp.wi", f"{h}.mlp.fc1", True)
    rules += linear(f"{o}.mlp.wo", f"{h}.mlp.fc2", True)
  rules += norm(f"{ours}post_norm", f"{hf}post_layernorm", True)
  return rules


def projector_rules(kind: str, ours: str = "projector.",
                    hf: str = "model.multi_modal_projector.") -> list[Rule]:
  names = ("linear_1",) if kind == "linear" else ("linear_1", "linear_2")
  return [r for n in names for r in linear(f"{ours}{n}", f"{hf}{n}", True)]


def moe_llava_projector_rules(kind: str, ours: str = "projector.",
                              hf: str = "model.mm_projector.image_spatial_proj") -> list[Rule]:
  """MoE-LLaVA's projector: an nn.Linear, or nn.Sequential(Linear, GELU, Linear) whose
  linears are items 0 and 2."""
  if kind == "linear":
    return linear(f"{ours}linear_1", hf, True)
  return linear(f"{ours}linear_1", f"{hf}.0", True) + linear(f"{ours}linear_2", f"{hf}.2", True)


def llava_rules(cfg: VLMConfig, vision_prefix: str = "model.vision_tower.",
                moe_layout: str = "qwen2_moe") -> list[Rule]:
  """LlavaForConditionalGeneration (transformers 5 key layout)."""
  return (vision_rules(cfg.vision, "vision.", vision_prefix)
          + projector_rules(cfg.projector)
          + text_rules(cfg.text, "llm.", "model.language_model.", "lm_head", moe_layout))


def hf_keys(rules: Sequence[Rule]) -> set[str]:
  return {k for r in rules for k in r.hf}


# --------------------------------------------------- Qwen-1 (MoE-LLaVA's "qwen")


def _split_qkv(a: Arrays) -> Arrays:
  q, k, v = np.split(a[0], 3, axis=0)  # c_attn: [3 * D, ...], rows q | k | v
  return [np.swapaxes(x, -1, -2) if x.ndim == 2 else x for x in (q, k, v)]


def _fuse_qkv(a: Arrays) -> Arrays:
  return [np.ascontiguousarray(np.concatenate(
      [np.swapaxes(x, -1, -2) if x.ndim == 2 else x for x in a], axis=0))]


def qwen1_text_rules(cfg: TextConfig, ours: str = "llm.", moe_layout: str = "moe_llava"
                     ) -> list[Rule]:
  """Qwen-1's QWenLMHeadModel (MoE-LLaVA's `llava_qwen` classes): `transformer.wte`,
  `transformer.h.{i}.{ln_1, attn.c_attn (q|k|v fused), attn.c_proj, ln_2, mlp}`,
  `transformer.ln_f`, `lm_head`. Its MLP is `c_proj(w1(x) * silu(w2(x)))`: w2 is our
  gate, w1 our up projection. MoE layers: DeepSpeed's names around the same MLP."""
  if moe_layout != "moe_llava":
    raise ValueError("Qwen-1 weights exist only in MoE-LLaVA's layout")
  names = (("wi_up", "w1"), ("wi_gate", "w2"), ("wo", "c_proj"))
  moe_layers = set(cfg.moe_layers())
  rules = [copy(f"{ours}embed", "transformer.wte.weight")]
  for i in range(cfg.num_layers):
    o, h = f"{ours}layers.{i}", f"transformer.h.{i}"
    rules += norm(f"{o}.input_norm", f"{h}.ln_1", False)
    qkv = tuple(f"{o}.attn.{n}" for n in ("query", "key", "value"))
    rules.append(Rule(tuple(f"{x}.kernel" for x in qkv), (f"{h}.attn.c_attn.weight",),
                      _split_qkv, _fuse_qkv))
    if cfg.qkv_bias:
      rules.append(Rule(tuple(f"{x}.bias" for x in qkv), (f"{h}.attn.c_attn.bias",),
                        _split_qkv, _fuse_qkv))
    rules += linear(f"{o}.attn.out", f"{h}.attn.c_proj", cfg.o_bias)
    rules += norm(f"{o}.post_attn_norm", f"{h}.ln_2", False)
    if i in moe_layers:
      d = f"{h}.mlp.deepspeed_moe"
      rules.append(Rule((f"{o}.mlp.router.kernel",), (f"{d}.gate.wg.weight",),
                        _transpose_view, _transpose))
      for mine, theirs in names:
        experts = tuple(f"{d}.experts.deepspeed_experts.{e}.{theirs}"
                        for e in range(cfg.moe.num_experts))
        rules.append(Rule((f"{o}.mlp.experts.{mine}",), tuple(f"{x}.weight" for x in experts),
                          _stack, _unstack))
        if cfg.mlp_bias:
          rules.append(Rule((f"{o}.mlp.experts.{mine}_bias",),
                            tuple(f"{x}.bias" for x in experts),
                            lambda a: [np.stack(a)], lambda a: list(a[0])))
    else:
      for mine, theirs in names:
        rules += linear(f"{o}.mlp.{mine}", f"{h}.mlp.{theirs}", cfg.mlp_bias)
  rules += norm(f"{ours}final_norm", "transformer.ln_f", False)
  if not cfg.tie_embeddings:
    rules += linear(f"{ours}lm_head", "lm_head", cfg.lm_head_bias)
  return rules


# ------------------------------------------------------------------------ Qwen2-VL


def _patch_embed_to_ours(a: Arrays) -> Arrays:
  w = a[0]  # Conv3d [D, C, T, p, p]: kernel = stride = one patch, i.e. a linear map
  return [w.reshape(w.shape[0], -1).T]


def qwen2_vl_vision_rules(cfg: VisionConfig, ours: str = "vision.", hf: str = "model.visual.",
                          projector: str = "projector.") -> list[Rule]:
  """Qwen2-VL's vision tower and patch merger (`Qwen2VisionTransformerPretrainedModel`):
  `patch_embed.proj` (Conv3d, no bias) <-> our patch_kernel [C*T*p*p, D] (the patch
  flattened in HF's (C, T, p, p) order); `blocks.{i}.{norm1, norm2, attn.qkv (q|k|v
  fused rows), attn.proj, mlp.fc1, mlp.fc2}`; `merger.{ln_q, mlp.0, mlp.2}` <-> our
  projector's ln_q, linear_1, linear_2."""
  shape = (cfg.hidden_size, cfg.num_channels, cfg.temporal_patch_size, cfg.patch_size,
           cfg.patch_size)
  rules = [Rule((f"{ours}patch_kernel",), (f"{hf}patch_embed.proj.weight",),
                _patch_embed_to_ours,
                lambda a: [np.ascontiguousarray(a[0].T.reshape(shape))])]
  for i in range(cfg.num_layers):
    o, h = f"{ours}layers.{i}", f"{hf}blocks.{i}"
    rules += norm(f"{o}.norm1", f"{h}.norm1", True)
    rules += norm(f"{o}.norm2", f"{h}.norm2", True)
    qkv = tuple(f"{o}.attn.{n}" for n in ("query", "key", "value"))
    rules.append(Rule(tuple(f"{x}.kernel" for x in qkv), (f"{h}.attn.qkv.weight",),
                      _split_qkv, _fuse_qkv))
    rules.append(Rule(tuple(f"{x}.bias" for x in qkv), (f"{h}.attn.qkv.bias",),
                      _split_qkv, _fuse_qkv))
    rules += linear(f"{o}.attn.out", f"{h}.attn.proj", True)
    rules += linear(f"{o}.mlp.wi", f"{h}.mlp.fc1", True)
    rules += linear(f"{o}.mlp.wo", f"{h}.mlp.fc2", True)
  rules += norm(f"{projector}ln_q", f"{hf}merger.ln_q", True)
  rules += linear(f"{projector}linear_1", f"{hf}merger.mlp.0", True)
  rules += linear(f"{projector}linear_2", f"{hf}merger.mlp.2", True)
  return rules


def qwen2_vl_rules(cfg: VLMConfig) -> list[Rule]:
  """Qwen2VLForConditionalGeneration (transformers 5's in-memory names: `model.visual.*`,
  `model.language_model.*`, `lm_head`)."""
  return (qwen2_vl_vision_rules(cfg.vision)
          + text_rules(cfg.text, "llm.", "model.language_model.", "lm_head"))
