"""Tiny model configs shared by the tests (small enough to compile in seconds)."""

from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig

VISION = VisionConfig(variant="clip", image_size=28, patch_size=14, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4)
LLAMA = TextConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_layers=4, num_heads=4, num_kv_heads=2)
PHI = TextConfig(family="phi", vocab_size=64, hidden_size=32, intermediate_size=64,
                 num_layers=4, num_heads=4, num_kv_heads=4, norm="layer", norm_eps=1e-5,
                 mlp="plain", activation="gelu_new", mlp_bias=True, qkv_bias=True,
                 o_bias=True, parallel_residual=True, partial_rotary_factor=0.5,
                 lm_head_bias=True)
IMAGE_TOKEN = 63


def vlm_config(text: TextConfig = LLAMA, moe: MoEConfig | None = None) -> VLMConfig:
  import dataclasses
  return VLMConfig(vision=VISION, text=dataclasses.replace(text, moe=moe),
                   image_token_id=IMAGE_TOKEN)


def train_and_checkpoint(codec, params, trainable, batch, ckpt_dir: str, *, lr: float,
                         steps: int = 6):
  """Runs `steps` jit train steps of the `trainable` params on one fixed batch and checks
  what every stage must do: the loss goes down, frozen params stay bit-identical, and the
  stage-final params survive an Orbax save/restore unchanged. Returns the final state."""
  import jax
  import numpy as np

  from moe_vlm import checkpoint as ckpt_lib
  from moe_vlm.train import step as step_lib
  from moe_vlm.train.optim import OptimConfig

  step_cfg = step_lib.StepConfig(optim=OptimConfig(learning_rate=lr, warmup_ratio=0.0,
                                                   total_steps=100))
  tx = step_lib.make_optimizer(step_cfg.optim)
  state = step_lib.init_state(params, trainable, tx)
  step = jax.jit(step_lib.make_train_step(codec, step_cfg, tx))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 1e-3, losses
  for name, value in state.frozen.items():
    np.testing.assert_array_equal(np.asarray(value), params[name], err_msg=name)
  trained = ckpt_lib.to_host({**state.frozen, **state.params})
  ckpt_lib.save_params(ckpt_dir, trained)
  restored = ckpt_lib.load_params(ckpt_dir, trained)
  assert set(restored) == set(params)
  for name, value in trained.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), value, err_msg=name)
  return state
