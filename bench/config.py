"""The fixed benchmark model, its batch, its FLOP count and our train step on it.

Every benchmark that runs the VLM (bench.moe_layer's step part, bench.mfu,
bench.train_step, bench.generate) builds it from here, so their figures stay
comparable across changes (issue #8 fixes the config):

- vision: CLIP-style ViT, 4 layers, width 256, 4 heads, MLP 1024; 112 px images in
  14 px patches = 64 image tokens (+ CLS, dropped); frozen in training;
- projector `mlp2x_gelu`;
- text: Qwen2-style, 8 layers, width 512, 8 query / 4 KV heads, qkv bias, FFN 1408
  SwiGLU, 4 experts top-2 in every other layer (no shared expert), vocab 8000;
- batch 8 x 256 tokens, 64 of them image tokens per row; fp32 unless told otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_vlm import cost
from moe_vlm.convert import hf
from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import stages
from moe_vlm.train import step as step_lib
from moe_vlm.train.optim import OptimConfig

# The train-step benchmarks train what stage 2 trains: projector + LLM, vision frozen.
STAGE_PRESET = "projector_llm"


@dataclasses.dataclass(frozen=True)
class Sizes:
  # MoE layer benchmark
  hidden: int
  ffn: int
  experts: int
  top_k: int
  batch: int
  seq: int
  # train step: vision tower
  image_size: int
  patch_size: int
  vis_hidden: int
  vis_ffn: int
  vis_layers: int
  vis_heads: int
  # train step: decoder (hidden/ffn/experts/top_k/batch/seq shared with the layer)
  text_layers: int
  heads: int
  kv_heads: int
  vocab: int
  # matmul peak: [n, n] @ [n, n]
  matmul_n: int
  reps: int
  step_reps: int
  # compute dtype of activations and matmuls (parameters stay fp32, the router fp32)
  dtype: str = "float32"


FULL = Sizes(hidden=512, ffn=1408, experts=4, top_k=2, batch=8, seq=256,
             image_size=112, patch_size=14, vis_hidden=256, vis_ffn=1024, vis_layers=4,
             vis_heads=4, text_layers=8, heads=8, kv_heads=4, vocab=8000,
             matmul_n=2048, reps=5, step_reps=3)
TINY = Sizes(hidden=64, ffn=128, experts=4, top_k=2, batch=2, seq=32,
             image_size=28, patch_size=14, vis_hidden=32, vis_ffn=64, vis_layers=2,
             vis_heads=4, text_layers=2, heads=4, kv_heads=2, vocab=256,
             matmul_n=256, reps=2, step_reps=2)


def vlm_config(s: Sizes, dispatch: str = "dropless") -> VLMConfig:
  vision = VisionConfig(variant="clip", image_size=s.image_size, patch_size=s.patch_size,
                        hidden_size=s.vis_hidden, intermediate_size=s.vis_ffn,
                        num_layers=s.vis_layers, num_heads=s.vis_heads, dtype=s.dtype)
  text = TextConfig(family="qwen2", vocab_size=s.vocab, hidden_size=s.hidden,
                    intermediate_size=s.ffn, num_layers=s.text_layers, num_heads=s.heads,
                    num_kv_heads=s.kv_heads, qkv_bias=True, rope_theta=1e6, dtype=s.dtype,
                    moe=MoEConfig(num_experts=s.experts, top_k=s.top_k, dispatch=dispatch,
                                  moe_mode="sparse"))
  return VLMConfig(vision=vision, text=text, projector="mlp2x_gelu",
                   image_token_id=s.vocab - 1)


def describe(cfg: VLMConfig, batch: int, seq: int) -> str:
  """One line naming the model and batch, printed by every benchmark that runs it."""
  t, v = cfg.text, cfg.vision
  moe = t.moe
  dispatch = (moe.dispatch if moe.dispatch == "dropless" else
              f"capacity (factor {moe.capacity_factor})")
  return (f"ViT {v.num_layers}L d{v.hidden_size} {v.num_heads}h MLP {v.intermediate_size}, "
          f"{v.image_size}px/{v.patch_size}px -> {cfg.num_image_tokens} image tokens; "
          f"Qwen2-style {t.num_layers}L d{t.hidden_size} {t.num_heads}q/{t.num_kv_heads}kv "
          f"FFN {t.intermediate_size}, {moe.num_experts} experts top-{moe.top_k} on layers "
          f"{list(t.moe_layers())} (dispatch {dispatch}), vocab {t.vocab_size}; batch "
          f"{batch}x{seq}; compute {t.dtype}")


# ------------------------------------------------------------------------ FLOP formula


def train_step_flops(cfg: VLMConfig, batch: int, seq: int,
                     head_fraction: Optional[float] = None) -> dict[str, float]:
  """Model FLOPs of our train step on the benchmark model (`moe_vlm.cost.train_step_flops`
  with what the benchmarks train, `STAGE_PRESET`, on jax's default backend), so every
  benchmark counts the same step the same way. `head_fraction`: the compact LM head's
  (None: the head on every position)."""
  return cost.train_step_flops(cfg, STAGE_PRESET, batch, seq, head_fraction=head_fraction)


# ------------------------------------------------------------------ weights and batch


def random_vlm(cfg: VLMConfig, seed: int = 0) -> VLM:
  """A VLM with random weights drawn on the host: N(0, 0.02) for every matrix, embedding
  and bias, ones for norm scales (as the default init, but without one XLA compile per
  initializer: the model is built abstract and filled from numpy)."""
  model = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  for path, var in sorted(hf.flat_params(model).items()):
    if path.endswith(".scale"):
      value = np.ones(var.shape, np.float32)
    else:
      value = 0.02 * rng.standard_normal(var.shape, np.float32)
    var.set_value(jnp.asarray(value, dtype=var.dtype))
  return model


def train_batch(cfg: VLMConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch as numpy arrays (both frameworks take them from here).

  Every row is a BOS, one image (its placeholder tokens) and random text with no
  padding; the loss covers the last part of the text (the "answer"), from
  1 + image tokens + seq/8 on. Pixels are [B, H, W, 3] (channels last, ours).
  """
  n_img = cfg.num_image_tokens
  if seq < 2 + n_img + seq // 8:
    raise ValueError(f"seq={seq}: expected at least {2 + n_img + seq // 8} tokens "
                     f"(BOS + {n_img} image tokens + a prompt and an answer)")
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, cfg.image_token_id, (batch, seq))
  ids[:, 1:1 + n_img] = cfg.image_token_id  # every row has one image after a BOS
  loss_mask = np.zeros((batch, seq), np.int32)
  loss_mask[:, 1 + n_img + seq // 8:] = 1
  v = cfg.vision
  pixels = rng.standard_normal((batch, v.image_size, v.image_size, v.num_channels))
  return dict(input_ids=ids.astype(np.int32), attention_mask=np.ones((batch, seq), np.int32),
              loss_mask=loss_mask, pixel_values=pixels.astype(np.float32))


def max_targets_per_row(batch: dict[str, np.ndarray]) -> int:
  """The most next-token targets (answer tokens after position 0) any row of `batch` has."""
  return int(batch["loss_mask"][:, 1:].sum(1).max())


def batch_head_fraction(batch: dict[str, np.ndarray]) -> float:
  """The smallest `StepConfig.head_fraction` whose compact LM head fits every row's
  targets in `batch`."""
  return max_targets_per_row(batch) / batch["loss_mask"].shape[1]


# ---------------------------------------------------------------- our jit train step


@dataclasses.dataclass
class JaxStep:
  """Our train step on the benchmark model, lowered but not compiled yet.

  `compile_all` compiles `lowered`; `set_compiled` then makes the object callable:
  each call runs one (state-donating) step and carries the state to the next.
  """
  cfg: VLMConfig
  step_cfg: step_lib.StepConfig
  lowered: Any
  state: Any
  batch: dict[str, jax.Array]
  n_params: int
  n_trainable: int
  compiled: Any = None

  def set_compiled(self, compiled: Any) -> None:
    self.compiled, self.lowered = compiled, None

  def __call__(self) -> dict[str, jax.Array]:
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics


def jax_train_step(model: VLM, batch: dict[str, np.ndarray],
                   optim: Optional[OptimConfig] = None,
                   head_fraction: Optional[float] = None) -> JaxStep:
  """Our jit train step (`make_train_step` + AdamW of `make_optimizer`, stage preset
  `STAGE_PRESET` so the vision tower is frozen) on a 1-device mesh, lowered.
  `head_fraction`: `StepConfig.head_fraction` (None: the LM head on every position).

  The model's arrays become the train state, which every step donates: do not use
  `model` afterwards.
  """
  cfg = model.cfg
  codec = ParamCodec(model)
  params = codec.flatten(model)
  trainable: Callable[[str], bool] = stages.trainable_fn(STAGE_PRESET)
  n_all = sum(int(np.prod(p.shape)) for p in params.values())
  n_train = sum(int(np.prod(p.shape)) for k, p in params.items() if trainable(k))
  mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, (1, 1, 1, 1))), jax.devices()[:1])
  step_cfg = step_lib.StepConfig(optim=optim or OptimConfig(learning_rate=1e-4,
                                                            total_steps=1000),
                                 head_fraction=head_fraction)
  tx = step_lib.make_optimizer(step_cfg.optim)
  shardings = step_lib.state_shardings(codec, trainable, mesh, tx)
  state = step_lib.init_state(params, trainable, tx, shardings)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  fn = step_lib.jit_train_step(step_lib.make_train_step(codec, step_cfg, tx), mesh, shardings,
                               jbatch)
  return JaxStep(cfg, step_cfg, fn.lower(state, jbatch), state, jbatch, n_all, n_train)
