"""Parity of the HF importer/exporter (moe_vlm.convert.hf, keymap) with transformers.

Every reference is a tiny random transformers PyTorch model (fp32, eval, no_grad), built
once per module. Checked here:
1. logits of each supported decoder family (and right-padded batches) vs HF;
2. CLIP / SigLIP hidden states (all of them, and `features(-2)`), also from
   `vision_model.`-prefixed checkpoints;
3. whole LLaVA models (CLIP+Llama, SigLIP+Qwen2 "full", CLIP+Qwen2-MoE), with a batch that
   mixes an image row and a text-only row;
4. safetensors directories via `import_pretrained`, and refusal of pickles;
5. strict loading (missing / extra / mis-shaped tensors);
6. bit-exact export round trips, including MoE-LLaVA's DeepSpeed expert layout;
7. config errors.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from moe_vlm.convert import hf, keymap  # noqa: E402
from moe_vlm.models.config import ConfigError  # noqa: E402
from moe_vlm.models.llm import DecoderLM  # noqa: E402
from moe_vlm.models.vision import VisionEncoder  # noqa: E402
from moe_vlm.models.vlm import VLM  # noqa: E402

transformers.logging.set_verbosity_error()

# Qwen2-MoE builds a size-0 shared expert (shared_expert_intermediate_size=0).
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

TOL = 1e-4
VOCAB = 100
IMAGE_TOKEN = 99  # last id of the vocabulary; random text ids stay below it
SEQ = 12

# ------------------------------------------------------------------------ helpers


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Replaces HF's (partly zero / empty) init by O(0.1) weights and ~1 norm scales."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.numel() == 0:
        continue
      is_norm_scale = (p.ndim == 1 and name.endswith("weight")
                       and ("norm" in name or "layrnorm" in name))
      if is_norm_scale:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _maxdiff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _params(model: nnx.Module) -> dict[str, np.ndarray]:
  return {k: np.asarray(v[...]) for k, v in hf.flat_params(model).items()}


def _text_ids(seed: int, shape=(2, SEQ)) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, IMAGE_TOKEN, size=shape).astype(np.int64)


# ------------------------------------------------------------------ text families

_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)

TEXT_CASES = {
    # GQA (4 query heads, 2 kv heads), untied lm_head.
    "llama": lambda: transformers.LlamaConfig(
        **_TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # Non-default theta and head_dim (16) != hidden / heads (8).
    "llama_theta_headdim": lambda: transformers.LlamaConfig(
        **_TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_theta=500.0, tie_word_embeddings=False),
    # qkv bias, GQA, tied embeddings.
    "qwen2": lambda: transformers.Qwen2Config(
        **_TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # partial rotary 0.5 (default), parallel residual, biases everywhere incl. lm_head.
    "phi": lambda: transformers.PhiConfig(**_TINY, num_attention_heads=4),
    # partial rotary 0.25 of head_dim 16, qkv bias, GQA 2:1.
    "stablelm": lambda: transformers.StableLmConfig(
        **_TINY, num_attention_heads=2, num_key_value_heads=1, use_qkv_bias=True),
    "stablelm_parallel": lambda: transformers.StableLmConfig(
        **_TINY, num_attention_heads=2, num_key_value_heads=1, use_qkv_bias=True,
        use_parallel_residual=True),
    # 4 experts, top-2, no shared expert; layers 0 and 2 MoE, layer 1 dense. The expert
    # size (24) differs from hidden (32) so a transposed gate_up split cannot pass.
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **{**_TINY, "num_hidden_layers": 3}, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=0, norm_topk_prob=True, mlp_only_layers=[1],
        tie_word_embeddings=False),
}


@dataclasses.dataclass
class Case:
  hf_config: object
  hf_model: torch.nn.Module
  state: dict[str, np.ndarray]
  model: nnx.Module


@functools.lru_cache(maxsize=None)
def text_case(name: str) -> Case:
  config = TEXT_CASES[name]()
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
  _randomize(hf_model, seed=sum(map(ord, name)))
  state = _state(hf_model)
  return Case(config, hf_model, state, hf.import_text(state, config))


@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_text_logits_match_hf(name):
  case = text_case(name)
  ids = _text_ids(1)
  with torch.no_grad():
    ref = case.hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
  logits, aux = case.model(jnp.asarray(ids))
  assert logits.shape == (2, SEQ, VOCAB) and logits.dtype == jnp.float32
  assert _maxdiff(logits, ref) < TOL
  if name == "qwen2_moe":
    assert case.model.cfg.moe_layers() == (0, 2)
    assert aux["layers/tokens_per_expert"].shape == (2, 4)
    # Every token is routed to top_k=2 experts in each MoE layer.
    np.testing.assert_array_equal(np.asarray(aux["layers/tokens_per_expert"]).sum(-1),
                                  [2 * ids.size] * 2)
  else:
    assert float(aux["aux_loss"]) == 0.0


def test_text_config_translation():
  """The switches each family must set (a silent default would still be wrong)."""
  cfg = {n: text_case(n).model.cfg for n in TEXT_CASES}
  assert cfg["llama"].num_kv_heads == 2 and not cfg["llama"].tie_embeddings
  assert cfg["llama_theta_headdim"].dim_per_head == 16
  assert cfg["llama_theta_headdim"].rope_theta == 500.0
  assert cfg["qwen2"].qkv_bias and cfg["qwen2"].tie_embeddings
  assert cfg["phi"].rotary_dim == 4 and cfg["phi"].parallel_residual
  assert cfg["phi"].lm_head_bias and cfg["phi"].norm == "layer"
  assert cfg["stablelm"].rotary_dim == 4 and not cfg["stablelm"].parallel_residual
  assert cfg["stablelm_parallel"].parallel_residual
  moe = cfg["qwen2_moe"].moe
  assert (moe.num_experts, moe.top_k, moe.renormalize) == (4, 2, True)
  assert moe.expert_intermediate_size == 24 and moe.dispatch == "dropless"


@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_text_right_padded_logits_match_hf(name):
  case = text_case(name)
  ids = _text_ids(2)
  lengths = (SEQ, 7)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    mask[row, :n] = 1
  with torch.no_grad():
    ref = case.hf_model(input_ids=torch.from_numpy(ids),
                        attention_mask=torch.from_numpy(mask)).logits.numpy()
  logits, _ = case.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  logits = np.asarray(logits)
  for row, n in enumerate(lengths):
    assert _maxdiff(logits[row, :n], ref[row, :n]) < TOL, row
  # The padding's token ids must not leak into the valid positions.
  other = ids.copy()
  other[1, lengths[1]:] = (other[1, lengths[1]:] + 5) % IMAGE_TOKEN
  logits2, _ = case.model(jnp.asarray(other), attention_mask=jnp.asarray(mask))
  assert _maxdiff(np.asarray(logits2)[1, :lengths[1]], logits[1, :lengths[1]]) < 1e-6


@pytest.mark.parametrize("name", ["llama", "phi", "qwen2_moe"])
def test_text_left_padded_logits_match_hf(name):
  """Left padding exercises the key mask (causality alone hides right padding) and the
  position ids that skip the padding; HF gets the same positions explicitly."""
  case = text_case(name)
  ids = _text_ids(3)
  mask = np.ones_like(ids)
  mask[1, :5] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    ref = case.hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions)).logits.numpy()
  logits, _ = case.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  valid = mask.astype(bool)
  assert _maxdiff(np.asarray(logits)[valid], ref[valid]) < TOL
  # Row 1 equals the same text without its padding.
  with torch.no_grad():
    unpadded = case.hf_model(input_ids=torch.from_numpy(ids[1:, 5:])).logits.numpy()
  assert _maxdiff(np.asarray(logits)[1, 5:], unpadded[0]) < TOL


def test_import_accepts_torch_and_bf16_tensors():
  """State dicts of torch tensors work; bf16 tensors are read without rounding errors."""
  case = text_case("llama")
  torch_state = case.hf_model.state_dict()
  model = hf.import_text(torch_state, case.hf_config)
  for k, v in _params(model).items():
    np.testing.assert_array_equal(v, _params(case.model)[k])
  bf16 = {k: v.to(torch.bfloat16) for k, v in torch_state.items()}
  model = hf.import_text(bf16, case.hf_config)
  got = np.asarray(model.embed[...])
  want = bf16["model.embed_tokens.weight"].float().numpy()
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------- vision

_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=28,
               patch_size=14)

VISION_CASES = {
    "clip": lambda: transformers.CLIPVisionConfig(**_VISION, num_hidden_layers=3),
    "siglip": lambda: transformers.SiglipVisionConfig(**_VISION, num_hidden_layers=3),
}


@functools.lru_cache(maxsize=None)
def vision_case(name: str) -> Case:
  config = VISION_CASES[name]()
  torch.manual_seed(0)
  cls = transformers.CLIPVisionModel if name == "clip" else transformers.SiglipVisionModel
  hf_model = cls(config).eval()
  _randomize(hf_model, seed=sum(map(ord, name)))
  state = _state(hf_model)
  return Case(config, hf_model, state, hf.import_vision(state, config))


def _pixels(seed: int, batch: int = 2) -> np.ndarray:
  """NCHW float32 pixels (torch layout)."""
  return np.random.RandomState(seed).randn(batch, 3, 28, 28).astype(np.float32)


def _nhwc(pixels_nchw: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))


def _hf_hidden(hf_model, pixels_nchw) -> list[np.ndarray]:
  with torch.no_grad():
    out = hf_model(pixel_values=torch.from_numpy(pixels_nchw), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("name", list(VISION_CASES))
def test_vision_hidden_states_match_hf(name):
  case = vision_case(name)
  px = _pixels(3)
  ref = _hf_hidden(case.hf_model, px)
  n_tokens = 5 if name == "clip" else 4  # CLS + 2x2 patches, or patches only
  assert len(ref) == 4
  ours = case.model(_nhwc(px))
  assert len(ours) == len(ref)
  for i, (a, b) in enumerate(zip(ours, ref)):
    assert a.shape == (2, n_tokens, 32)
    assert _maxdiff(a, b) < TOL, i
  feats = case.model.features(_nhwc(px), -2)
  assert _maxdiff(feats, ref[-2]) < TOL
  # -2 is not the last state: a features() that ignored `layer` would fail here.
  assert _maxdiff(ref[-2], ref[-1]) > 1e-2


@pytest.mark.parametrize("name", list(VISION_CASES))
def test_vision_loads_vision_model_prefixed_checkpoint(name):
  case = vision_case(name)
  prefixed = {f"vision_model.{k}": v for k, v in case.state.items()}
  model = hf.import_vision(prefixed, case.hf_config)
  for k, v in _params(case.model).items():
    np.testing.assert_array_equal(_params(model)[k], v)
  px = _pixels(4)
  assert _maxdiff(model.features(_nhwc(px), -2), _hf_hidden(case.hf_model, px)[-2]) < TOL


# -------------------------------------------------------------------------- LLaVA

LLAVA_CASES = {
    "clip_llama": ("clip", "llama", "default"),
    "siglip_qwen2_full": ("siglip", "qwen2", "full"),
    "clip_qwen2_moe": ("clip", "qwen2_moe", "default"),
}


@functools.lru_cache(maxsize=None)
def llava_case(name: str) -> Case:
  vision, text, strategy = LLAVA_CASES[name]
  vc = VISION_CASES[vision]()
  vc.num_hidden_layers = 2
  config = transformers.LlavaConfig(
      vision_config=vc, text_config=TEXT_CASES[text](), image_token_index=IMAGE_TOKEN,
      vision_feature_layer=-2, vision_feature_select_strategy=strategy,
      projector_hidden_act="gelu")
  torch.manual_seed(0)
  hf_model = transformers.LlavaForConditionalGeneration(config).eval()
  _randomize(hf_model, seed=sum(map(ord, name)))
  state = _state(hf_model)
  return Case(config, hf_model, state, hf.import_llava(state, config))


def _llava_ids(seed: int, image_rows=(True, True)) -> np.ndarray:
  ids = _text_ids(seed, (len(image_rows), SEQ))
  for row, has_image in enumerate(image_rows):
    if has_image:
      start = 1 + 2 * row  # images at different offsets per row
      ids[row, start:start + 4] = IMAGE_TOKEN
  return ids


@pytest.mark.parametrize("name", list(LLAVA_CASES))
def test_llava_logits_match_hf(name):
  case = llava_case(name)
  assert case.model.cfg.num_image_tokens == 4
  ids, px = _llava_ids(5), _pixels(6)
  mask = np.ones_like(ids)
  with torch.no_grad():
    ref = case.hf_model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px),
                        attention_mask=torch.from_numpy(mask)).logits.numpy()
  logits, aux = case.model(jnp.asarray(ids), _nhwc(px), jnp.asarray(mask))
  assert _maxdiff(logits, ref) < TOL
  if name == "clip_qwen2_moe":
    # 8 image tokens, each routed to 2 experts, in each of the 2 MoE layers.
    np.testing.assert_array_equal(
        np.asarray(aux["layers/tokens_per_expert_image"]).sum(-1), [16, 16])


@pytest.mark.parametrize("name", list(LLAVA_CASES))
def test_llava_image_row_and_text_only_row_match_hf(name):
  case = llava_case(name)
  ids, px = _llava_ids(7, image_rows=(True, False)), _pixels(8)
  with torch.no_grad():
    # HF takes only the images that exist: one, for row 0.
    ref = case.hf_model(input_ids=torch.from_numpy(ids),
                        pixel_values=torch.from_numpy(px[:1])).logits.numpy()
  # Ours takes pixel_values row-aligned; row 1's pixels are a dummy.
  logits, _ = case.model(jnp.asarray(ids), _nhwc(px), jnp.ones(ids.shape, jnp.int32))
  for row in range(2):
    assert _maxdiff(np.asarray(logits)[row], ref[row]) < TOL, row
  with torch.no_grad():
    ref_text = case.hf_model(input_ids=torch.from_numpy(ids[1:])).logits.numpy()
  assert _maxdiff(np.asarray(logits)[1], ref_text[0]) < TOL


# ------------------------------------------------------------ safetensors on disk


def _save(hf_model, path):
  hf_model.save_pretrained(str(path))
  files = os.listdir(path)
  assert any(f.endswith(".safetensors") for f in files), files
  assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files), files


@pytest.mark.parametrize("name", ["llama", "phi"])
def test_import_pretrained_text_dir(tmp_path, name):
  case = text_case(name)
  _save(case.hf_model, tmp_path)
  model, cfg = hf.import_pretrained(str(tmp_path))
  assert cfg == case.model.cfg
  ids = _text_ids(9)
  with torch.no_grad():
    ref = case.hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
  assert _maxdiff(model(jnp.asarray(ids))[0], ref) < TOL


def test_import_pretrained_vision_dir(tmp_path):
  case = vision_case("siglip")
  _save(case.hf_model, tmp_path)
  model, _ = hf.import_pretrained(str(tmp_path))
  assert isinstance(model, VisionEncoder)
  px = _pixels(10)
  assert _maxdiff(model.features(_nhwc(px), -2), _hf_hidden(case.hf_model, px)[-2]) < TOL


def test_import_pretrained_qwen2_moe_dir(tmp_path):
  case = text_case("qwen2_moe")
  _save(case.hf_model, tmp_path)
  model, _ = hf.import_pretrained(str(tmp_path))
  ids = _text_ids(11)
  with torch.no_grad():
    ref = case.hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
  assert _maxdiff(model(jnp.asarray(ids))[0], ref) < TOL


def test_import_pretrained_llava_dir(tmp_path):
  case = llava_case("clip_llama")
  _save(case.hf_model, tmp_path)
  model, _ = hf.import_pretrained(str(tmp_path))
  ids, px = _llava_ids(12), _pixels(13)
  with torch.no_grad():
    ref = case.hf_model(input_ids=torch.from_numpy(ids),
                        pixel_values=torch.from_numpy(px)).logits.numpy()
  assert _maxdiff(model(jnp.asarray(ids), _nhwc(px))[0], ref) < TOL


class _Trap:
  """Unpickling this creates a sentinel file: proof that a pickle was loaded."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_pickle_only_dir_is_refused_without_unpickling(tmp_path, monkeypatch):
  text_case("llama").hf_config.save_pretrained(str(tmp_path))
  sentinel = tmp_path / "UNPICKLED"
  with open(tmp_path / "pytorch_model.bin", "wb") as f:
    pickle.dump({"model.embed_tokens.weight": _Trap(str(sentinel))}, f)

  def no_unpickling(*args, **kwargs):
    raise AssertionError("the importer tried to unpickle a checkpoint")

  monkeypatch.setattr(torch, "load", no_unpickling)
  monkeypatch.setattr(pickle, "load", no_unpickling)
  monkeypatch.setattr(pickle, "loads", no_unpickling)
  with pytest.raises(hf.ConversionError, match=r"(?i)safetensors") as err:
    hf.import_pretrained(str(tmp_path))
  assert "pytorch_model.bin" in str(err.value)
  assert "pickle" in str(err.value).lower()
  assert not sentinel.exists()


# ----------------------------------------------------------------- strict loading


def _fresh_llama():
  case = text_case("llama")
  return case, dict(case.state), keymap.text_rules(case.model.cfg)


def test_load_missing_tensor_names_it():
  case, state, rules = _fresh_llama()
  del state["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(hf.ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.import_text(state, case.hf_config)


def test_load_extra_tensor_names_it():
  case, state, rules = _fresh_llama()
  state["model.layers.0.self_attn.rotary_emb.inv_freq_typo"] = np.zeros(4, np.float32)
  with pytest.raises(hf.ConversionError, match=r"rotary_emb\.inv_freq_typo"):
    hf.import_text(state, case.hf_config)


def test_load_misshaped_tensor_names_key_and_shapes():
  case, state, rules = _fresh_llama()
  state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((12, 32), np.float32)
  with pytest.raises(hf.ConversionError) as err:
    hf.import_text(state, case.hf_config)
  msg = str(err.value)
  assert "model.layers.0.self_attn.k_proj.weight" in msg
  assert "shape" in msg and "(32, 12)" in msg and "(32, 16)" in msg


def test_load_weights_fails_before_writing_anything():
  """A missing tensor is reported before any parameter is overwritten."""
  case, state, rules = _fresh_llama()
  model = DecoderLM(case.model.cfg, rngs=nnx.Rngs(3))
  before = _params(model)
  del state["model.norm.weight"]
  with pytest.raises(hf.ConversionError, match=r"model\.norm\.weight"):
    hf.load_weights(model, state, rules)
  for k, v in _params(model).items():
    np.testing.assert_array_equal(v, before[k])


def test_load_ignore_prefixes_allows_known_extras():
  case, state, rules = _fresh_llama()
  state["extra.head.weight"] = np.zeros(3, np.float32)
  model = DecoderLM(case.model.cfg, rngs=nnx.Rngs(3))
  with pytest.raises(hf.ConversionError, match=r"extra\.head\.weight"):
    hf.load_weights(model, state, rules)
  hf.load_weights(model, state, rules, ignore_prefixes=["extra."])
  for k, v in _params(case.model).items():
    np.testing.assert_array_equal(_params(model)[k], v)


# ------------------------------------------------------------ export round trips


def _fresh(model):
  if isinstance(model, DecoderLM):
    return DecoderLM(model.cfg, rngs=nnx.Rngs(7))
  if isinstance(model, VisionEncoder):
    return VisionEncoder(model.cfg, rngs=nnx.Rngs(7))
  return VLM(model.cfg, rngs=nnx.Rngs(7))


def _ignorable(key: str, tied: bool) -> bool:
  return (".shared_expert" in key or key.startswith(("head.", "model.vision_tower.head."))
          or (tied and key == "lm_head.weight"))


def _round_trip(case: Case, rules, tied: bool):
  exported = hf.export_weights(case.model, rules)
  assert set(exported) == keymap.hf_keys(rules)
  uncovered = sorted(k for k in case.state if k not in exported and not _ignorable(k, tied))
  assert not uncovered, uncovered
  for k, v in exported.items():
    assert isinstance(v, np.ndarray), k
    assert v.shape == case.state[k].shape and v.dtype == case.state[k].dtype, k
    assert np.array_equal(v, case.state[k]), k
  fresh = _fresh(case.model)
  original = _params(case.model)
  assert any(not np.array_equal(v, original[k]) for k, v in _params(fresh).items())
  hf.load_weights(fresh, exported, rules)
  got = _params(fresh)
  assert set(got) == set(original)
  for k, v in original.items():
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi", "stablelm_parallel", "qwen2_moe"])
def test_export_text_round_trip_is_exact(name):
  case = text_case(name)
  _round_trip(case, keymap.text_rules(case.model.cfg), case.model.cfg.tie_embeddings)


def test_export_vision_round_trip_is_exact():
  case = vision_case("clip")
  _round_trip(case, keymap.vision_rules(case.model.cfg), tied=False)


@pytest.mark.parametrize("name", ["clip_llama", "clip_qwen2_moe"])
def test_export_llava_round_trip_is_exact(name):
  case = llava_case(name)
  _round_trip(case, keymap.llava_rules(case.model.cfg), case.model.cfg.text.tie_embeddings)


def test_moe_llava_layout_export_and_reimport():
  case = text_case("qwen2_moe")
  cfg = case.model.cfg
  rules = keymap.text_rules(cfg, moe_layout="moe_llava")
  exported = hf.export_weights(case.model, rules)
  d = "model.layers.0.mlp.deepspeed_moe"
  assert exported[f"{d}.gate.wg.weight"].shape == (4, 32)
  for i in range(4):
    for proj, shape in (("gate_proj", (24, 32)), ("up_proj", (24, 32)),
                        ("down_proj", (32, 24))):
      assert exported[f"{d}.experts.deepspeed_experts.{i}.{proj}.weight"].shape == shape
  assert "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.gate_proj.weight" \
      in exported
  assert not any(k.startswith("model.layers.1.mlp.deepspeed_moe") for k in exported)
  assert "model.layers.1.mlp.gate_proj.weight" in exported
  assert not any("gate_up_proj" in k for k in exported)
  # Same numbers as the fused HF tensors: gate rows first, then up rows.
  fused = case.state["model.layers.0.mlp.experts.gate_up_proj"]
  down = case.state["model.layers.0.mlp.experts.down_proj"]
  np.testing.assert_array_equal(exported[f"{d}.gate.wg.weight"],
                                case.state["model.layers.0.mlp.gate.weight"])
  for i in range(4):
    e = f"{d}.experts.deepspeed_experts.{i}"
    np.testing.assert_array_equal(exported[f"{e}.gate_proj.weight"], fused[i, :24])
    np.testing.assert_array_equal(exported[f"{e}.up_proj.weight"], fused[i, 24:])
    np.testing.assert_array_equal(exported[f"{e}.down_proj.weight"], down[i])
  model = hf.import_text(exported, case.hf_config, moe_layout="moe_llava")
  for k, v in _params(case.model).items():
    np.testing.assert_array_equal(_params(model)[k], v)
  # A checkpoint in the other layout is refused, naming what is missing.
  with pytest.raises(hf.ConversionError, match="deepspeed_moe"):
    hf.import_text(case.state, case.hf_config, moe_layout="moe_llava")


# ------------------------------------------------------------------ config errors


def test_unsupported_rope_scaling_raises():
  config = transformers.LlamaConfig(
      **_TINY, num_attention_heads=4,
      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
  with pytest.raises(ConfigError, match="linear"):
    hf.text_config_from_hf(config)


def test_qwen2_moe_shared_expert_raises():
  config = transformers.Qwen2MoeConfig(
      **_TINY, num_attention_heads=4, num_experts=4, num_experts_per_tok=2,
      moe_intermediate_size=24, shared_expert_intermediate_size=16)
  with pytest.raises(ConfigError, match="shared_expert_intermediate_size"):
    hf.text_config_from_hf(config)


@pytest.mark.parametrize("config_cls", [
    transformers.GemmaConfig,
    transformers.GPT2Config,
])
def test_unknown_text_family_raises_naming_supported(config_cls):
  with pytest.raises(ConfigError) as err:
    hf.text_config_from_hf(config_cls())
  msg = str(err.value)
  assert config_cls().model_type in msg
  for family in ("llama", "qwen2", "qwen2_moe", "phi", "stablelm"):
    assert family in msg


def test_siglip_image_size_not_a_multiple_of_the_patch():
  """siglip-so400m-patch14-384 style: 384 px / 14 px patches; the conv drops the rest."""
  config = transformers.SiglipVisionConfig(**dict(_VISION, image_size=32),
                                           num_hidden_layers=2)
  torch.manual_seed(0)
  hf_model = transformers.SiglipVisionModel(config).eval()
  _randomize(hf_model, seed=7)
  ours = hf.import_vision(_state(hf_model), config)
  assert ours.cfg.num_patches == 4
  px = np.random.RandomState(5).randn(2, 3, 32, 32).astype(np.float32)
  ref = _hf_hidden(hf_model, px)
  got = ours(_nhwc(px))
  assert got[-1].shape == (2, 4, 32)
  for a, b in zip(got, ref):
    assert _maxdiff(a, b) < TOL
