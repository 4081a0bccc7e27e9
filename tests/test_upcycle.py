"""Upcycling: experts are exact FFN copies, routers fresh, the function is preserved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.convert.hf import flat_params
from moe_vlm.models.config import ConfigError, MoEConfig
from moe_vlm.models.vlm import VLM
from moe_vlm.train.upcycle import upcycle
from tests.tiny import IMAGE_TOKEN, LLAMA, PHI, vlm_config


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  p = cfg.num_image_tokens
  ids = rng.integers(0, IMAGE_TOKEN, size=(2, 12))
  ids[0, 2:2 + p] = IMAGE_TOKEN
  pixels = rng.normal(size=(2, 28, 28, 3)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(pixels)


@pytest.mark.parametrize("text", [LLAMA, PHI], ids=["gated", "plain_bias"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_model_matches_dense(text, top_k):
  dense = VLM(vlm_config(text), rngs=nnx.Rngs(1))
  moe_cfg = MoEConfig(num_experts=4, top_k=top_k, moe_mode="sparse", dispatch="dropless")
  moe = upcycle(dense, moe_cfg, seed=3)
  ids, pixels = _batch(dense.cfg)
  want, _ = dense(ids, pixels)
  got, aux = moe(ids, pixels)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Capacity dispatch with room for every token is the same function too.
  got_cap, _ = moe(ids, pixels, dispatch="capacity", train=False)
  np.testing.assert_allclose(got_cap, want, atol=1e-5, rtol=0)
  assert aux["layers/aux_loss"].shape == (2,)  # layers 0 and 2 of 4 ("sparse")


def test_experts_are_exact_copies_and_the_rest_is_unchanged():
  dense = VLM(vlm_config(PHI), rngs=nnx.Rngs(2))
  moe = upcycle(dense, MoEConfig(num_experts=3, moe_layers_idx=(1, 3)), seed=0)
  old, new = flat_params(dense), flat_params(moe)
  for i in (1, 3):
    base = f"llm.layers.{i}.mlp"
    for expert, src in (("wi", "wi.kernel"), ("wo", "wo.kernel"), ("wi_bias", "wi.bias"),
                        ("wo_bias", "wo.bias")):
      stacked = np.asarray(new[f"{base}.experts.{expert}"][...])
      assert stacked.shape[0] == 3
      for e in range(3):
        assert np.array_equal(stacked[e], np.asarray(old[f"{base}.{src}"][...]))
  routers = [np.asarray(new[f"llm.layers.{i}.mlp.router.kernel"][...]) for i in (1, 3)]
  assert not np.array_equal(routers[0], routers[1])  # independently initialised
  bound = 1 / np.sqrt(PHI.hidden_size)  # torch nn.Linear init: U(-1/sqrt(fan_in), ..)
  assert all(np.abs(r).max() <= bound and np.abs(r).std() > bound / 4 for r in routers)
  for path, var in old.items():
    if not path.startswith(("llm.layers.1.mlp", "llm.layers.3.mlp")):
      assert np.array_equal(np.asarray(new[path][...]), np.asarray(var[...])), path


def test_upcycle_rejects_moe_models_and_mismatched_expert_size():
  dense = VLM(vlm_config(LLAMA), rngs=nnx.Rngs(0))
  moe = upcycle(dense, MoEConfig())
  with pytest.raises(ConfigError, match="already has MoE"):
    upcycle(moe, MoEConfig())
  with pytest.raises(ConfigError, match="expert_intermediate_size"):
    upcycle(dense, MoEConfig(expert_intermediate_size=16))
  with pytest.raises(ConfigError, match="out of range"):
    upcycle(dense, MoEConfig(moe_layers_idx=(0, 7)))
