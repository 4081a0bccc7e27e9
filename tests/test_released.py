"""MoE-LLaVA's released checkpoint directories, converted as they are (offline).

Each test builds, from a random JAX model of ours, a tiny directory laid out like a
released variant (LanguageBind/MoE-LLaVA-{StableLM-1.6B,Qwen-1.8B,Phi2-2.7B}-4e[-384],
and a Qwen1.5 one as MoE-LLaVA's qwen1_5 classes write it): its
config.json fields (hub id in `mm_image_tower`, `auto_map`, `max_position_embeddings`,
`tokenizer_model_max_length`, ...), bf16 weights in two shards under MoE-LLaVA's names
(written here from the names MoE-LLaVA's modules have, not through our key tables)
with the tower's copy under `model.image_tower.image_tower.vision_model.*` (SigLIP's
with its attention-pool head), and the tokenizer files without `<image>`: Arcade100k's
tiktoken file for StableLM, Qwen-1's qwen.tiktoken (with its `transformer.h.*`, fused
`c_attn`, `w1`/`w2`/`c_proj` names), CodeGen's vocab.json + merges.txt for Phi-2, Qwen2's
for Qwen1.5. Checked:
1. `moe-vlm convert from-hf --hf DIR --out CKPT` converts it; the converted model's logits
   equal those of the model the directory was written from; the tower read from the
   copy equals transformers' CLIP/SigLIP vision model on those tensors;
2. `to-hf --ckpt CKPT` reproduces config.json, every tensor (name, dtype, bits), the
   tokenizer files and generation_config.json;
3. prompt ids: ours equal MoE-LLaVA's `tokenizer_image_token` (transcribed below) with
   its -200 replaced by the image's reserved row, for every tokenizer; Arcade100k's and
   Qwen-1's ids equal a transcription of their original classes on tiktoken;
4. refusals: an unknown tower name, no spare embedding row, an unsupported family.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import subprocess
import sys
import unicodedata

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from moe_vlm.convert import export, hf, released  # noqa: E402
from moe_vlm.convert.hf import ConversionError  # noqa: E402
from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig  # noqa: E402
from moe_vlm.models.vlm import VLM  # noqa: E402

transformers.logging.set_verbosity_error()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_NAME, SIGLIP_NAME = "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384"
IMAGE_TOKEN_INDEX = -200  # MoE-LLaVA's constants.py

# Towers of the named models' kind (16 heads, their eps and activation), tiny sizes.
CLIP = VisionConfig(variant="clip", image_size=28, patch_size=14, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=16, norm_eps=1e-5,
                    activation="quick_gelu")
SIGLIP = dataclasses.replace(CLIP, variant="siglip", norm_eps=1e-6,
                             activation="gelu_pytorch_tanh")
MOE = MoEConfig(num_experts=4, top_k=2, moe_mode="sparse", capacity_factor=1.5,
                eval_capacity_factor=2.0, min_capacity=0)
COMMON = dict(hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
              num_kv_heads=4, moe=MOE)
TEXT = {
    # StableLM-2: LayerNorm, qkv bias, 25% rotary; the table padded past Arcade100k's ids.
    "stablelm": TextConfig(family="stablelm", vocab_size=100352, norm="layer", norm_eps=1e-5,
                           mlp="gated", qkv_bias=True, partial_rotary_factor=0.25, **COMMON),
    "qwen1_5": TextConfig(family="qwen2", vocab_size=320, norm="rms", norm_eps=1e-6,
                          mlp="gated", qkv_bias=True, rope_theta=1e6, **COMMON),
    # Qwen-1 (QWenLMHeadModel): the Qwen2 computation, c_attn with bias, no other bias.
    "qwen": TextConfig(family="qwen2", vocab_size=151936, norm="rms", norm_eps=1e-6,
                       mlp="gated", qkv_bias=True, **COMMON),
    # Phi-2: parallel residual, biased plain MLP, 40% rotary; MoE checkpoints have no
    # lm_head bias.
    "phi2": TextConfig(family="phi", vocab_size=320, norm="layer", norm_eps=1e-5, mlp="plain",
                       activation="gelu_new", mlp_bias=True, qkv_bias=True, o_bias=True,
                       parallel_residual=True, partial_rotary_factor=0.4,
                       **dict(COMMON, hidden_size=80, intermediate_size=160)),
}
# variant: (text, tower, tower name, tokenizer kind, model_type suffix, class part)
VARIANTS = {
    "StableLM-1.6B-4e": ("stablelm", CLIP, CLIP_NAME, "arcade100k", "stablelm", "Stablelm"),
    "Qwen1.5-1.8B-4e": ("qwen1_5", CLIP, CLIP_NAME, "qwen2", "qwen1_5", "Qwen1_5"),
    "Qwen-1.8B-4e": ("qwen", CLIP, CLIP_NAME, "qwen_tiktoken", "qwen", "QWen"),
    "Phi2-2.7B-4e": ("phi2", CLIP, CLIP_NAME, "codegen", "phi", "Phi"),
    "Phi2-2.7B-4e-384": ("phi2", SIGLIP, SIGLIP_NAME, "codegen", "phi", "Phi"),
}
CORPUS = ["A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions.",
          "USER: What is the colour of the shape? ASSISTANT: The shape is red.",
          "Is there a circle in the image? Answer the question using a single word."] * 8


# ---------------------------------------------------------------- tokenizer files


def _bpe(out: str, added: list[str], cls: str, roles: dict) -> int:
  """A byte-level BPE (GPT-2 style, as CodeGen's and Qwen2's) saved as its slow files:
  vocab.json + merges.txt + added_tokens.json, as MoE-LLaVA's use_fast=False tokenizer
  saves them. Returns the tokenizer's length."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  os.makedirs(out, exist_ok=True)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.model.save(out)
  n = tok.get_vocab_size()
  ids = {t: n + i for i, t in enumerate(added)}
  decoder = {str(i): dict(content=t, special=True, lstrip=False, rstrip=False,
                          normalized=False, single_word=False) for t, i in ids.items()}
  _json(os.path.join(out, "added_tokens.json"), ids)
  _json(os.path.join(out, "special_tokens_map.json"), roles)
  _json(os.path.join(out, "tokenizer_config.json"),
        dict(tokenizer_class=cls, model_max_length=2048, padding_side="right",
             added_tokens_decoder=decoder, add_bos_token=False, **roles))
  return n + len(added)


def _tiktoken_ranks(n: int) -> dict[bytes, int]:
  """n ranks (ids 0..n-1; Arcade100k has 100256, Qwen-1 151643): the 256 bytes, every
  prefix of the corpus' words (so BPE merges reach whole words), then filler tokens no
  text reaches."""
  ranks = {bytes([b]): b for b in range(256)}
  for word in " ".join(CORPUS).replace(".", " .").split():
    for piece in (word, " " + word):
      data = piece.encode()
      for end in range(2, len(data) + 1):
        ranks.setdefault(data[:end], len(ranks))
  i = 0
  while len(ranks) < n:
    ranks.setdefault(b"\x00\x00" + i.to_bytes(3, "big"), len(ranks))
    i += 1
  return ranks


def _write_ranks(file: str, n: int) -> None:
  with open(file, "w") as f:
    for token, rank in _tiktoken_ranks(n).items():
      f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def _qwen_tiktoken(out: str) -> int:
  os.makedirs(out, exist_ok=True)
  _write_ranks(os.path.join(out, "qwen.tiktoken"), 151643)
  with open(os.path.join(out, "tokenization_qwen.py"), "w") as f:
    f.write("raise RuntimeError('remote code must not run')\n")
  # MoE-LLaVA's training adds unk <|extra_0|> and eos <|endoftext|> (both Qwen specials).
  roles = dict(eos_token="<|endoftext|>", unk_token="<|extra_0|>", pad_token="<|extra_0|>")
  _json(os.path.join(out, "tokenizer_config.json"),
        dict(tokenizer_class="QWenTokenizer", model_max_length=2048, padding_side="right",
             auto_map={"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}, **roles))
  _json(os.path.join(out, "special_tokens_map.json"), roles)
  return 151851


def _arcade100k(out: str) -> int:
  os.makedirs(out, exist_ok=True)
  _write_ranks(os.path.join(out, "arcade100k.tiktoken"), 100256)
  # The released directory carries the remote code; we copy it, never run it.
  with open(os.path.join(out, "tokenization_arcade100k.py"), "w") as f:
    f.write("raise RuntimeError('remote code must not run')\n")
  auto = {"AutoTokenizer": ["tokenization_arcade100k.Arcade100kTokenizer", None]}
  _json(os.path.join(out, "tokenizer_config.json"),
        dict(tokenizer_class="Arcade100kTokenizer", auto_map=auto, model_max_length=2048,
             padding_side="right", unk_token="<|reg0|>"))
  _json(os.path.join(out, "special_tokens_map.json"),
        dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|reg0|>"))
  return 100289


def write_tokenizer(kind: str, out: str) -> int:
  """Tokenizer files as the released directory has them; returns len(tokenizer)."""
  if kind == "arcade100k":
    return _arcade100k(out)
  if kind == "qwen_tiktoken":
    return _qwen_tiktoken(out)
  if kind == "codegen":  # training added <|extra_0|> as unk
    return _bpe(out, ["<|endoftext|>", "<|extra_0|>"], "CodeGenTokenizer",
                dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                     unk_token="<|extra_0|>", pad_token="<|extra_0|>"))
  return _bpe(out, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>"],
              "Qwen2Tokenizer", dict(eos_token="<|endoftext|>", unk_token="<|extra_0|>",
                                     pad_token="<|extra_0|>"))


# ------------------------------------------------------------- config and weights


def _json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def released_config(variant: str) -> dict:
  """config.json as MoE-LLaVA's training leaves it (the backbone's own fields beside the
  `moe` dict and the `mm_*` keys)."""
  text_name, tower, tower_name, _, suffix, cls = VARIANTS[variant]
  t = TEXT[text_name]
  layers = list(range(t.num_layers))[::2]
  modules = ["fc1", "fc2", "wg"] if t.mlp == "plain" else ["gate_proj", "up_proj",
                                                           "down_proj", "wg"]
  c = dict(
      _name_or_path=f"./checkpoints/llavaphi-2.7b-finetune-moe-{suffix}",
      architectures=[f"MoELLaVA{cls}ForCausalLM"], model_type=f"moe_llava_{suffix}",
      hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
      num_key_value_heads=t.num_kv_heads, hidden_act=t.activation, vocab_size=t.vocab_size,
      rope_theta=t.rope_theta, tie_word_embeddings=False, initializer_range=0.02,
      use_cache=False, torch_dtype="bfloat16", transformers_version="4.37.0",
      image_aspect_ratio="pad", image_projector_type="mlp2x_gelu",
      mm_hidden_size=tower.hidden_size, mm_image_tower=tower_name, mm_projector_lr=None,
      mm_use_im_patch_token=False, mm_use_im_start_end=False, mm_video_tower=None,
      mm_vision_select_feature="patch", mm_vision_select_layer=-2,
      tokenizer_model_max_length=2048, tokenizer_padding_side="right",
      tune_mm_mlp_adapter=False, use_mm_proj=True,
      moe=dict(moe_enable=True, train_modules=modules, moe_mode="sparse",
               moe_layers_idx=layers, ep_size=1, top_k_experts=2, capacity_factor=1.5,
               eval_capacity_factor=2.0, min_capacity=0, use_residual=False,
               router_aux_loss_coef=0.01, num_experts=[4] * len(layers)))
  if text_name == "stablelm":
    c.update(auto_map={
        "AutoConfig": "stabilityai/stablelm-2-1_6b--configuration_stablelm_epoch."
                      "StableLMEpochConfig",
        "AutoModelForCausalLM": "stabilityai/stablelm-2-1_6b--modeling_stablelm_epoch."
                                "StableLMEpochForCausalLM"},
             rope_pct=t.partial_rotary_factor, norm_eps=t.norm_eps, use_qkv_bias=True,
             max_position_embeddings=4096, rotary_scaling_factor=1.0, bos_token_id=100257,
             eos_token_id=100257)
  elif text_name == "qwen":  # QWenConfig's own fields, no transformers-style ones
    for k in ("hidden_act", "rope_theta", "num_key_value_heads"):
      del c[k]
    c.update(auto_map={"AutoConfig": "Qwen/Qwen-1_8B--configuration_qwen.QWenConfig",
                       "AutoModelForCausalLM": "Qwen/Qwen-1_8B--modeling_qwen.QWenLMHeadModel"},
             intermediate_size=2 * t.intermediate_size, kv_channels=t.hidden_size // t.num_heads,
             layer_norm_epsilon=t.norm_eps, rotary_emb_base=10000, rotary_pct=1.0, no_bias=True,
             seq_length=8192, max_position_embeddings=8192, use_dynamic_ntk=True,
             use_logn_attn=True, use_flash_attn="auto", scale_attn_weights=True, bf16=False,
             fp16=False, fp32=False, emb_dropout_prob=0.0, attn_dropout_prob=0.0,
             softmax_in_fp32=False, onnx_safe=None, tokenizer_class="QWenTokenizer")
    c["moe"]["train_modules"] = ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"]
  elif text_name == "qwen1_5":
    c.update(rms_norm_eps=t.norm_eps, max_position_embeddings=32768, max_window_layers=21,
             sliding_window=32768, use_sliding_window=False, attention_dropout=0.0,
             bos_token_id=None, eos_token_id=None)
  else:
    c.update(layer_norm_eps=t.norm_eps, partial_rotary_factor=t.partial_rotary_factor,
             qk_layernorm=False, resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0,
             max_position_embeddings=2048, rope_scaling=None, bos_token_id=50256,
             eos_token_id=50256)
  return c


def released_state(model: VLM, qwen1: bool = False) -> dict[str, np.ndarray]:
  """The model's tensors under the names MoE-LLaVA's modules give them (a transcription
  of those modules' attribute names, independent of moe_vlm.convert.keymap); `qwen1`:
  its Qwen-1 classes (QWenLMHeadModel's `transformer.*`)."""
  p = {k: np.asarray(v[...], np.float32) for k, v in hf.flat_params(model).items()}
  t, v = model.cfg.text, model.cfg.vision
  out = {}

  def linear(theirs, ours, bias=True):
    out[f"{theirs}.weight"] = p[f"{ours}.kernel"].T
    if bias:
      out[f"{theirs}.bias"] = p[f"{ours}.bias"]

  def norm(theirs, ours, bias):
    out[f"{theirs}.weight"] = p[f"{ours}.scale"]
    if bias:
      out[f"{theirs}.bias"] = p[f"{ours}.bias"]

  layer_norm = t.norm == "layer"
  mlp_names = ({"wi": "fc1", "wo": "fc2"} if t.mlp == "plain" else
               {"wi_gate": "gate_proj", "wi_up": "up_proj", "wo": "down_proj"})
  if qwen1:
    _qwen1_text(p, t, out, linear)
  out["model.embed_tokens.weight"] = p["llm.embed"]
  for i in range(t.num_layers if not qwen1 else 0):
    h, o = f"model.layers.{i}", f"llm.layers.{i}"
    norm(f"{h}.input_layernorm", f"{o}.input_norm", layer_norm)
    for theirs, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      linear(f"{h}.self_attn.{theirs}", f"{o}.attn.{ours}", t.qkv_bias)
    linear(f"{h}.self_attn.{'dense' if t.family == 'phi' else 'o_proj'}", f"{o}.attn.out",
           t.o_bias)
    if not t.parallel_residual:
      norm(f"{h}.post_attention_layernorm", f"{o}.post_attn_norm", layer_norm)
    if i in t.moe_layers():  # DeepSpeed's MoE(expert=the layer's MLP)
      d = f"{h}.mlp.deepspeed_moe"
      out[f"{d}.gate.wg.weight"] = p[f"{o}.mlp.router.kernel"].T
      for e in range(t.moe.num_experts):
        for ours, theirs in mlp_names.items():
          x = f"{d}.experts.deepspeed_experts.{e}.{theirs}"
          out[f"{x}.weight"] = p[f"{o}.mlp.experts.{ours}"][e].T
          if t.mlp_bias:
            out[f"{x}.bias"] = p[f"{o}.mlp.experts.{ours}_bias"][e]
    else:
      for ours, theirs in mlp_names.items():
        linear(f"{h}.mlp.{theirs}", f"{o}.mlp.{ours}", t.mlp_bias)
  if qwen1:
    del out["model.embed_tokens.weight"]
  else:
    norm("model.final_layernorm" if t.family == "phi" else "model.norm", "llm.final_norm",
         layer_norm)
  out["lm_head.weight"] = p["llm.lm_head.kernel"].T
  meta = "transformer." if qwen1 else "model."  # LlavaMetaModel: the decoder body
  linear(f"{meta}mm_projector.image_spatial_proj.0", "projector.linear_1")
  linear(f"{meta}mm_projector.image_spatial_proj.2", "projector.linear_2")
  # CLIPVisionTower / SiglipVisionTower: self.image_tower = *VisionModel (.vision_model)
  c = f"{meta}image_tower.image_tower.vision_model."
  out[f"{c}embeddings.patch_embedding.weight"] = p["vision.patch_kernel"].transpose(3, 2, 0, 1)
  out[f"{c}embeddings.position_embedding.weight"] = p["vision.pos_embedding"]
  if v.variant == "clip":
    out[f"{c}embeddings.class_embedding"] = p["vision.class_embedding"]
    norm(f"{c}pre_layrnorm", "vision.pre_norm", True)
  else:
    out[f"{c}embeddings.patch_embedding.bias"] = p["vision.patch_bias"]
  for i in range(v.num_layers):
    h, o = f"{c}encoder.layers.{i}", f"vision.layers.{i}"
    norm(f"{h}.layer_norm1", f"{o}.norm1", True)
    norm(f"{h}.layer_norm2", f"{o}.norm2", True)
    for theirs, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                         ("out_proj", "out")):
      linear(f"{h}.self_attn.{theirs}", f"{o}.attn.{ours}")
    linear(f"{h}.mlp.fc1", f"{o}.mlp.wi")
    linear(f"{h}.mlp.fc2", f"{o}.mlp.wo")
  norm(f"{c}post_layernorm", "vision.post_norm", True)
  if v.variant == "siglip":  # SiglipVisionModel's attention-pool head: we have none
    rng, d = np.random.RandomState(7), v.hidden_size
    for name, shape in (("probe", (1, 1, d)), ("attention.in_proj_weight", (3 * d, d)),
                        ("attention.in_proj_bias", (3 * d,)),
                        ("attention.out_proj.weight", (d, d)),
                        ("attention.out_proj.bias", (d,)), ("layernorm.weight", (d,)),
                        ("layernorm.bias", (d,)), ("mlp.fc1.weight", (v.intermediate_size, d)),
                        ("mlp.fc1.bias", (v.intermediate_size,)),
                        ("mlp.fc2.weight", (d, v.intermediate_size)), ("mlp.fc2.bias", (d,))):
      out[f"{c}head.{name}"] = rng.randn(*shape).astype(np.float32)
  return {k: np.ascontiguousarray(x).astype(ml_dtypes.bfloat16) for k, x in out.items()}


def _qwen1_text(p, t, out, linear) -> None:
  """QWenLMHeadModel: wte, h.{i}.{ln_1, attn.c_attn (q|k|v rows), attn.c_proj, ln_2,
  mlp.{w1, w2, c_proj}} with c_proj(w1(x) * silu(w2(x))), ln_f; DeepSpeed experts."""
  out["transformer.wte.weight"] = p["llm.embed"]
  for i in range(t.num_layers):
    h, o = f"transformer.h.{i}", f"llm.layers.{i}"
    out[f"{h}.ln_1.weight"] = p[f"{o}.input_norm.scale"]
    out[f"{h}.attn.c_attn.weight"] = np.concatenate(
        [p[f"{o}.attn.{n}.kernel"].T for n in ("query", "key", "value")])
    out[f"{h}.attn.c_attn.bias"] = np.concatenate(
        [p[f"{o}.attn.{n}.bias"] for n in ("query", "key", "value")])
    linear(f"{h}.attn.c_proj", f"{o}.attn.out", False)
    out[f"{h}.ln_2.weight"] = p[f"{o}.post_attn_norm.scale"]
    names = {"wi_up": "w1", "wi_gate": "w2", "wo": "c_proj"}
    if i in t.moe_layers():
      d = f"{h}.mlp.deepspeed_moe"
      out[f"{d}.gate.wg.weight"] = p[f"{o}.mlp.router.kernel"].T
      for e in range(t.moe.num_experts):
        for ours, theirs in names.items():
          out[f"{d}.experts.deepspeed_experts.{e}.{theirs}.weight"] = \
              p[f"{o}.mlp.experts.{ours}"][e].T
    else:
      for ours, theirs in names.items():
        linear(f"{h}.mlp.{theirs}", f"{o}.mlp.{ours}", False)
  out["transformer.ln_f.weight"] = p["llm.final_norm.scale"]


def _write_shards(state: dict[str, np.ndarray], out: str) -> None:
  """Two shards + index, as save_pretrained writes a large model."""
  keys = sorted(state)
  halves = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  weight_map = {}
  for name, ks in halves.items():
    save_file({k: state[k] for k in ks}, os.path.join(out, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in ks})
  _json(os.path.join(out, "model.safetensors.index.json"),
        {"metadata": {"total_size": sum(x.nbytes for x in state.values())},
         "weight_map": weight_map})


def _randomize(model: VLM, seed: int) -> VLM:
  """O(0.1) weights, ~1 norm scales, rounded to bf16 (the released dtype), so the bf16
  files hold exactly the model's values."""
  rng = np.random.RandomState(seed)
  for path, var in hf.flat_params(model).items():
    base = 1.0 if path.endswith(".scale") else 0.0
    value = (base + 0.1 * rng.randn(*var.shape)).astype(ml_dtypes.bfloat16)
    var[...] = jnp.asarray(value.astype(np.float32))
  return model


@functools.lru_cache(maxsize=None)
def built(variant: str, root: str) -> tuple[VLM, str, int]:
  """(in-memory model, released-layout directory, len(tokenizer))."""
  text_name, tower, _, tok_kind, _, _ = VARIANTS[variant]
  out = os.path.join(root, f"MoE-LLaVA-{variant}")
  os.makedirs(out)
  n_tok = write_tokenizer(tok_kind, out)
  # image_token_id: the reserved row the converter will choose (the first past the
  # tokenizer's ids); the directory itself knows no such id.
  cfg = VLMConfig(vision=tower, text=TEXT[text_name], projector="mlp2x_gelu",
                  image_token_id=n_tok)
  model = _randomize(VLM(cfg, rngs=nnx.Rngs(0)), seed=len(variant))
  _json(os.path.join(out, "config.json"), released_config(variant))
  _json(os.path.join(out, "generation_config.json"),
        {"_from_model_config": True, "transformers_version": "4.37.0"})
  _write_shards(released_state(model, qwen1=text_name == "qwen"), out)
  return model, out, n_tok


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("released"))


def _run(*args: str) -> str:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "moe_vlm", "convert", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@functools.lru_cache(maxsize=None)
def converted(variant: str, root: str) -> str:
  _, src, _ = built(variant, root)
  ckpt = os.path.join(root, f"ckpt-{variant}")
  if variant == "Phi2-2.7B-4e":  # the command itself, once
    _run("from-hf", f"--hf={src}", f"--out={ckpt}")
  else:
    export.from_hf(src, ckpt)
  return ckpt


@nnx.jit
def _forward(model, ids, pixels):
  return model(ids, pixels, dispatch="dropless")[0]


# ----------------------------------------------------- 1. converted as they are


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_directory_converts_as_it_is(variant, root):
  from moe_vlm import experiment
  from moe_vlm.parallel import placement

  model, src, n_tok = built(variant, root)
  ckpt = converted(variant, root)
  cfg = export.load_config(os.path.join(ckpt, export.CONFIG_FILE))
  # The image takes the row past the tokenizer's ids; the tower comes from the copy.
  assert cfg.image_token_id == n_tok < cfg.text.vocab_size
  assert cfg.vision == model.cfg.vision
  assert export._architecture(cfg) == export._architecture(model.cfg)  # pylint: disable=protected-access
  assert cfg.text.moe.dispatch == "capacity" and cfg.text.moe.eval_capacity_factor == 2.0
  params = experiment.load_params(os.path.join(ckpt, "params"), cfg)
  back = placement.abstract_codec(cfg).merge(params)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, min(n_tok, 280), size=(2, 16))
  p = cfg.num_image_tokens
  ids[0, 2:2 + p] = ids[1, 5:5 + p] = cfg.image_token_id
  px = rng.randn(2, 28, 28, 3).astype(np.float32)
  want = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(px)))
  got = np.asarray(_forward(back, jnp.asarray(ids), jnp.asarray(px)))
  np.testing.assert_array_equal(got, want)
  # The copy under model.image_tower.image_tower.* is the named tower's kind: transformers'
  # vision model of that config on the same tensors gives our features.
  state = hf.load_safetensors(src)
  prefix = ("transformer." if "Qwen-1" in variant else "model.") + "image_tower.image_tower."
  copy = {k[len(prefix):]: torch.from_numpy(np.asarray(v).astype(np.float32))
          for k, v in state.items() if k.startswith(prefix)}
  vision = hf.vision_config_to_hf(cfg.vision)
  cls = (transformers.CLIPVisionModel if cfg.vision.variant == "clip"
         else transformers.SiglipVisionModel)
  if cfg.vision.variant == "siglip":
    vision.vision_use_head = True
  tower = cls(vision).eval()
  if not any(k.startswith("vision_model.") for k in tower.state_dict()):  # transformers 5
    copy = {k.removeprefix("vision_model."): x for k, x in copy.items()}
  missing, unexpected = tower.load_state_dict(copy, strict=False)
  assert not missing and not unexpected, (missing, unexpected)
  with torch.no_grad():
    ref = tower(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2)),
                output_hidden_states=True).hidden_states[-2].numpy()
  ours = np.asarray(back.vision.features(jnp.asarray(px), -2))
  assert float(np.max(np.abs(ours - ref))) < 1e-4
  # Offline inference on the checkpoint: MoE-LLaVA's template, the image on its row.
  from moe_vlm.infer import load as load_lib
  im = load_lib.load_checkpoint(ckpt)
  prompt = im.encode([{"from": "human", "value": "<image>\nWhat is the colour?"}])
  assert int(np.sum(prompt == n_tok)) == p and prompt.max() == n_tok
  assert len(im.tokenizer) == n_tok


# ------------------------------------------------------ 2. exported back unchanged


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_then_export_reproduces_the_directory(variant, root, tmp_path):
  _, src, _ = built(variant, root)
  out = str(tmp_path / f"MoE-LLaVA-{variant}-again")
  assert export.to_hf(out, ckpt=converted(variant, root)) == "moe_llava"
  load = lambda d, n: json.load(open(os.path.join(d, n)))
  assert load(out, "config.json") == load(src, "config.json")
  assert load(out, "generation_config.json") == load(src, "generation_config.json")
  want, got = hf.load_safetensors(src), hf.load_safetensors(out)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    assert np.asarray(got[k]).tobytes() == np.asarray(v).tobytes(), k
  tok_files = sorted(n for n in os.listdir(src) if not n.startswith(("model", "config",
                                                                     "generation")))
  assert tok_files and sorted(n for n in os.listdir(out) if n in tok_files) == tok_files
  for n in tok_files:
    assert open(os.path.join(out, n), "rb").read() == open(os.path.join(src, n), "rb").read()
  assert not os.path.exists(os.path.join(out, export.IMAGE_TOWER_DIR))
  # The export converts again to the same model.
  back = export.import_vlm(out)
  assert back.cfg.image_token_id == export.load_config(
      os.path.join(converted(variant, root), export.CONFIG_FILE)).image_token_id


def test_mm_image_tower_flag_and_fresh_models(root, tmp_path):
  """A flag overrides the tower name; a model trained here exports with the hub name of
  its tower when its architecture is a known one."""
  out = str(tmp_path / "flag")
  export.to_hf(out, ckpt=converted("Phi2-2.7B-4e", root), mm_image_tower="openai/other")
  assert json.load(open(os.path.join(out, "config.json")))["mm_image_tower"] == "openai/other"
  known = released.KNOWN_TOWERS[CLIP_NAME]
  assert released.known_tower_name(dataclasses.replace(known, dtype="bfloat16")) == CLIP_NAME
  assert released.known_tower_name(CLIP) is None


# ---------------------------------------------------------------- 3. prompt ids


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
  """MoE-LLaVA's moellava/mm_utils.py:tokenizer_image_token, transcribed."""
  prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

  def insert_separator(x, sep):
    return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

  input_ids = []
  offset = 0
  if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos_token_id:
    offset = 1
    input_ids.append(prompt_chunks[0][0])
  for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
    input_ids.extend(x[offset:])
  return input_ids


class TiktokenReference:
  """What MoE-LLaVA's Arcade100kTokenizer / QWenTokenizer compute for
  `tokenizer(text).input_ids`, on tiktoken (their split pattern and special-token
  tables, NFC, allowed_special="all"; both override `tokenize`, add no special tokens)."""

  PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
         r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
  SPECIAL = (["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
              "<|fim_pad|>", "<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>",
              "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
              "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
              "<commit_after>", "<reponame>", "<|endofprompt|>", "<|im_start|>",
              "<|im_end|>", "<|pause|>"] + [f"<|reg{i}|>" for i in range(8)]
             + ["<|extra0|>"])
  QWEN_SPECIAL = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
                  + [f"<|extra_{i}|>" for i in range(205)])
  bos_token_id = None

  def __init__(self, path):
    import tiktoken
    arcade = os.path.exists(os.path.join(path, "arcade100k.tiktoken"))
    file, special, start, gap = (("arcade100k.tiktoken", self.SPECIAL, 100257, 1) if arcade
                                 else ("qwen.tiktoken", self.QWEN_SPECIAL, 151643, 0))
    with open(os.path.join(path, file), "rb") as f:
      ranks = {base64.b64decode(t): int(r)
               for t, r in (ln.split() for ln in f.read().splitlines() if ln)}
    special = {t: start + i for i, t in enumerate(special)}
    self.enc = tiktoken.Encoding(file.split(".")[0], pat_str=self.PAT,
                                 mergeable_ranks=ranks, special_tokens=special)
    assert len(ranks) + len(special) + gap == self.enc.n_vocab

  def __call__(self, text):
    ids = self.enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    return type("Encoding", (), {"input_ids": ids})


PROMPTS = ["What is the colour of the shape?", "Is there a circle? Answer yes or no.",
           "Describe <|endoftext|> the image  in detail.\n\nThanks", "café naïve ｆｕｌｌ"]


@pytest.mark.parametrize("variant", ["StableLM-1.6B-4e", "Qwen1.5-1.8B-4e", "Qwen-1.8B-4e",
                                     "Phi2-2.7B-4e"])
def test_prompt_ids_match_tokenizer_image_token(variant, root):
  from moe_vlm.data import templates
  from moe_vlm.infer import load as load_lib

  _, src, n_tok = built(variant, root)
  im = load_lib.load_checkpoint(converted(variant, root))
  reference = (TiktokenReference(src) if "tiktoken" in " ".join(os.listdir(src))
               else transformers.AutoTokenizer.from_pretrained(src))
  p = im.cfg.num_image_tokens
  for question in PROMPTS:
    turns = [{"from": "human", "value": "<image>\n" + question}]
    # MoE-LLaVA's conversation (SeparatorStyle.TWO): system, " USER: ", the message,
    # " ASSISTANT:".
    prompt = f"{templates.MOE_LLAVA_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    theirs = tokenizer_image_token(prompt, reference)
    spliced = []
    for i in theirs:
      spliced += [im.cfg.image_token_id] * p if i == IMAGE_TOKEN_INDEX else [i]
    assert im.encode(turns).tolist() == spliced, question
    assert IMAGE_TOKEN_INDEX in theirs and max(i for i in theirs) < n_tok
  # --image_token_id: another reserved row, the same ids around it.
  ckpt = os.path.join(root, f"ckpt-{variant}-id")
  export.from_hf(src, ckpt, image_token_id=n_tok + 3)
  other = load_lib.load_checkpoint(ckpt)
  ids = other.encode([{"from": "human", "value": "<image>\nWhat?"}])
  base = im.encode([{"from": "human", "value": "<image>\nWhat?"}])
  np.testing.assert_array_equal(np.where(base == n_tok, n_tok + 3, base), ids)


def test_tiktoken_tokenizer_matches_the_original_class(root):
  """Arcade100k through the tiktoken package: ids, offsets, decode, special roles."""
  from moe_vlm.data import tokenizer as tokenizer_lib

  _, src, _ = built("StableLM-1.6B-4e", root)
  tok = tokenizer_lib.load_tokenizer(src)
  ref = TiktokenReference(src)
  for text in PROMPTS + CORPUS[:3]:
    assert tok(text, add_special_tokens=False)["input_ids"] == ref(text).input_ids
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if unicodedata.normalize("NFC", text) == text:
      assert "".join(text[s:e] for s, e in enc["offset_mapping"]) == text
    assert tok.decode(enc["input_ids"]) == unicodedata.normalize("NFC", text)
  assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (100257, 100257, 100280)
  assert len(tok) == 100289 and tok.decode([100257, 100], skip_special_tokens=True) == "\x64"
  # Training's <image> takes the reserved row, which the encoder never produces.
  tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
  assert tok.convert_tokens_to_ids("<image>") == 100289
  assert 100289 not in tok("<image> text")["input_ids"]


# --------------------------------------------------------------------- 4. refusals


def test_refusals(root, tmp_path):
  _, src, n_tok = built("Phi2-2.7B-4e", root)
  import shutil
  bad = str(tmp_path / "MoE-LLaVA-Phi2-unknown-tower")
  shutil.copytree(src, bad)
  config = json.load(open(os.path.join(bad, "config.json")))
  _json(os.path.join(bad, "config.json"), dict(config, mm_image_tower="laion/some-tower"))
  with pytest.raises(ConversionError, match="--image_tower DIR"):
    export.import_vlm(bad)
  # No spare embedding row past the tokenizer: the id must be given.
  _json(os.path.join(bad, "config.json"), dict(config, vocab_size=n_tok))
  with pytest.raises(ConversionError, match="--image_token_id"):
    export.import_vlm(bad)
  with pytest.raises(ConversionError, match="outside"):
    export.import_vlm(bad, image_token_id=n_tok)
  # A family MoE-LLaVA has classes for but we do not read.
  _json(os.path.join(bad, "config.json"), dict(config, model_type="moe_llava_minicpm"))
  with pytest.raises(ConversionError, match="'minicpm' is not supported"):
    export.import_vlm(bad)
