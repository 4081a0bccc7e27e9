"""HyperLLaVA dynamic experts and Awaker2.5-VL LoRA experts as options of the same VLM.

- fresh variants equal the static model (zero-initialised generators / LoRA B);
- guidance reads only the prompt, so the model stays causal over answer tokens;
- KV-cache generation equals full recomputation (guides are cached at prefill);
- each variant trains only what its stage should, with frozen params bit-identical,
  and round-trips through Orbax;
- instance-routed LoRA experts (routing on the router span) and stage I's single LoRA
  fold into a dense model exactly.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.convert.lora import instance_guide, merge_lora_experts
from moe_vlm.infer.generate import generate, left_pad
from moe_vlm.models.adapters import masked_mean, prompt_mask
from moe_vlm.models.config import ConfigError, HyperExpertConfig, LoRAMoEConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.train.stages import trainable_fn
from tests.tiny import IMAGE_TOKEN, LLAMA, train_and_checkpoint, vlm_config

L = 16
HYPER = HyperExpertConfig(expert_dim=8, bottleneck=4)


def _variant(name):
  base = vlm_config(LLAMA)
  if name == "hyper":
    return dataclasses.replace(base, visual_expert=HYPER,
                               text=dataclasses.replace(base.text, language_expert=HYPER))
  routing = name.split("_")[1]
  lora = LoRAMoEConfig(num_experts=3, top_k=1, rank=2, alpha=4.0, routing=routing)
  return dataclasses.replace(base, text=dataclasses.replace(base.text, lora_moe=lora))


VARIANTS = ("hyper", "lora_token", "lora_instance")
_ZERO_INIT = ("gen_up.", "_b")  # what starts at zero: W_u generators, LoRA B


def _is_extra(name):
  return ".visual_expert." in name or ".language_expert." in name or ".lora_" in name


def _randomized(params, seed=0):
  """Zero-initialised adapter parts set to small random values, so the adapters act."""
  rng = np.random.default_rng(seed)
  out = dict(params)
  for k, v in params.items():
    if _is_extra(k) and any(z in k for z in _ZERO_INIT) and not k.endswith("bias"):
      out[k] = jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype)
  return out


_built = {}


def _model(name):
  if name not in _built:
    cfg = _variant(name)
    model = VLM(cfg, rngs=nnx.Rngs(0))
    codec = ParamCodec(model)
    _built[name] = (cfg, codec, jax.tree.map(np.asarray, codec.flatten(model)))
  return _built[name]


def _batch(cfg, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, IMAGE_TOKEN, (2, L))
  ids[:, 1:1 + cfg.num_image_tokens] = IMAGE_TOKEN
  loss_mask = np.zeros((2, L), np.int32)
  loss_mask[:, -5:] = 1
  return dict(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.ones((2, L), jnp.int32),
              loss_mask=jnp.asarray(loss_mask),
              pixel_values=jnp.asarray(rng.normal(size=(2, 28, 28, 3)), jnp.float32))


def _forward(codec):
  @jax.jit
  def f(params, batch, guide):
    return codec.merge(params)(batch["input_ids"], batch["pixel_values"],
                               batch["attention_mask"], guide_mask=guide)[0]
  return f


@pytest.mark.parametrize("name", VARIANTS)
def test_fresh_variant_equals_the_static_model(name):
  cfg, codec, params = _model(name)
  extra = [k for k in params if _is_extra(k)]
  assert extra, "the variant added no parameters"
  static_cfg = vlm_config(LLAMA)
  static = ParamCodec.abstract(lambda: VLM(static_cfg, rngs=nnx.Rngs(0)))
  assert set(static.names) == set(params) - set(extra)  # adapters only add parameters
  batch = _batch(cfg)
  guide = prompt_mask(batch["attention_mask"], batch["loss_mask"])
  got = _forward(codec)(params, batch, guide)
  want = _forward(static)({k: params[k] for k in static.names}, batch, guide)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  # ... and acts once its zero-initialised parts are not zero.
  moved = _forward(codec)(_randomized(params), batch, guide)
  assert np.abs(np.asarray(moved) - np.asarray(want)).max() > 1e-3


@pytest.mark.parametrize("name", ["hyper", "lora_instance"])
def test_guidance_reads_only_the_prompt(name):
  """Changing the last answer token moves no earlier logit when guides read the prompt;
  pooling over every token (no guide mask) would leak it backwards."""
  cfg, codec, params = _model(name)
  params = _randomized(params)
  # Unit-scale token embeddings (the tiny init's 0.02 would hide any leak in roundoff).
  params["llm.embed"] = params["llm.embed"] * 50.0
  batch = _batch(cfg)
  other = dict(batch, input_ids=batch["input_ids"].at[:, -1].set(5))
  guide = prompt_mask(batch["attention_mask"], batch["loss_mask"])
  f = _forward(codec)
  a, b = np.asarray(f(params, batch, guide)), np.asarray(f(params, other, guide))
  np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
  a, b = np.asarray(f(params, batch, None)), np.asarray(f(params, other, None))
  assert np.abs(a[:, :-1] - b[:, :-1]).max() > 1e-4


def test_prompt_mask_and_masked_mean():
  attn = jnp.asarray([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
  loss = jnp.asarray([[0, 0, 0, 1, 1], [0, 1, 0, 1, 0]])
  np.testing.assert_array_equal(prompt_mask(attn, loss), [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  x = jnp.arange(10.0).reshape(1, 5, 2)
  np.testing.assert_allclose(masked_mean(x, jnp.asarray([[0, 1, 1, 0, 0]])), [[3.0, 4.0]])


@pytest.mark.parametrize("name", ["hyper", "lora_instance"])
def test_cached_generation_equals_recomputation(name):
  cfg, codec, params = _model(name)
  model = codec.merge(_randomized(params))
  rng = np.random.default_rng(3)
  p = cfg.num_image_tokens
  prompts = [np.concatenate([[1], [IMAGE_TOKEN] * p, rng.integers(1, IMAGE_TOKEN, n)])
             for n in (3, 7)]
  pixels = rng.normal(size=(2, 28, 28, 3)).astype(np.float32)
  ids, mask = left_pad(prompts, 0, max(map(len, prompts)))
  tokens, logits = generate(model, ids, mask, pixels, max_new_tokens=4, return_logits=True)
  tokens = np.asarray(tokens)
  seq = np.concatenate([ids, tokens], axis=1)[:, :-1]
  seq_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)[:, :-1]
  guide = np.concatenate([mask, np.zeros_like(tokens)], axis=1)[:, :-1]  # the prompt only
  full = model(jnp.asarray(seq), jnp.asarray(pixels), jnp.asarray(seq_mask),
               dispatch="dropless", guide_mask=jnp.asarray(guide))[0]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, ids.shape[1] - 1:],
                             atol=1e-4, rtol=1e-4)


# (variant, stage preset, what must train)
TRAINING = [
    ("hyper", "projector", lambda n: n.startswith("projector.")),
    ("hyper", "projector_llm", lambda n: n.startswith(("projector.", "llm."))),
    ("lora_instance", "lora_experts_routers", lambda n: ".lora_" in n),
    ("lora_token", "lora_experts_routers", lambda n: ".lora_" in n),
    ("lora_instance", "lora_experts", lambda n: ".lora_" in n and ".router" not in n),
]


@pytest.mark.parametrize("name,preset,expected", TRAINING)
def test_variant_trains_its_parts_only(name, preset, expected, tmp_path):
  cfg, codec, params = _model(name)
  trainable = trainable_fn(preset)
  assert {n for n in params if trainable(n)} == {n for n in params
                                                 if expected(n) and not n.startswith("vision.")}
  state = train_and_checkpoint(codec, params, trainable, _batch(cfg), str(tmp_path / "final"),
                               lr=1e-2)
  # The adapters' zero-initialised halves moved: the experts now act.
  grown = [k for k in state.params if _is_extra(k) and any(z in k for z in _ZERO_INIT)]
  assert grown and all(np.abs(np.asarray(state.params[k])).max() > 0 for k in grown)


def test_instance_routed_lora_folds_into_a_dense_model():
  cfg, codec, params = _model("lora_instance")
  model = codec.merge(_randomized(params))
  batch = _batch(cfg)
  one = {k: v[:1] for k, v in batch.items()}
  guide_mask = prompt_mask(one["attention_mask"], one["loss_mask"])
  # The router span (the first user turn's content): the image and what follows it,
  # not the prompt's first token nor its last ones.
  router_mask = jnp.zeros_like(guide_mask).at[:, 1:L - 7].set(1)
  want = model(one["input_ids"], one["pixel_values"], one["attention_mask"],
               guide_mask=guide_mask, router_mask=router_mask)[0]
  other = model(one["input_ids"], one["pixel_values"], one["attention_mask"],
                guide_mask=guide_mask)[0]
  assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-4  # the span matters
  guide = instance_guide(model, one["input_ids"], one["pixel_values"], router_mask)[0]
  dense = merge_lora_experts(model, guide)
  assert dense.cfg.text.lora_moe is None
  assert not [k for k in ParamCodec(dense).names if ".lora_" in k]
  got = dense(one["input_ids"], one["pixel_values"], one["attention_mask"])[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  _, token_codec, token_params = _model("lora_token")
  token = token_codec.merge(token_params)
  with pytest.raises(ConfigError, match="cannot be folded"):
    merge_lora_experts(token, guide)
  # Awaker's stage I (one plain LoRA per projection) folds without a guide.
  single_cfg = dataclasses.replace(cfg, text=dataclasses.replace(
      cfg.text, lora_moe=dataclasses.replace(cfg.text.lora_moe, single=True)))
  single = VLM(single_cfg, rngs=nnx.Rngs(0))
  single = ParamCodec(single).merge(_randomized(ParamCodec(single).flatten(single)))
  want = single(one["input_ids"], one["pixel_values"], one["attention_mask"])[0]
  got = merge_lora_experts(single, None)(one["input_ids"], one["pixel_values"],
                                         one["attention_mask"])[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("change,match", [
    (dict(visual_expert=HYPER, projector="linear"), "visual_expert needs"),
    (dict(text=dataclasses.replace(LLAMA, language_expert=HyperExpertConfig(layers=(0,)))),
     "language_expert.layers"),
    (dict(text=dataclasses.replace(LLAMA, lora_moe=LoRAMoEConfig(targets=("lm_head",)))),
     "lora_moe.targets"),
    (dict(text=dataclasses.replace(LLAMA, lora_moe=LoRAMoEConfig(dropout=1.0))),
     "lora_moe.dropout"),
    (dict(text=dataclasses.replace(LLAMA, lora_moe=LoRAMoEConfig(top_k=5))), "top_k"),
])
def test_bad_variant_configs_name_the_field(change, match):
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(vlm_config(LLAMA), **change).validate()
