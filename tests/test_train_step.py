"""Sharded train step: same result on every mesh, frozen params untouched, clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.models.config import MoEConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import step as step_lib
from moe_vlm.train.optim import OptimConfig
from tests.tiny import IMAGE_TOKEN, LLAMA, vlm_config

TEXT = dataclasses.replace(LLAMA, num_layers=2)
MESHES = [(1, 1, 1, 1), (8, 1, 1, 1), (2, 2, 2, 1), (2, 1, 1, 4), (1, 2, 2, 2)]
# (data, fsdp, model, expert) meshes each dispatch is compared on, against one device:
# together they cover every axis, and each dispatch meets expert sharding (compiling
# every mesh for both would double the slowest test of the suite for no new layout).
MESHES_OF = {"dropless": [(2, 2, 2, 1), (1, 2, 2, 2)],
             "capacity": [(8, 1, 1, 1), (2, 1, 1, 4)]}
STEP = step_lib.StepConfig(optim=OptimConfig(learning_rate=1e-3, warmup_ratio=0.0,
                                             total_steps=10))


def _not_vision(name):
  return not name.startswith("vision.")


def _batch(cfg, b=8, l=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, IMAGE_TOKEN, (b, l))
  ids[::2, 2:2 + cfg.num_image_tokens] = IMAGE_TOKEN
  mask = np.ones((b, l), np.int32)
  mask[1, -3:] = 0
  return dict(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask),
              loss_mask=jnp.asarray(rng.integers(0, 2, (b, l)) * mask, jnp.int32),
              pixel_values=jnp.asarray(rng.normal(size=(b, 28, 28, 3)), jnp.float32))


def _setup(dispatch):
  cfg = vlm_config(TEXT, MoEConfig(dispatch=dispatch, capacity_factor=1.0))
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  # Host copies: every mesh gets fresh device buffers (the step donates its state).
  return cfg, codec, jax.tree.map(np.asarray, codec.flatten(model))


def _run(codec, params, batch, shape, trainable=_not_vision, cfg=STEP, steps=1):
  devices = jax.devices()[:int(np.prod(shape))]
  mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), devices)
  tx = step_lib.make_optimizer(cfg.optim)
  shardings = step_lib.state_shardings(codec, trainable, mesh, tx)
  state = step_lib.init_state(params, trainable, tx, shardings)
  fn = step_lib.jit_train_step(step_lib.make_train_step(codec, cfg, tx), mesh, shardings, batch)
  for _ in range(steps):
    state, metrics = fn(state, batch)
  return jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, metrics)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_every_mesh_gives_the_same_step(dispatch):
  cfg, codec, params = _setup(dispatch)
  batch = _batch(cfg)
  ref_state, ref = _run(codec, params, batch, MESHES[0])
  if dispatch == "capacity":
    assert ref["moe/dropped_fraction"].max() > 0  # the comparison covers real drops
  moved = max(np.abs(ref_state.params[k] - params[k]).max() for k in ref_state.params)
  assert moved > 1e-4  # the step really updated the parameters
  for shape in MESHES_OF[dispatch]:
    state, m = _run(codec, params, batch, shape)
    np.testing.assert_allclose(m["loss"], ref["loss"], atol=1e-5, err_msg=str(shape))
    np.testing.assert_allclose(m["aux_loss"], ref["aux_loss"], atol=1e-5)
    for k in ref_state.params:
      np.testing.assert_allclose(state.params[k], ref_state.params[k], atol=1e-5,
                                 err_msg=f"{shape} {k}")


def test_loss_is_masked_token_cross_entropy_plus_aux():
  cfg, codec, params = _setup("dropless")
  batch = _batch(cfg)
  _, m = _run(codec, params, batch, MESHES[0])
  model = codec.merge(params)
  logits, aux = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                      train=True)
  logits = np.asarray(logits, np.float64)[:, :-1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  tgt = np.asarray(batch["input_ids"])[:, 1:]
  w = np.asarray(batch["loss_mask"])[:, 1:]
  nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  np.testing.assert_allclose(m["loss"], (nll * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(m["aux_loss"], aux["aux_loss"], rtol=1e-5)
  assert m["targets"] == w.sum()


def test_frozen_parameters_stay_bit_identical():
  cfg, codec, params = _setup("dropless")
  only_moe = lambda k: ".mlp.experts." in k or ".mlp.router." in k
  state, _ = _run(codec, params, _batch(cfg), (2, 1, 1, 4), trainable=only_moe, steps=2)
  assert set(state.params) == {k for k in params if only_moe(k)}
  for k, v in state.frozen.items():
    assert np.array_equal(v, params[k]), k
  assert any(not np.array_equal(state.params[k], params[k]) for k in state.params)
  # Frozen parameters carry no optimizer state.
  opt_leaves = {x.shape for x in jax.tree.leaves(state.opt_state)}
  assert all(params[k].shape in opt_leaves for k in state.params)
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_train = sum(v.size for v in state.params.values())
  assert n_opt <= 2 * n_train + 8  # Adam's two moments (+ counters), nothing for frozen


def test_gradient_accumulation_matches_one_big_batch():
  cfg, codec, params = _setup("dropless")
  batch = _batch(cfg)
  # The load-balancing loss is a per-micro-batch statistic (as in DeepSpeed), so it is
  # switched off here: the cross-entropy gradient itself must accumulate exactly.
  step = dataclasses.replace(STEP, aux_loss_coef=0.0)
  s1, m1 = _run(codec, params, batch, (1, 1, 1, 1), cfg=step)
  s2, m2 = _run(codec, params, batch, (1, 1, 1, 1), cfg=dataclasses.replace(step, grad_accum=2))
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for k in s1.params:
    np.testing.assert_allclose(s2.params[k], s1.params[k], atol=1e-5, err_msg=k)


def test_empty_trainable_set_fails_loudly():
  _, codec, params = _setup("dropless")
  with pytest.raises(step_lib.EmptyTrainableSet, match="matched nothing"):
    step_lib.split_params(params, lambda k: "deepspeed_moe" in k)


def test_bad_meshes_raise_clear_errors():
  with pytest.raises(mesh_lib.MeshError, match="product of the axes"):
    mesh_lib.make_mesh({"data": 3, "model": 2})
  with pytest.raises(mesh_lib.MeshError, match="unknown"):
    mesh_lib.make_mesh({"tensor": 8})
  with pytest.raises(mesh_lib.MeshError, match="at most one axis"):
    mesh_lib.make_mesh({"data": -1, "fsdp": -1})
  assert dict(mesh_lib.make_mesh({"data": -1, "expert": 2}).shape) == {
      "data": 4, "fsdp": 1, "model": 1, "expert": 2}
  cfg = vlm_config(TEXT, MoEConfig(num_experts=4))
  with pytest.raises(mesh_lib.MeshError, match="num_experts=4 is not divisible"):
    mesh_lib.check_model_fits_mesh(cfg, mesh_lib.make_mesh({"data": 1, "expert": 8}))
  with pytest.raises(mesh_lib.MeshError, match="num_kv_heads=2 is not divisible"):
    mesh_lib.check_model_fits_mesh(cfg, mesh_lib.make_mesh({"data": 2, "model": 4}))
  with pytest.raises(mesh_lib.MeshError, match="global batch 6"):
    mesh_lib.check_model_fits_mesh(cfg, mesh_lib.make_mesh({"data": 8}), global_batch=6)
  odd = {"llm.w": jax.ShapeDtypeStruct((36, 64), jnp.float32)}
  with pytest.raises(mesh_lib.MeshError, match=r"parameter llm.w dim 0 \(embed=36\)"):
    mesh_lib.param_shardings({"llm.w": ("embed", "mlp")}, odd, mesh_lib.make_mesh({"fsdp": 8}))


def test_bf16_compute_keeps_fp32_params_and_optimizer_state():
  cfg, codec, params = _setup("dropless")
  bf16 = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, dtype="bfloat16"),
                             vision=dataclasses.replace(cfg.vision, dtype="bfloat16"))
  codec16 = ParamCodec(VLM(bf16, rngs=nnx.Rngs(0)))
  batch = _batch(cfg)
  _, ref = _run(codec, params, batch, (1, 1, 1, 1))
  state, m = _run(codec16, params, batch, (2, 2, 2, 1))
  assert all(v.dtype == np.float32 for v in state.params.values())
  assert all(x.dtype in (np.float32, np.int32) for x in jax.tree.leaves(state.opt_state))
  assert abs(float(m["loss"]) - float(ref["loss"])) < 0.05 * float(ref["loss"])
  assert float(m["loss"]) != float(ref["loss"])  # the compute really ran in bf16


def test_router_noise_comes_from_the_state_rng():
  cfg = vlm_config(TEXT, MoEConfig(dispatch="dropless", second_expert_noise="gumbel"))
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  params = jax.tree.map(np.asarray, codec.flatten(model))
  tx = step_lib.make_optimizer(STEP.optim)
  fn = jax.jit(step_lib.make_train_step(codec, STEP, tx))
  batch = _batch(cfg)
  runs = [fn(step_lib.init_state(params, _not_vision, tx, seed=s), batch)[1]["loss"]
          for s in (0, 0, 1)]
  assert runs[0] == runs[1]  # same key, same sampled second experts
  assert runs[0] != runs[2]  # another key samples other second experts


def test_expert_parallel_step_uses_all_to_all_and_shards_experts():
  cfg = vlm_config(TEXT, MoEConfig(dispatch="capacity", capacity_factor=1.0, group_size=1,
                                   ep_impl="shard_map"))
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  params = jax.tree.map(np.asarray, codec.flatten(model))
  mesh = mesh_lib.make_mesh({"data": 2, "expert": 4})
  tx = step_lib.make_optimizer(STEP.optim)
  shardings = step_lib.state_shardings(codec, _not_vision, mesh, tx)
  state = step_lib.init_state(params, _not_vision, tx, shardings)
  batch = _batch(cfg)
  fn = step_lib.jit_train_step(step_lib.make_train_step(codec, STEP, tx), mesh, shardings, batch)
  hlo = fn.lower(state, batch).compile().as_text()
  assert "all-to-all" in hlo
  w = state.params["llm.layers.0.mlp.experts.wi_gate"]
  assert w.addressable_shards[0].data.nbytes * 4 == w.nbytes  # 1/(expert axis) per device
  # The expert-parallel step computes the same update as the single-device one.
  ref_state, ref = _run(codec, params, batch, MESHES[0])
  new_state, m = fn(state, batch)
  np.testing.assert_allclose(float(m["loss"]), float(ref["loss"]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(new_state.params["llm.layers.0.mlp.experts.wo"]),
                             ref_state.params["llm.layers.0.mlp.experts.wo"], atol=1e-5)
