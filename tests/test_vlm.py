"""The VLM wrapper: image splicing, text-only rows, modality statistics, clear errors."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.models.config import ConfigError, MoEConfig, TextConfig, VisionConfig, VLMConfig
from moe_vlm.models.vlm import VLM, ImageTokenError
from tests.tiny import IMAGE_TOKEN, LLAMA, VISION, vlm_config


@pytest.fixture(scope="module")
def model():
  return VLM(vlm_config(LLAMA, MoEConfig(num_experts=4, top_k=2, dispatch="dropless")),
             rngs=nnx.Rngs(0))


def _ids(p, with_image=(True, False), length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, IMAGE_TOKEN, size=(len(with_image), length))
  for row, has in enumerate(with_image):
    if has:
      ids[row, 3:3 + p] = IMAGE_TOKEN
  return ids


def test_image_features_land_on_placeholders_and_text_rows_ignore_pixels(model):
  p = model.cfg.num_image_tokens
  ids = jnp.asarray(_ids(p))
  rng = np.random.default_rng(1)
  px1 = jnp.asarray(rng.normal(size=(2, 28, 28, 3)), jnp.float32)
  px2 = jnp.asarray(rng.normal(size=(2, 28, 28, 3)), jnp.float32)
  l1, _ = model(ids, px1)
  l2, _ = model(ids, px2)
  # Row 0 has an image: its logits depend on the pixels from the first image token on.
  assert np.abs(np.asarray(l1[0, 3:] - l2[0, 3:])).max() > 1e-4
  np.testing.assert_array_equal(l1[0, :3], l2[0, :3])  # causal: before the image
  np.testing.assert_array_equal(l1[1], l2[1])  # text-only row ignores its pixels
  # Splicing equals writing the projected features into the embeddings by hand.
  feats = model.image_features(px1)
  embeds = model.llm.embed_tokens(ids)
  embeds = embeds.at[0, 3:3 + p].set(feats[0])
  want, _ = model.llm(inputs_embeds=embeds)
  np.testing.assert_allclose(l1, want, atol=1e-6)


def test_routing_stats_count_image_and_text_tokens(model):
  p = model.cfg.num_image_tokens
  ids = jnp.asarray(_ids(p))
  mask = np.ones(ids.shape, np.int32)
  mask[1, -2:] = 0  # two padding tokens
  _, aux = model(ids, jnp.zeros((2, 28, 28, 3)), jnp.asarray(mask))
  k, n_layers = 2, 2  # top-2, "sparse" over 4 layers
  img = np.asarray(aux["layers/tokens_per_expert_image"])
  txt = np.asarray(aux["layers/tokens_per_expert_text"])
  assert img.shape == (n_layers, 4)
  np.testing.assert_array_equal(img.sum(-1), [p * k] * n_layers)
  np.testing.assert_array_equal(txt.sum(-1), [(ids.size - p - 2) * k] * n_layers)
  np.testing.assert_array_equal(np.asarray(aux["layers/top1_per_expert_image"]).sum(-1),
                                [p] * n_layers)
  np.testing.assert_allclose(aux["aux_loss"], np.sum(aux["layers/aux_loss"]), rtol=1e-6)


def test_placeholder_count_must_match_one_image(model):
  p = model.cfg.num_image_tokens
  ids = _ids(p)
  ids[0, 3] = 5  # one placeholder short
  with pytest.raises(ImageTokenError, match=f"row 0 has {p - 1} image tokens"):
    model(jnp.asarray(ids), jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(ImageTokenError, match="pixel_values is None"):
    model(jnp.asarray(_ids(p)), None)
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.asarray(_ids(p)), jnp.zeros((2, 3, 28, 28)))


@pytest.mark.parametrize("bad, match", [
    (dict(vision_feature_layer=-4), "vision_feature_layer"),
    (dict(image_token_id=64), "image_token_id"),
    (dict(projector="mlp3x"), "projector"),
    (dict(text=dataclasses.replace(LLAMA, num_kv_heads=3)), "num_kv_heads"),
    (dict(text=dataclasses.replace(LLAMA, moe=MoEConfig(top_k=5))), "top_k"),
    (dict(text=dataclasses.replace(LLAMA, moe=MoEConfig(moe_layers_idx=(0, 4)))),
     "out of range"),
    (dict(vision=dataclasses.replace(VISION, image_size=10)), "image_size"),  # < patch 14
    (dict(text=dataclasses.replace(LLAMA, activation="swish2")), "text.activation"),
])
def test_bad_configs_raise_named_errors(bad, match):
  cfg = dataclasses.replace(vlm_config(LLAMA), **bad)
  with pytest.raises(ConfigError, match=match):
    cfg.validate()
  with pytest.raises(ConfigError, match=match):
    VLM(cfg, rngs=nnx.Rngs(0))


def test_num_image_tokens_follows_select_strategy():
  clip = VLMConfig(vision=VisionConfig(variant="clip", image_size=336, patch_size=14),
                   text=TextConfig(vocab_size=32064), image_token_id=32000)
  assert clip.num_image_tokens == 576  # CLIP-L/336: CLS dropped
  siglip = dataclasses.replace(clip, vision=VisionConfig(variant="siglip", image_size=384,
                                                         patch_size=14))
  assert siglip.num_image_tokens == 728  # MoE-LLaVA's quirk drops SigLIP token 0
  assert dataclasses.replace(siglip, vision_feature_select_strategy="full").num_image_tokens == 729
