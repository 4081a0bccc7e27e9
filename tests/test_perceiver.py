"""IDEFICS2 perceiver projector: parity with transformers' Idefics2Connector, the VLM with
projector="perceiver" (forward, stage-1 training, Orbax round trip), config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.convert import idefics2
from moe_vlm.convert.hf import ConversionError
from moe_vlm.models.config import ConfigError, PerceiverConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.perceiver import PerceiverConnector
from moe_vlm.models.vlm import VLM
from moe_vlm.train.stages import trainable_fn
from tests.tiny import IMAGE_TOKEN, LLAMA, train_and_checkpoint, vlm_config

VISION_DIM, TEXT_DIM, TEXT_INTER = 16, 32, 48
DEPTH = 2


# ------------------------------------------------------------ parity with transformers


@pytest.fixture(scope="module")
def hf_connector():
  torch = pytest.importorskip("torch")
  from transformers import Idefics2Config
  from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector
  config = Idefics2Config(
      vision_config=dict(hidden_size=VISION_DIM, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=28, patch_size=14),
      text_config=dict(model_type="mistral", hidden_size=TEXT_DIM,
                       intermediate_size=TEXT_INTER, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                       hidden_act="silu", rms_norm_eps=1e-5),
      perceiver_config=dict(hidden_size=TEXT_DIM, rms_norm_eps=1e-5, hidden_act="silu",
                            resampler_n_latents=8, resampler_depth=DEPTH, resampler_n_heads=4,
                            resampler_head_dim=8, num_key_value_heads=2))
  config.perceiver_config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = Idefics2Connector(config).eval()
  # Random everything (norm scales and latents too: HF initialises them to ones, which
  # would hide a swapped norm or a transposed latent table).
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("latents"):
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
  return torch, config, model


@pytest.fixture(scope="module")
def converted(hf_connector):
  _, config, model = hf_connector
  pcfg = idefics2.perceiver_config_from_hf(config)
  codec = ParamCodec.abstract(lambda: PerceiverConnector(
      pcfg, VISION_DIM, TEXT_DIM, TEXT_INTER, rngs=nnx.Rngs(0)))
  params = idefics2.connector_params(model.state_dict(), pcfg.depth, ours="",
                                     expected=codec.shapes)
  return pcfg, codec, params


def test_config_from_hf(hf_connector):
  _, config, _ = hf_connector
  pcfg = idefics2.perceiver_config_from_hf(config)
  assert pcfg == PerceiverConfig(n_latents=8, depth=DEPTH, num_heads=4, head_dim=8,
                                 num_kv_heads=2, intermediate_size=TEXT_INTER, norm_eps=1e-5,
                                 activation="silu")
  bad = config.__class__.from_dict(config.to_dict())
  bad.perceiver_config.hidden_act = "gelu"
  with pytest.raises(ConfigError, match="perceiver_config.hidden_act"):
    idefics2.perceiver_config_from_hf(bad)


def test_connector_matches_transformers(hf_connector, converted):
  """Masking supported: a [B, P] patch mask (IDEFICS2's attention_mask) hiding padded
  patches from the keys; latents always attend to themselves. Checked all-ones (what
  the VLM uses) and with padded patches."""
  torch, _, model = hf_connector
  pcfg, codec, params = converted
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, VISION_DIM)).astype(np.float32)
  ones = np.ones((3, 5), np.int64)
  padded = ones.copy()
  padded[1, 3:] = 0
  padded[2, 1:] = 0
  run = jax.jit(lambda p, x, m: codec.merge(p)(x, m))
  run_unmasked = jax.jit(lambda p, x: codec.merge(p)(x))
  for mask in (ones, padded):
    with torch.no_grad():
      want = model(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    got = np.asarray(run(params, x, mask))
    assert got.shape == (3, pcfg.n_latents, TEXT_DIM)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
  # The mask matters (row 2 sees one patch), and mask=None means all patches are real.
  assert np.abs(np.asarray(run(params, x, ones)) - np.asarray(run(params, x, padded)))[2].max() > 1e-3
  np.testing.assert_allclose(np.asarray(run_unmasked(params, x)),
                             np.asarray(run(params, x, ones)), atol=1e-5)


def test_conversion_errors(hf_connector, converted):
  _, _, model = hf_connector
  pcfg, codec, _ = converted
  state = model.state_dict()
  with pytest.raises(ConversionError, match="lacks"):
    idefics2.connector_params({k: v for k, v in state.items() if "latents" not in k},
                              DEPTH, ours="")
  with pytest.raises(ConversionError, match="does not use"):
    idefics2.connector_params(state, DEPTH - 1, ours="")
  # A whole IDEFICS2 state dict: only the connector's prefix is read.
  whole = {f"model.connector.{k}": v for k, v in state.items()}
  whole["model.text_model.embed_tokens.weight"] = np.zeros((2, 2))
  out = idefics2.connector_params(whole, DEPTH, hf_prefix="model.connector.")
  assert set(out) == {f"projector.{n}" for n in codec.names}
  wrong = dict(codec.shapes)
  wrong["final_norm.scale"] = jax.ShapeDtypeStruct((TEXT_DIM + 1,), jnp.float32)
  with pytest.raises(ConversionError, match="final_norm.scale"):
    idefics2.connector_params(state, DEPTH, ours="", expected=wrong)


# --------------------------------------------------------------------- the whole VLM

PERCEIVER = PerceiverConfig(n_latents=6, depth=2, num_heads=4, head_dim=8, num_kv_heads=2,
                            intermediate_size=48)
L = 12


def _cfg():
  return dataclasses.replace(vlm_config(dataclasses.replace(LLAMA, num_layers=2)),
                             projector="perceiver", perceiver=PERCEIVER)


def _batch(cfg):
  rng = np.random.default_rng(1)
  ids = rng.integers(0, IMAGE_TOKEN, (2, L))
  ids[0, 1:1 + cfg.num_image_tokens] = IMAGE_TOKEN  # row 1 is text-only
  loss_mask = np.zeros((2, L), np.int32)
  loss_mask[:, -4:] = 1
  return dict(input_ids=jnp.asarray(ids, jnp.int32),
              attention_mask=jnp.ones((2, L), jnp.int32),
              loss_mask=jnp.asarray(loss_mask),
              pixel_values=jnp.asarray(rng.normal(size=(2, 28, 28, 3)), jnp.float32))


@pytest.fixture(scope="module")
def vlm():
  cfg = _cfg()
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  return cfg, model, codec, jax.tree.map(np.asarray, codec.flatten(model))


def test_vlm_builds_and_runs_with_perceiver(vlm):
  cfg, model, codec, params = vlm
  assert cfg.num_image_tokens == PERCEIVER.n_latents != cfg.vision.num_patches
  assert isinstance(model.projector, PerceiverConnector)
  assert codec.logical_axes["projector.layers.1.attn.key.kernel"] == ("embed", "kv_heads")
  assert codec.logical_axes["projector.modality_projection.wi_gate.kernel"] == (
      "vision_embed", "mlp")
  assert params["projector.latents"].shape == (PERCEIVER.n_latents, cfg.text.hidden_size)
  assert params["projector.modality_projection.wi_gate.kernel"].shape == (
      cfg.vision.hidden_size, PERCEIVER.intermediate_size)
  batch = _batch(cfg)
  fwd = jax.jit(lambda p, b: codec.merge(p)(b["input_ids"], b["pixel_values"],
                                           b["attention_mask"])[0])
  logits = np.asarray(fwd(params, batch))
  assert logits.shape == (2, L, cfg.text.vocab_size) and np.isfinite(logits).all()
  # The image reaches the text after it in row 0; text-only row 1 ignores its pixels.
  other = dict(batch, pixel_values=batch["pixel_values"] + 1.0)
  moved = np.abs(np.asarray(fwd(params, other)) - logits).max(axis=(1, 2))
  assert moved[0] > 1e-4 and moved[1] == 0.0


def test_stage1_trains_the_perceiver_only_and_checkpoints(vlm, tmp_path):
  cfg, _, codec, params = vlm
  trainable = trainable_fn("projector")
  assert {n for n in params if trainable(n)} == {n for n in params
                                                  if n.startswith("projector.")}
  state = train_and_checkpoint(codec, params, trainable, _batch(cfg), str(tmp_path / "final"),
                               lr=3e-3)
  assert all(n.startswith("projector.") for n in state.params)
  assert not np.array_equal(np.asarray(state.params["projector.latents"]),
                            params["projector.latents"])


def test_export_refuses_perceiver_and_config_json_round_trips(vlm, tmp_path):
  from moe_vlm.convert import export
  cfg, model, _, _ = vlm
  with pytest.raises(ValueError, match="perceiver"):
    export.export_vlm(model, str(tmp_path / "hf"))
  export.save_config(cfg, str(tmp_path / "cfg.json"))
  assert export.load_config(str(tmp_path / "cfg.json")) == cfg


# ------------------------------------------------------------------- config errors


@pytest.mark.parametrize("change, field", [
    (dict(num_heads=4, num_kv_heads=3), "perceiver.num_heads"),
    (dict(n_latents=0), "perceiver.n_latents"),
    (dict(depth=0), "perceiver.depth"),
    (dict(head_dim=0), "perceiver.head_dim"),
    (dict(intermediate_size=0), "perceiver.intermediate_size"),
    (dict(norm_eps=0.0), "perceiver.norm_eps"),
    (dict(activation="tanh"), "perceiver.activation"),
])
def test_validate_names_bad_perceiver_fields(change, field):
  cfg = dataclasses.replace(_cfg(), perceiver=dataclasses.replace(PERCEIVER, **change))
  with pytest.raises(ConfigError, match=field):
    cfg.validate()
  # Other projectors do not read the perceiver block.
  dataclasses.replace(cfg, projector="mlp2x_gelu").validate()


def test_validate_names_unknown_projector():
  with pytest.raises(ConfigError, match="projector='resampler'.*'perceiver'"):
    dataclasses.replace(_cfg(), projector="resampler").validate()
