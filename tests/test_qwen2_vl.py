"""Qwen2-VL as a model family, against transformers' `Qwen2VLForConditionalGeneration`.

Tiny random PyTorch reference (fp32, eval, no_grad), built once: hidden 32, 2 layers,
patches of 14 px merged 2x2, a budget of 24 patches (max_pixels = 56 x 84). Checked:
1. vision tower + patch merger per image, on padded patch budgets (padding changes
   nothing);
2. M-RoPE positions (`rope_index`) vs `get_rope_index` for image + text rows, left and
   right padding, two images in a row, text-only rows;
3. whole-model logits (image rows of different sizes, a text-only row, right padding);
4. greedy generation with our KV cache vs transformers' generate (left-padded batch);
5. import (in-memory and on-disk names), export and a bit-exact round trip;
6. the image processor (`smart_resize`, min/max pixels, patch layout) vs transformers';
7. a train step on a Qwen2-VL config: finite loss, sharded == unsharded;
8. config errors name their field.
"""

from __future__ import annotations

import dataclasses
import functools
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from moe_vlm.convert import hf, keymap  # noqa: E402
from moe_vlm.models import qwen2_vl  # noqa: E402
from moe_vlm.models.config import ConfigError, TextConfig, VisionConfig, VLMConfig  # noqa: E402
from moe_vlm.models.vlm import VLM, ImageTokenError  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-4
VOCAB = 100
IMAGE = 99
MERGE = 2
MAX_PIXELS = 56 * 84  # 24 patches of 14 px: the budget every image is padded to
GRIDS = {"wide": (1, 4, 6), "square": (1, 4, 4), "small": (1, 2, 2)}


def _hf_config(tie: bool = False) -> transformers.Qwen2VLConfig:
  return transformers.Qwen2VLConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": [2, 1, 1]}),
      vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                         patch_size=14, spatial_merge_size=MERGE, temporal_patch_size=2),
      image_token_id=IMAGE, video_token_id=98, vision_start_token_id=97,
      vision_end_token_id=96, tie_word_embeddings=tie)


@dataclasses.dataclass
class Case:
  hf_model: torch.nn.Module
  state: dict[str, np.ndarray]
  model: VLM


@functools.lru_cache(maxsize=None)
def case(tie: bool = False) -> Case:
  torch.manual_seed(0)
  hf_model = transformers.Qwen2VLForConditionalGeneration(_hf_config(tie)).eval()
  gen = torch.Generator().manual_seed(1 + tie)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      scale = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight",
                                    "layernorm.weight", "ln_q.weight")) else 0.0
      p.copy_(scale + 0.1 * torch.randn(p.shape, generator=gen))
  state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
  model = hf.import_qwen2_vl(state, hf_model.config, max_pixels=MAX_PIXELS)
  return Case(hf_model, state, model)


def _maxdiff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _patches(grids, seed: int, budget: int = 24, fill: float = 0.0):
  """Random patches per image: (flat [sum t*h*w, 1176] for HF, padded [N, budget, 1176])."""
  rng = np.random.RandomState(seed)
  real = [rng.randn(int(np.prod(g)), 3 * 2 * 14 * 14).astype(np.float32) for g in grids]
  padded = np.full((len(grids), budget, real[0].shape[1]), fill, np.float32)
  for i, r in enumerate(real):
    padded[i, :len(r)] = r
  return np.concatenate(real), padded


# ------------------------------------------------------------------- vision tower


def test_config_translation():
  cfg = case().model.cfg
  assert cfg.vision.native and cfg.projector == "qwen2_vl_merger"
  assert cfg.vision.max_patches == 24 and cfg.num_image_tokens == 6
  assert (cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.norm_eps) == (32, 64, 1e-6)
  assert cfg.text.rope_type == "mrope" and cfg.text.mrope_section == (2, 1, 1)
  assert cfg.text.qkv_bias and not cfg.text.o_bias and not cfg.text.tie_embeddings
  assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "full"


def test_vision_tower_and_merger_match_hf():
  c = case()
  grids = np.array(list(GRIDS.values()))
  flat, padded = _patches(grids, seed=0)
  with torch.no_grad():
    out = c.hf_model.model.visual(torch.from_numpy(flat), grid_thw=torch.from_numpy(grids))
  ref_hidden, ref_merged = out.last_hidden_state.numpy(), out.pooler_output.numpy()
  hidden = np.asarray(c.model.vision.features(jnp.asarray(padded), grids, -1))
  merged = np.asarray(c.model.projector(jnp.asarray(hidden)))
  n, done, done_m = grids.prod(-1), 0, 0
  for i, k in enumerate(n):
    assert _maxdiff(hidden[i, :k], ref_hidden[done:done + k]) < TOL, i
    assert _maxdiff(merged[i, :k // 4], ref_merged[done_m:done_m + k // 4]) < TOL, i
    done, done_m = done + k, done_m + k // 4
  # Whatever the padding holds, the real patches' results are the same.
  _, noisy = _patches(grids, seed=0, fill=3.0)
  again = np.asarray(c.model.vision.features(jnp.asarray(noisy), grids, -1))
  for i, k in enumerate(n):
    assert _maxdiff(again[i, :k], hidden[i, :k]) < 1e-6


def test_patch_positions_follow_merge_groups():
  row, col, seg = qwen2_vl.patch_positions(jnp.asarray([[1, 2, 4]]), 12, 2)
  # Merge groups of 2x2 are consecutive: (0,0) (0,1) (1,0) (1,1), then (0,2) ...
  assert np.asarray(row)[0, :8].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
  assert np.asarray(col)[0, :8].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
  assert np.asarray(seg)[0].tolist() == [1] * 8 + [0] * 4


# ------------------------------------------------------------------------- M-RoPE


def _prompt(parts, length: int, left: bool = False):
  """parts: ints (text tokens) or grids (an image's merged tokens) -> ids, mask."""
  ids = []
  rng = np.random.RandomState(len(parts) + length)
  for p in parts:
    if isinstance(p, int):
      ids += rng.randint(0, 90, size=p).tolist()
    else:
      ids += [IMAGE] * qwen2_vl.merged_tokens(p, MERGE)
  assert len(ids) <= length
  pad = [0] * (length - len(ids))
  mask = [0] * len(pad) + [1] * len(ids) if left else [1] * len(ids) + [0] * len(pad)
  return (pad + ids if left else ids + pad), mask


def _hf_rope_index(ids, mask, grids):
  ids, mask = torch.tensor(ids), torch.tensor(mask)
  types = (ids == IMAGE).int()
  flat = [g for row in grids for g in row if np.prod(g)]
  pos, delta = case().hf_model.model.get_rope_index(
      ids, mm_token_type_ids=types,
      image_grid_thw=torch.tensor(flat) if flat else None, attention_mask=mask)
  return pos.numpy(), delta.numpy()[:, 0]


@pytest.mark.parametrize("left", [False, True])
def test_rope_index_matches_hf(left):
  rows = [[3, GRIDS["wide"], 4], [GRIDS["small"], 2, GRIDS["square"], 1], [7],
          [1, GRIDS["small"]]]
  prompts = [_prompt(r, 20, left) for r in rows]
  ids, mask = np.array([p[0] for p in prompts]), np.array([p[1] for p in prompts])
  grids = [[g for g in r if not isinstance(g, int)] for r in rows]
  packed = np.zeros((len(rows), 2, 3), np.int32)
  for b, gs in enumerate(grids):
    if gs:
      packed[b, :len(gs)] = gs
  ref, ref_delta = _hf_rope_index(ids, mask, grids)
  pos, delta = qwen2_vl.rope_index(jnp.asarray(ids == IMAGE), jnp.asarray(mask),
                                   jnp.asarray(packed), MERGE)
  np.testing.assert_array_equal(np.asarray(pos), ref)
  np.testing.assert_array_equal(np.asarray(delta), ref_delta)
  assert ref_delta[0] != 0  # the image really shifted the text after it


def test_rope_index_restarts_in_each_segment():
  a, _ = _prompt([2, GRIDS["small"], 3], 6)
  b, _ = _prompt([1, GRIDS["square"], 2], 7)
  ids = np.array([a + b + [0] * 3])
  seg = np.array([[1] * 6 + [2] * 7 + [0] * 3])
  grid = np.array([[GRIDS["small"], GRIDS["square"]]])
  pos, _ = qwen2_vl.rope_index(jnp.asarray(ids == IMAGE), jnp.asarray(seg > 0),
                               jnp.asarray(grid), MERGE, jnp.asarray(seg))
  alone_a, _ = qwen2_vl.rope_index(jnp.asarray(np.array([a]) == IMAGE), jnp.ones((1, 6)),
                                   jnp.asarray([GRIDS["small"]]), MERGE)
  alone_b, _ = qwen2_vl.rope_index(jnp.asarray(np.array([b]) == IMAGE), jnp.ones((1, 7)),
                                   jnp.asarray([GRIDS["square"]]), MERGE)
  np.testing.assert_array_equal(np.asarray(pos)[:, 0, :6], np.asarray(alone_a)[:, 0])
  np.testing.assert_array_equal(np.asarray(pos)[:, 0, 6:13], np.asarray(alone_b)[:, 0])


# -------------------------------------------------------------------- whole model


def _batch(rows, length: int, left: bool = False, seed: int = 3):
  """A model batch of rows (parts as in `_prompt`, at most one image each) plus what
  transformers takes for it."""
  prompts = [_prompt(r, length, left) for r in rows]
  ids, mask = np.array([p[0] for p in prompts]), np.array([p[1] for p in prompts])
  grids = np.zeros((len(rows), 3), np.int32)
  for b, r in enumerate(rows):
    for g in r:
      if not isinstance(g, int):
        grids[b] = g
  flat, padded = _patches([g if g.any() else (1, 2, 2) for g in grids], seed)
  keep = np.concatenate([np.full(int(np.prod(g if g.any() else (1, 2, 2))), g.any())
                         for g in grids]).astype(bool)
  hf_kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64)),
               pixel_values=torch.from_numpy(flat[keep]),
               image_grid_thw=torch.from_numpy(grids[grids.any(-1)]).long())
  ours = dict(input_ids=jnp.asarray(ids), pixel_values=jnp.asarray(padded),
              attention_mask=jnp.asarray(mask), image_grid_thw=jnp.asarray(grids))
  return ours, hf_kw, mask.astype(bool)


ROWS = [[3, GRIDS["wide"], 4], [2, GRIDS["square"], 5], [9], [1, GRIDS["small"], 2]]


def test_logits_match_hf():
  c = case()
  ours, hf_kw, valid = _batch(ROWS, 16)
  with torch.no_grad():
    ref = c.hf_model(**hf_kw).logits.numpy()
  logits, _ = c.model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"],
                      image_grid_thw=ours["image_grid_thw"])
  assert _maxdiff(np.asarray(logits)[valid], ref[valid]) < TOL


def test_logits_do_not_depend_on_the_patch_budget():
  """A larger max_pixels only adds padding patches: the real tokens' logits stay."""
  c = case()
  ours, _, valid = _batch(ROWS, 16)
  logits, _ = c.model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"],
                      image_grid_thw=ours["image_grid_thw"])
  big_cfg = dataclasses.replace(
      c.model.cfg, vision=dataclasses.replace(c.model.cfg.vision, max_pixels=56 * 56 * 3))
  big = hf.import_qwen2_vl(c.state, c.hf_model.config, max_pixels=56 * 56 * 3)
  assert big.cfg == big_cfg and big_cfg.vision.max_patches == 48
  px = np.zeros((4, 48, 1176), np.float32)
  px[:, :24] = np.asarray(ours["pixel_values"])
  logits2, _ = big(ours["input_ids"], jnp.asarray(px), ours["attention_mask"],
                   image_grid_thw=ours["image_grid_thw"])
  assert _maxdiff(np.asarray(logits2)[valid], np.asarray(logits)[valid]) < 1e-5


def test_image_token_count_must_match_the_grid():
  c = case()
  ours, _, _ = _batch(ROWS, 16)
  grid = np.asarray(ours["image_grid_thw"]).copy()
  grid[0] = (1, 4, 4)  # 4 merged tokens, but row 0 holds 6 image tokens
  with pytest.raises(ImageTokenError, match="row 0 has 6 image tokens"):
    c.model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"],
            image_grid_thw=jnp.asarray(grid))


def test_tied_embeddings_match_hf():
  c = case(tie=True)
  assert c.model.cfg.text.tie_embeddings and c.model.llm.lm_head is None
  ours, hf_kw, valid = _batch(ROWS[:2], 16)
  with torch.no_grad():
    ref = c.hf_model(**hf_kw).logits.numpy()
  logits, _ = c.model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"],
                      image_grid_thw=ours["image_grid_thw"])
  assert _maxdiff(np.asarray(logits)[valid], ref[valid]) < TOL


# -------------------------------------------------------------------- conversion


def _params(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v[...]) for k, v in hf.flat_params(model).items()}


def test_export_round_trip_is_exact():
  c = case()
  exported = hf.export_weights(c.model, keymap.qwen2_vl_rules(c.model.cfg))
  assert set(exported) == set(c.state)
  for k, v in c.state.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_import_pretrained_dir_on_disk_names(tmp_path):
  """save_pretrained writes `model.*` / `visual.*` / `lm_head`; the budget comes from the
  directory's image processor."""
  c = case()
  c.hf_model.save_pretrained(tmp_path)
  transformers.Qwen2VLImageProcessor(max_pixels=MAX_PIXELS, min_pixels=28 * 28).save_pretrained(
      tmp_path)
  model, cfg = hf.import_pretrained(str(tmp_path))
  assert (cfg.vision.max_pixels, cfg.vision.min_pixels) == (MAX_PIXELS, 28 * 28)
  for k, v in _params(c.model).items():
    np.testing.assert_array_equal(_params(model)[k], v, err_msg=k)


def test_loading_is_strict():
  c = case()
  missing = {k: v for k, v in c.state.items() if "merger.mlp.2.bias" not in k}
  with pytest.raises(hf.ConversionError, match="merger.mlp.2.bias"):
    hf.import_qwen2_vl(missing, c.hf_model.config, max_pixels=MAX_PIXELS)
  extra = {**c.state, "model.visual.blocks.9.norm1.weight": np.ones(32, np.float32)}
  with pytest.raises(hf.ConversionError, match="blocks.9"):
    hf.import_qwen2_vl(extra, c.hf_model.config, max_pixels=MAX_PIXELS)


# ------------------------------------------------------------------------ configs


def _tiny(**vision) -> VLMConfig:
  return VLMConfig(
      vision=VisionConfig(variant="qwen2_vl", hidden_size=32, intermediate_size=64,
                          num_layers=1, num_heads=4, norm_eps=1e-6, max_pixels=MAX_PIXELS,
                          **vision),
      text=TextConfig(family="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2, qkv_bias=True,
                      rope_type="mrope", mrope_section=(2, 1, 1)),
      projector="qwen2_vl_merger", vision_feature_layer=-1,
      vision_feature_select_strategy="full", image_token_id=IMAGE)


@pytest.mark.parametrize("change, field", [
    (dict(projector="mlp2x_gelu"), "projector='mlp2x_gelu'"),
    (dict(vision_feature_select_strategy="default"), "vision_feature_select_strategy"),
    (dict(text=dict(mrope_section=(2, 2, 1))), "text.mrope_section"),
    (dict(text=dict(rope_type="yarn")), "text.rope_type"),
    (dict(vision=dict(max_pixels=100)), "vision.max_pixels"),
    (dict(vision=dict(min_pixels=10 ** 7)), "vision.min_pixels"),
    (dict(vision=dict(num_heads=16)), "head dim"),
])
def test_config_errors_name_the_field(change, field):
  cfg = _tiny()
  for block in ("text", "vision"):
    if block in change:
      change[block] = dataclasses.replace(getattr(cfg, block), **change[block])
  with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
    dataclasses.replace(cfg, **change).validate()


# --------------------------------------------------------------------- generation


def test_greedy_generation_matches_hf():
  """Left-padded prompts of different image sizes and a text-only row: our KV-cache
  decoding (M-RoPE delta carried in the cache) gives transformers' greedy tokens."""
  from moe_vlm.infer import generate as gen

  c = case()
  ours, hf_kw, _ = _batch(ROWS, 16, left=True)
  n = 6
  with torch.no_grad():
    ref = c.hf_model.generate(**hf_kw, max_new_tokens=n, do_sample=False, pad_token_id=0,
                              suppress_tokens=[IMAGE])[:, 16:].numpy()
  tokens, logits = gen.generate(c.model, ours["input_ids"], ours["attention_mask"],
                                ours["pixel_values"], image_grid_thw=ours["image_grid_thw"],
                                max_new_tokens=n, return_logits=True)
  np.testing.assert_array_equal(np.asarray(tokens), ref)
  # The first step's logits are the prompt's last: the same as a full forward pass.
  full, _ = c.model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"],
                    image_grid_thw=ours["image_grid_thw"])
  assert _maxdiff(np.asarray(logits)[:, 0], np.asarray(full)[:, -1]) < 1e-5


def test_kv_cache_decoding_equals_recomputation():
  """Each decoded token's logits equal a full forward pass over prompt + tokens so far."""
  from moe_vlm.infer import generate as gen

  c = case()
  ours, _, _ = _batch(ROWS[:2], 16, left=True)
  tokens, logits = gen.generate(c.model, ours["input_ids"], ours["attention_mask"],
                                ours["pixel_values"], image_grid_thw=ours["image_grid_thw"],
                                max_new_tokens=4, return_logits=True)
  ids = np.concatenate([np.asarray(ours["input_ids"]), np.asarray(tokens)[:, :3]], axis=1)
  mask = np.concatenate([np.asarray(ours["attention_mask"]), np.ones((2, 3), np.int32)], 1)
  full, _ = c.model(jnp.asarray(ids), ours["pixel_values"], jnp.asarray(mask),
                    image_grid_thw=ours["image_grid_thw"])
  assert _maxdiff(np.asarray(logits)[:, 1:], np.asarray(full)[:, 16:19]) < 1e-5


def test_sharded_generation_equals_single_device():
  """Weights on a (data 2, fsdp 2, model 2) mesh, the batch, grids and cache split over
  it: the same tokens and logits as one device."""
  from moe_vlm.infer import generate as gen
  from moe_vlm.parallel.mesh import make_mesh

  c = case()
  ours, _, _ = _batch(ROWS, 16, left=True)
  args = (ours["input_ids"], ours["attention_mask"], ours["pixel_values"])
  kw = dict(image_grid_thw=ours["image_grid_thw"], max_new_tokens=4, return_logits=True)
  want_tokens, want_logits = gen.generate(c.model, *args, **kw)
  mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
  sharded = gen.shard_model(c.model, mesh)
  assert len(sharded.vision.layers[0].attn.query.kernel[...].sharding.device_set) > 1
  tokens, logits = gen.generate(sharded, *(np.asarray(a) for a in args), mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_tokens))
  assert _maxdiff(logits, want_logits) < 1e-4


def test_export_directory_loads_in_transformers_and_back(tmp_path):
  """Our export is a Qwen2VLForConditionalGeneration directory: transformers loads it
  strictly and computes the same logits; importing it back is bit-exact, and its image
  processor carries the pixel budget."""
  from moe_vlm.convert import export

  c = case()
  assert export.resolve_layout(c.model.cfg) == "qwen2_vl"
  out = tmp_path / "export"
  assert export.export_vlm(c.model, str(out)) == "qwen2_vl"
  loaded, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info
  for k, v in loaded.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), c.state[k], err_msg=k)
  processor = transformers.AutoImageProcessor.from_pretrained(out)
  assert processor.size["longest_edge"] == MAX_PIXELS and processor.merge_size == MERGE
  back = export.import_vlm(str(out))
  assert back.cfg == c.model.cfg
  for k, v in _params(c.model).items():
    np.testing.assert_array_equal(_params(back)[k], v, err_msg=k)
  with pytest.raises(ConfigError, match="layout='qwen2_vl'"):
    export.resolve_layout(c.model.cfg, "llava")


# ---------------------------------------------------------------- image processor


@pytest.mark.parametrize("size", [(50, 70), (28, 300), (100, 100), (12, 20), (700, 90)])
def test_image_patches_match_transformers_processor(size):
  """smart_resize, min/max pixels, bicubic, CLIP mean/std and the patch layout equal
  transformers' Qwen2-VL processor; the patches fill the first t*h*w budget slots."""
  from PIL import Image

  from moe_vlm.data import images

  h, w = size
  pixels = np.random.RandomState(h * w).randint(0, 256, (h, w, 3)).astype(np.uint8)
  image = Image.fromarray(pixels)
  cfg = images.PatchConfig(min_pixels=28 * 28 * 2, max_pixels=56 * 56 * 4)
  ref = transformers.Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels,
                                              max_pixels=cfg.max_pixels)(image)
  patches, grid = images.qwen2_vl_patches(image, cfg)
  want_grid = np.asarray(ref["image_grid_thw"])[0]
  np.testing.assert_array_equal(grid, want_grid)
  n = int(np.prod(grid))
  assert patches.shape == (cfg.max_patches, cfg.patch_dim) == (64, 1176)
  assert _maxdiff(patches[:n], np.asarray(ref["pixel_values"])) < 1e-5
  assert not patches[n:].any()
  assert cfg.num_tokens(h, w) == n // 4
  assert images.image_size_of(image) == (h, w)


def test_extreme_aspect_ratio_is_cut_to_the_budget():
  """smart_resize keeps one merged patch on the short side even past max_pixels; we then
  shorten the long side so the image still fits the static patch budget."""
  from moe_vlm.data import images

  cfg = images.PatchConfig(min_pixels=28 * 28, max_pixels=56 * 56)
  assert images.smart_resize(28, 5000, 28, cfg.min_pixels, cfg.max_pixels) == (28, 728)
  assert cfg.grid(28, 5000) == (1, 2, 8) and cfg.max_patches == 16
  with pytest.raises(images.UnreadableImageError, match="aspect"):
    cfg.grid(10, 2500)


# ----------------------------------------------------------------------- training


def _train_batch(b: int = 8, seed: int = 0):
  rows = [ROWS[i % len(ROWS)] for i in range(b)]
  ours, _, valid = _batch(rows, 16, seed=seed)
  loss = (np.random.RandomState(seed).rand(*valid.shape) < 0.5) & valid
  return dict(input_ids=ours["input_ids"].astype(jnp.int32),
              attention_mask=ours["attention_mask"].astype(jnp.int32),
              loss_mask=jnp.asarray(loss, jnp.int32), pixel_values=ours["pixel_values"],
              image_grid_thw=ours["image_grid_thw"])


def test_train_step_runs_and_sharded_equals_unsharded():
  """One step of the whole model (tower, merger, LLM) on a Qwen2-VL batch: finite loss
  that depends on the images; a (data, fsdp, model) mesh gives the one-device step."""
  from moe_vlm.models.params import ParamCodec
  from moe_vlm.parallel import mesh as mesh_lib
  from moe_vlm.train import step as step_lib
  from moe_vlm.train.optim import OptimConfig

  model = VLM(_tiny(), rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  params = jax.tree.map(np.asarray, codec.flatten(model))
  assert codec.logical_axes["projector.linear_1.kernel"] == ("vision_embed", "mlp")
  cfg = step_lib.StepConfig(optim=OptimConfig(learning_rate=1e-3, warmup_ratio=0.0,
                                              total_steps=10))
  batch = _train_batch()
  assert "image_grid_thw" in step_lib.model_inputs(batch)
  trainable = lambda name: True

  def run(shape):
    mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)),
                              jax.devices()[:int(np.prod(shape))])
    tx = step_lib.make_optimizer(cfg.optim)
    shardings = step_lib.state_shardings(codec, trainable, mesh, tx)
    state = step_lib.init_state(params, trainable, tx, shardings)
    fn = step_lib.jit_train_step(step_lib.make_train_step(codec, cfg, tx), mesh, shardings,
                                 batch)
    state, metrics = fn(state, batch)
    return jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, metrics)

  ref_state, ref = run((1, 1, 1, 1))
  assert np.isfinite(ref["loss"]) and ref["loss"] > 0
  moved = np.abs(ref_state.params["vision.patch_kernel"] - params["vision.patch_kernel"]).max()
  assert moved > 1e-5  # the images reach the loss: the tower gets a gradient
  state, m = run((2, 2, 2, 1))
  np.testing.assert_allclose(m["loss"], ref["loss"], atol=1e-5)
  for k in ref_state.params:
    np.testing.assert_allclose(state.params[k], ref_state.params[k], atol=1e-5, err_msg=k)


# ------------------------------------------------------------------- data pipeline


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from moe_vlm.data import tokenizer as tokenizer_lib

  corpus = ["What colour is the square?", "The square is red.", "A blue circle."] * 20
  return tokenizer_lib.train_tokenizer(corpus, str(tmp_path_factory.mktemp("tok")),
                                       vocab_size=300)


def _preprocess_config(tokenizer, cfg: VLMConfig, max_length: int = 48):
  from moe_vlm.data import images, pipeline

  return pipeline.PreprocessConfig(
      template="plain", max_length=max_length, num_image_tokens=cfg.num_image_tokens,
      image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
      image_size=cfg.vision.image_size, patches=images.PatchConfig.of(cfg.vision))


def _record(tmp_path, name: str, size) -> dict:
  from PIL import Image

  path = tmp_path / f"{name}.png"
  Image.fromarray(np.random.RandomState(sum(size)).randint(
      0, 256, size + (3,)).astype(np.uint8)).save(path)
  return {"id": name, "image": str(path),
          "conversations": [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                            {"from": "gpt", "value": "The square is red."}]}


def test_pipeline_expands_each_image_to_its_merged_patch_count(tmp_path, tokenizer):
  """`<image>` becomes as many image ids as the image has merged patches; the patches
  fill the budget's first slots; the packer's lengths (read from the image header)
  agree; text-only and bad rows carry zero grids of the same shapes."""
  from moe_vlm.data import pipeline

  cfg = _tiny()
  pc = _preprocess_config(tokenizer, cfg)
  image_id = pc.image_token_id
  for name, size, grid in (("wide", (60, 90), (1, 4, 6)), ("small", (20, 20), (1, 4, 4))):
    rec = _record(tmp_path, name, size)
    ex = pipeline.preprocess(rec, tokenizer, pc)
    assert int(ex["ok"]) == 1 and tuple(ex["image_grid_thw"]) == grid, name
    n = int(np.prod(grid)) // 4
    assert int(np.sum(ex["input_ids"] == image_id)) == n
    assert ex["pixel_values"].shape == (24, 1176)
    assert ex["pixel_values"][:np.prod(grid)].any() and not ex["pixel_values"][np.prod(grid):].any()
    assert pipeline.text_length(rec, tokenizer, pc) == (int(ex["attention_mask"].sum()), True)
  text = pipeline.preprocess({"id": "t", "conversations": [
      {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]}, tokenizer, pc)
  missing = pipeline.preprocess({**_record(tmp_path, "x", (28, 28)), "image": "/no/such.png"},
                                tokenizer, pc)
  for ex in (text, missing):
    assert ex["pixel_values"].shape == (24, 1176) and not ex["image_grid_thw"].any()
  assert int(missing["bad_reason"]) == pipeline.MISSING_IMAGE


def test_packed_rows_equal_one_row_per_sample(tmp_path, tokenizer):
  """Two image samples packed into one row (two patch-budget slots, their grids) give
  each sample the logits it gets alone: attention, M-RoPE positions and image slots stay
  per sample."""
  from moe_vlm.data import packing, pipeline

  cfg = dataclasses.replace(_tiny(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            text=dataclasses.replace(_tiny().text, vocab_size=320))
  model = VLM(cfg, rngs=nnx.Rngs(1))
  pc = _preprocess_config(tokenizer, cfg, max_length=40)
  examples = [pipeline.preprocess(_record(tmp_path, n, s), tokenizer, pc)
              for n, s in (("a", (60, 90)), ("b", (20, 20)))]
  row = packing.pack_examples(examples, packing.PackingConfig(
      mode="first_fit", max_length=80, images_per_row=2), pipeline.Preprocess(tokenizer, pc).pad_id)
  assert row["pixel_values"].shape == (2, 24, 1176) and row["image_grid_thw"].tolist() == [
      [1, 4, 6], [1, 4, 4]]
  batch = {k: jnp.asarray(row[k])[None] for k in ("input_ids", "attention_mask",
                                                   "pixel_values", "image_grid_thw",
                                                   "segment_ids")}
  packed, _ = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                    segment_ids=batch["segment_ids"], image_grid_thw=batch["image_grid_thw"])
  seg = row["segment_ids"]
  for s, ex in enumerate(examples, 1):
    n = int(ex["attention_mask"].sum())
    alone, _ = model(jnp.asarray(ex["input_ids"])[None], jnp.asarray(ex["pixel_values"])[None],
                     jnp.asarray(ex["attention_mask"])[None],
                     image_grid_thw=jnp.asarray(ex["image_grid_thw"])[None])
    assert _maxdiff(np.asarray(packed)[0, seg == s], np.asarray(alone)[0, :n]) < 1e-5, s


# ----------------------------------------------------------- the stages, end to end


def qwen2_vl_synthetic_config():
  """configs/synthetic_tiny.py with a tiny Qwen2-VL model: 32 px images at patch 8
  (a 4 x 4 grid, 4 LLM tokens), the stages shortened, sharded over the 8 test devices."""
  from configs import synthetic_tiny

  c = synthetic_tiny.get_config()
  c.model.vision.update(variant="qwen2_vl", patch_size=8, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=2, norm_eps=1e-6, min_pixels=32 * 32,
                        max_pixels=32 * 32)
  c.model.text.update(family="qwen2", hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, qkv_bias=True, rope_type="mrope",
                      mrope_section=(2, 3, 3))
  c.model.update(projector="qwen2_vl_merger", vision_feature_layer=-1,
                 vision_feature_select_strategy="full")
  c.data.update(num_images=40, num_eval_images=8, max_length=96)
  c.vision_pretrain.update(steps=2, batch_size=8, warmup_ratio=0.0)
  for k in (1, 2, 3):
    c.stages[f"stage{k}"].update(steps=3, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
  c.mesh.update(data=2, fsdp=2, expert=2)
  c.checkpoint.update(every_steps=2, async_save=False)
  c.log_every = 1
  c.eval.update(run_after_training=False)
  return c


def test_three_stages_train_a_qwen2_vl_model(tmp_path):
  """The tower's pre-training and MoE-Tuning's three stages on a Qwen2-VL model
  (synthetic data through the pipeline's patches and grids), sharded over (data 2,
  fsdp 2, expert 2): stage 1 moves only the merger, stage 3 upcycles the decoder's FFNs
  into experts, every loss is finite."""
  import json

  from moe_vlm.train import loop

  exp = loop.train(qwen2_vl_synthetic_config(), str(tmp_path))
  assert exp.dense_config.vision.native and exp.model_config(3).text.moe is not None
  finals = {k: {n: np.asarray(v) for n, v in exp.load_params(k).items()} for k in (1, 2, 3)}
  init = loop.initial_params(exp, exp.mesh())
  moved = lambda a, b: sorted({n.split(".")[0] for n in a if n in b
                               and not np.array_equal(a[n], np.asarray(b[n]))})
  assert moved(finals[1], init) == ["projector"]
  assert moved(finals[2], finals[1]) == ["llm", "projector"]
  assert any(".experts." in n for n in finals[3])
  for stage, steps in (("vision_pretrain", 2), ("stage1", 3), ("stage2", 3), ("stage3", 3)):
    lines = [json.loads(l) for l in open(tmp_path / stage / "metrics.jsonl")]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert len(losses) == steps and np.isfinite(losses).all(), (stage, losses)


# ------------------------------------------------------------- inference commands


def test_vqa_and_chat_feed_native_images(tmp_path, tokenizer):
  """The answering paths (vqa batches, chat turns) give each image its own token count,
  patches and grid: a batched answer equals the question generated alone, the chat's
  first answer equals it too, and a chat that reuses its KV cache (M-RoPE continuing
  after the image) answers as one that prefills every turn afresh."""
  from moe_vlm.infer import chat, load, vqa
  from moe_vlm.infer import generate as gen

  image_id = tokenizer.convert_tokens_to_ids("<image>")
  cfg = dataclasses.replace(_tiny(), image_token_id=image_id,
                            text=dataclasses.replace(_tiny().text, vocab_size=320))
  im = load.InferenceModel(model=VLM(cfg, rngs=nnx.Rngs(2)), cfg=cfg, tokenizer=tokenizer,
                           template="phi", normalization="clip")
  for name, size in (("a", (60, 90)), ("b", (20, 20))):
    _record(tmp_path, name, size)
  questions = [{"question_id": "a", "text": "What colour?", "image": "a.png"},
               {"question_id": "b", "text": "What colour?", "image": "b.png"},
               {"question_id": "c", "text": "The square", "image": None}]
  config = gen.GenerationConfig(max_new_tokens=3, eos_ids=(tokenizer.eos_token_id,))
  answers = [a for batch in vqa.answer_questions(im, questions, image_folder=str(tmp_path),
                                                 config=config, batch_size=2) for a in batch]
  assert len(answers) == 3
  for q, answer in zip(questions, answers):
    path = str(tmp_path / q["image"]) if q["image"] else None
    ids = im.encode(vqa.question_turns(q["text"], path is not None), image=path)
    assert int(np.sum(ids == image_id)) == (0 if path is None else {"a": 6, "b": 4}[q["image"][0]])
    tokens = gen.generate(im.model, ids[None], np.ones((1, len(ids)), np.int32),
                          im.image(path)[None], config, image_grid_thw=im.grid(path)[None])
    assert im.decode(gen.until_stop(tokens, config.eos_ids)[0]) == answer, q
  sessions = [chat.ChatSession(im, config, image=str(tmp_path / "a.png"), reuse_cache=r)
              for r in (True, False)]
  first = [s.ask("What colour?") for s in sessions]
  assert first == [answers[0]] * 2
  assert sessions[0].ask("The square") == sessions[1].ask("The square")
  assert sessions[0].last.prefilled < sessions[1].last.prefilled  # the cache was reused


def test_routing_analysis_of_a_qwen2_vl_moe_model():
  """The routing counter feeds the grids: image tokens are counted as image tokens, as
  many as the images' merged patches."""
  from moe_vlm.eval import routing
  from moe_vlm.models.config import MoEConfig

  cfg = _tiny()
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(
      cfg.text, num_layers=2, moe=MoEConfig(num_experts=4, top_k=2, dispatch="dropless")))
  model = VLM(cfg, rngs=nnx.Rngs(3))
  ours, _, valid = _batch(ROWS, 16)
  counter = routing.RoutingCounter(model, image_token_id=IMAGE)
  idx = counter.add(np.asarray(ours["input_ids"]), np.asarray(ours["pixel_values"]),
                    np.asarray(ours["attention_mask"]), grids=np.asarray(ours["image_grid_thw"]))
  assert idx.shape == (1, 4, 16, 2)
  assert counter.stats.top1[0, 0].sum() == 6 + 4 + 0 + 1  # image tokens of the 4 rows
  assert counter.stats.top1[0].sum() == valid.sum()
