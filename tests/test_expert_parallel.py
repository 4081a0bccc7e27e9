"""Expert parallelism through shard_map + all-to-all (moe_vlm.parallel.expert_parallel).

The reference is the same MoE layer on one device with no mesh: under every mesh the
shard_map path must give the same outputs, losses, routing statistics and gradients
(same groups, capacities and drops), only float rounding apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_vlm.models.config import ConfigError, MoEConfig
from moe_vlm.models.moe import IMAGE, PAD, TEXT, MoE
from moe_vlm.models.params import ParamCodec
from moe_vlm.parallel import expert_parallel as ep_lib
from moe_vlm.parallel import mesh as mesh_lib

D, F, E, K = 16, 32, 4, 2
B, L = 16, 8
TOL = 1e-5

# (data, fsdp, model, expert): the expert axis with 4 and 2 shards, with pure data and
# fsdp batch axes, and with a model axis (replicated expert compute).
MESHES = {
    "d2e4": (2, 1, 1, 4),
    "f2e4": (1, 2, 1, 4),
    "d4e2": (4, 1, 1, 2),
    "f2m2e2": (1, 2, 2, 2),
}
# mesh -> (expert kind, moe.group_size): gated and plain-with-bias experts, one and
# two sequences per routing group (one or more groups per device).
CASES = {
    "d2e4": ("gated", 1),
    "f2e4": ("gated", 2),
    "d4e2": ("plain", 1),
    "f2m2e2": ("plain", 2),
}


def mesh_of(name: str):
  return mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, MESHES[name])))


def moe_config(group_size: int = 1, **kw) -> MoEConfig:
  # capacity_factor 1.0 with a skewed router: groups really drop tokens.
  return MoEConfig(num_experts=E, top_k=K, capacity_factor=1.0, group_size=group_size, **kw)


def build(cfg: MoEConfig, kind: str) -> MoE:
  """A layer with O(1) activations and a router biased towards expert 0."""
  use_bias = kind == "plain"
  layer = MoE(D, F, cfg, kind=kind, activation_name="silu" if kind == "gated" else "gelu_new",
              use_bias=use_bias, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(7)
  for name in ("wi_gate", "wi_up", "wi", "wo", "wi_bias", "wo_bias"):
    p = getattr(layer.experts, name, None)
    if p is not None:
      fan_in = p.shape[-2] if p.ndim == 3 else 4
      p[...] = jnp.asarray(rng.normal(size=p.shape) / math.sqrt(fan_in), jnp.float32)
  router = rng.normal(size=(D, E)) / math.sqrt(D)
  router[:, 0] += 0.5
  layer.router.kernel[...] = jnp.asarray(router, jnp.float32)
  return layer


def inputs():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(B, L, D)).astype(np.float32) + 0.3  # shifted: skews the router
  modality = rng.choice([PAD, TEXT, IMAGE], size=(B, L)).astype(np.int32)
  cotangent = rng.normal(size=(B, L, D)).astype(np.float32)
  return x, modality, cotangent


def loss_and_grads(layer: MoE, dispatch: str):
  """f(params, x, modality) -> ((scalar, (y, stats)), grads), over a flat param dict."""
  codec = ParamCodec(layer)
  _, _, cotangent = inputs()

  def loss(params, x, modality):
    y, stats = codec.merge(params)(x, modality, train=True, dispatch=dispatch)
    return jnp.sum(y * cotangent) + stats["aux_loss"] + stats["z_loss"], (y, stats)

  return codec, jax.value_and_grad(loss, has_aux=True)


@functools.cache
def reference(kind: str, dispatch: str, group_size: int):
  """The layer on one device, no mesh (the GSPMD code path)."""
  layer = build(moe_config(group_size), kind)
  codec, f = loss_and_grads(layer, dispatch)
  x, modality, _ = inputs()
  out = jax.jit(f)(codec.flatten(layer), x, modality)
  return jax.tree.map(np.asarray, out)


def run_sharded(mesh, kind: str, dispatch: str, group_size: int):
  """The shard_map layer, params and batch placed as the train step places them.

  Returns the results and the compiled HLO text (one compilation per configuration).
  """
  layer = build(moe_config(group_size, ep_impl="shard_map"), kind)
  codec, f = loss_and_grads(layer, dispatch)
  x, modality, _ = inputs()
  shard = mesh_lib.param_shardings(codec.logical_axes, codec.shapes, mesh)
  params = jax.device_put(codec.flatten(layer), shard)
  x, modality = (jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim)) for a in (x, modality))
  # A fresh jit per mesh: `activation_sharding` is read at trace time, not a cache key.
  with mesh_lib.activation_sharding(mesh):
    compiled = jax.jit(f).lower(params, x, modality).compile()
  out = compiled(params, x, modality)
  return jax.tree.map(np.asarray, out), compiled.as_text()


def assert_same(got, want):
  (loss, (y, stats)), grads = got
  (loss0, (y0, stats0)), grads0 = want
  np.testing.assert_allclose(y, y0, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(loss, loss0, atol=1e-4, rtol=TOL)
  assert stats.keys() == stats0.keys()
  for name in stats0:
    np.testing.assert_allclose(stats[name], stats0[name], atol=TOL, rtol=TOL, err_msg=name)
  assert grads.keys() == grads0.keys()
  for name in grads0:
    np.testing.assert_allclose(grads[name], grads0[name], atol=TOL, rtol=TOL, err_msg=name)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_shard_map_matches_single_device(mesh_name, dispatch):
  kind, group_size = CASES[mesh_name]
  want = reference(kind, dispatch, group_size)
  if dispatch == "capacity":
    dropped = want[0][1][1]["dropped_fraction"]
    assert 0.02 < dropped < 0.5, f"the case must really drop tokens, dropped {dropped}"
  got, hlo = run_sharded(mesh_of(mesh_name), kind, dispatch, group_size)
  assert_same(got, want)
  # The exchange is explicit: the compiled program holds the all-to-alls.
  assert "all-to-all" in hlo


def test_gspmd_default_and_no_mesh_fallback():
  assert MoEConfig().ep_impl == "gspmd"
  with pytest.raises(ConfigError, match="ep_impl"):
    MoEConfig(ep_impl="alltoall").validate(4)
  # Without a mesh the shard_map setting runs the ordinary path.
  layer = build(moe_config(2, ep_impl="shard_map"), "gated")
  x, modality, _ = inputs()
  y, stats = jax.jit(lambda x: layer(x, modality, train=True, dispatch="capacity"))(x)
  (_, (y0, stats0)), _ = reference("gated", "capacity", 2)
  np.testing.assert_allclose(y, y0, atol=TOL, rtol=TOL)


# ------------------------------------------------------ ragged exchange (emulated)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` as documented, from dense all-to-alls (XLA:CPU lacks it).

  One slice per peer: slice i of `operand` goes to peer i, written there at
  `output_offsets[i]`. Written independently of the library's emulation.
  """
  n = operand.shape[0]
  pos = jnp.arange(n)
  take = jnp.take(operand, input_offsets[:, None] + pos[None], axis=0, mode="fill",
                  fill_value=0)                                     # [peers, n, ...]
  mask = (pos[None] < send_sizes[:, None]).reshape(take.shape[:2] + (1,) * (take.ndim - 2))
  recv = jax.lax.all_to_all(jnp.where(mask, take, 0), axis_name, 0, 0, tiled=True)
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  target = jnp.where(pos[None] < recv_sizes[:, None], where[:, None] + pos[None],
                     output.shape[0])
  return output.at[target.reshape(-1)].set(recv.reshape((-1,) + recv.shape[2:]), mode="drop")


@pytest.mark.parametrize("mesh_name", ["d2e4", "f2m2e2"])
def test_ragged_exchange_offsets(mesh_name, monkeypatch):
  """The `ep_exchange="ragged"` dropless path: its program holds ragged_all_to_all
  (forward and backward), and with the collective emulated it matches too."""
  kind, _ = CASES[mesh_name]
  mesh = mesh_of(mesh_name)
  layer = build(moe_config(ep_impl="shard_map", ep_exchange="ragged"), kind)
  codec = ParamCodec(layer)
  x, _, cotangent = inputs()

  def loss(params, x):
    y, stats = codec.merge(params)(x, train=True, dispatch="dropless")
    return jnp.sum(y * cotangent) + stats["aux_loss"] + stats["z_loss"], y

  f = jax.value_and_grad(loss, has_aux=True)
  with mesh_lib.activation_sharding(mesh):
    jaxpr = str(jax.make_jaxpr(f)(codec.flatten(layer), x))
  assert "ragged_all_to_all" in jaxpr
  emulated = lambda *a, axis_name, max_send: emulated_ragged_all_to_all(*a, axis_name=axis_name)
  monkeypatch.setitem(ep_lib.COLLECTIVES, "ragged", emulated)
  with mesh_lib.activation_sharding(mesh):
    # A new function: make_jaxpr shares jit's trace cache, which holds the real collective.
    (_, y), grads = jax.jit(lambda p, x: f(p, x))(codec.flatten(layer), x)
  (_, (y0, _)), grads0 = reference(kind, "dropless", 1)
  np.testing.assert_allclose(y, y0, atol=TOL, rtol=TOL)
  for name in grads0:
    np.testing.assert_allclose(grads[name], grads0[name], atol=TOL, rtol=TOL, err_msg=name)


# ------------------------------------------------------------ layout and errors


@pytest.mark.parametrize("mesh_name", ["d2e4", "f2m2e2"])
def test_expert_weights_are_split_over_the_expert_axis(mesh_name):
  """Rule ("expert", "embed", "mlp") -> P("expert", "fsdp", "model"): each device holds
  1/expert of the experts, further split by fsdp (embed) and model (mlp)."""
  mesh = mesh_of(mesh_name)
  codec = ParamCodec(build(moe_config(ep_impl="shard_map"), "gated"))
  name = "experts.wi_gate"
  shard = mesh_lib.param_shardings(codec.logical_axes, codec.shapes, mesh)[name]
  assert shard.spec == P("expert", "fsdp", "model")
  arr = jax.device_put(np.zeros(codec.shapes[name].shape, np.float32), shard)
  ways = mesh.shape["expert"] * mesh.shape["fsdp"] * mesh.shape["model"]
  assert arr.addressable_shards[0].data.nbytes * ways == arr.nbytes
  if mesh_name == "d2e4":
    assert arr.addressable_shards[0].data.nbytes * 4 == arr.nbytes


def trace(mesh_shape, cfg: MoEConfig, batch: int = B, dispatch: str = "capacity"):
  """Trace the layer under a mesh (errors are raised while tracing)."""
  layer = build(cfg, "gated")
  mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, mesh_shape)))
  x = jax.ShapeDtypeStruct((batch, L, D), jnp.float32)
  with mesh_lib.activation_sharding(mesh):
    jax.eval_shape(lambda x: layer(x, train=True, dispatch=dispatch), x)


def test_errors():
  sm = functools.partial(moe_config, ep_impl="shard_map")
  with pytest.raises(ValueError, match="needs moe.group_size"):
    trace((2, 1, 1, 4), dataclasses.replace(sm(), group_size=None))
  with pytest.raises(ValueError, match="per-device batch of 2 .*group_size=4"):
    trace((2, 1, 1, 4), sm(4))
  with pytest.raises(mesh_lib.MeshError, match="num_experts=4 is not divisible by the expert"):
    trace((1, 1, 1, 8), sm(1))
  with pytest.raises(mesh_lib.MeshError, match="batch of 12 sequences"):
    trace((2, 1, 1, 4), sm(1), batch=12, dispatch="dropless")
  # Dropless has no groups: group_size is not needed.
  trace((2, 1, 1, 4), dataclasses.replace(sm(), group_size=None), dispatch="dropless")
