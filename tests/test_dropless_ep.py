"""Dropless expert parallelism (moe.ep_impl="shard_map", moe.dispatch="dropless").

Each device routes its tokens, sorts them by expert, exchanges them over the `expert`
axis (`jax.lax.ragged_all_to_all` on TPU/GPU; on CPU its padded all_to_all emulation,
`expert_parallel.ragged_all_to_all_padded`), runs the grouped matmul on its local
experts and sends the results back. References:
- the same layer on one device with no mesh (values, losses, statistics, gradients
  w.r.t. the input, the expert weights and the router), on 8 simulated devices with
  expert = 2, 4, 8 combined with data / fsdp, top-1 and top-2, uneven loads with an
  expert that gets no token and a device whose tokens all go to one shard;
- a numpy loop of the ragged exchange as `jax.lax.ragged_all_to_all` documents it,
  for the padded emulation (values and gradients);
- the routing itself for the exchange plan: every row reaches the device and local
  expert of its expert, and comes back to its place.
"""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from moe_vlm.models.config import ConfigError, MoEConfig
from moe_vlm.models.moe import IMAGE, PAD, TEXT, MoE
from moe_vlm.models.params import ParamCodec
from moe_vlm.parallel import expert_parallel as ep_lib
from moe_vlm.parallel import mesh as mesh_lib
from tests.test_expert_parallel import emulated_ragged_all_to_all

D, F, E = 16, 32, 8
B, L = 16, 8          # 2 sequences per device on 8 devices
TOL = 1e-5
DEAD = 5              # the expert no token is routed to
HOT = 2               # the first HOT sequences (device 0's) all go to experts 0 and 1

# (data, fsdp, model, expert) -> expert kind: gated (SwiGLU) or plain with biases
# (the biases are indexed by each row's local expert).
MESHES = {
    "d4e2": ((4, 1, 1, 2), "gated"),
    "d2f2e2": ((2, 2, 1, 2), "plain"),
    "f2e4": ((1, 2, 1, 4), "plain"),
    "d2e4": ((2, 1, 1, 4), "gated"),
    "e8": ((1, 1, 1, 8), "gated"),
}


def mesh_of(shape):
  return mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)))


# ------------------------------------------------------------------ the layer


def inputs():
  """Tokens with a constant feature 0 (router row 0 acts as a logit bias) and a hot
  feature 1 on the first device's sequences."""
  rng = np.random.default_rng(11)
  x = (rng.normal(size=(B, L, D)) * 0.5).astype(np.float32)
  x[..., 0] = 1.0
  x[..., 1] = 0.0
  x[:HOT, :, 1] = 1.0
  modality = rng.choice([PAD, TEXT, IMAGE], size=(B, L)).astype(np.int32)
  cotangent = rng.normal(size=(B, L, D)).astype(np.float32)
  return x, modality, cotangent


def router_weights() -> np.ndarray:
  rng = np.random.default_rng(12)
  w = rng.normal(size=(D, E)) / math.sqrt(D)
  w[0] = [0.8, 0.4, 0.0, 0.0, 0.0, -30.0, 0.2, 0.0]  # skewed; expert DEAD never chosen
  w[1] = [6.0, 5.0] + [-3.0] * (E - 2)               # hot tokens: experts 0 and 1
  return w.astype(np.float32)


def build(k: int, kind: str, **kw) -> MoE:
  cfg = MoEConfig(num_experts=E, top_k=k, dispatch="dropless", **kw)
  layer = MoE(D, F, cfg, kind=kind, activation_name="silu" if kind == "gated" else "gelu_new",
              use_bias=kind == "plain", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(13)
  for name in ("wi_gate", "wi_up", "wi", "wo", "wi_bias", "wo_bias"):
    p = getattr(layer.experts, name, None)
    if p is not None:
      fan_in = p.shape[-2] if p.ndim == 3 else 4
      p[...] = jnp.asarray(rng.normal(size=p.shape) / math.sqrt(fan_in), jnp.float32)
  layer.router.kernel[...] = jnp.asarray(router_weights())
  return layer


def check_no_near_ties(k: int) -> None:
  """float32 rounding (one device vs a shard) must not be able to flip a choice."""
  x, _, _ = inputs()
  logits = x.reshape(-1, D).astype(np.float64) @ router_weights().astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = -np.sort(-probs, axis=-1)[:, :k + 1]
  assert np.min(top[:, :-1] - top[:, 1:]) > 1e-5, "near-tie in the test data"


def loss_and_grads(layer: MoE):
  """f(params, x, modality) -> ((loss, (y, stats)), (d params, d x))."""
  codec = ParamCodec(layer)
  _, _, cotangent = inputs()

  def loss(params, x, modality):
    y, stats = codec.merge(params)(x, modality, train=True, dispatch="dropless")
    return jnp.sum(y * cotangent) + stats["aux_loss"] + stats["z_loss"], (y, stats)

  return codec, jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


@functools.cache
def reference(k: int, kind: str):
  """The dropless layer on one device, no mesh."""
  layer = build(k, kind)
  codec, f = loss_and_grads(layer)
  x, modality, _ = inputs()
  return jax.tree.map(np.asarray, jax.jit(f)(codec.flatten(layer), x, modality))


def run_sharded(mesh, k: int, kind: str, **kw):
  """The shard_map layer with params and batch placed as the train step places them;
  returns the results and the compiled (per-device) HLO."""
  layer = build(k, kind, ep_impl="shard_map", **kw)
  codec, f = loss_and_grads(layer)
  x, modality, _ = inputs()
  params = jax.device_put(codec.flatten(layer),
                          mesh_lib.param_shardings(codec.logical_axes, codec.shapes, mesh))
  x, modality = (jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim)) for a in (x, modality))
  with mesh_lib.activation_sharding(mesh):
    compiled = jax.jit(f).lower(params, x, modality).compile()
  return jax.tree.map(np.asarray, compiled(params, x, modality)), compiled.as_text()


def assert_same(got, want, tol: float = TOL):
  (loss, (y, stats)), (grads, dx) = got
  (loss0, (y0, stats0)), (grads0, dx0) = want
  np.testing.assert_allclose(y, y0, atol=tol, rtol=tol)
  np.testing.assert_allclose(loss, loss0, atol=1e-4, rtol=tol)
  assert stats.keys() == stats0.keys()
  for name in stats0:
    np.testing.assert_allclose(stats[name], stats0[name], atol=tol, rtol=tol, err_msg=name)
  np.testing.assert_allclose(dx, dx0, atol=tol, rtol=tol, err_msg="d input")
  assert grads.keys() == grads0.keys()
  for name in grads0:
    np.testing.assert_allclose(grads[name], grads0[name], atol=tol, rtol=tol, err_msg=name)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_emulated_exchange_equals_one_device(mesh_name, k):
  shape, kind = MESHES[mesh_name]
  check_no_near_ties(k)
  want = reference(k, kind)
  stats0, (grads0, _) = want[0][1][1], want[1]
  # The case is uneven: one expert gets nothing, expert 0 more than twice its share,
  # and the hot device sends all its rows to the shard(s) of experts 0 and 1.
  counts = stats0["tokens_per_expert"]
  assert counts[DEAD] == 0 and counts[0] > 2 * counts.mean(), counts
  for name, g in grads0.items():
    if name.startswith("experts."):
      assert np.all(g[DEAD] == 0) and np.abs(g[0]).max() > 0, name
  mesh = mesh_of(shape)
  got, hlo = run_sharded(mesh, k, kind)
  assert_same(got, want)
  # "auto" picked the padded emulation on CPU (the ragged collective on TPU/GPU) ...
  assert "all-to-all" in hlo
  ragged = ep_lib.resolve_exchange("auto", mesh) == "ragged"
  assert ("ragged-all-to-all" in hlo) == ragged == (jax.default_backend() != "cpu")
  # ... and the experts stay sharded: each device holds and computes E/ep of them,
  # no program array holds all E experts' weights.
  ep = mesh.shape["expert"]
  assert f"f32[{E // ep},{D},{F}]" in hlo and f"f32[{E // ep},{F},{D}]" in hlo
  assert f"f32[{E},{D},{F}]" not in hlo and f"f32[{E},{F},{D}]" not in hlo


def test_expert_weights_and_buffers_per_device():
  """In the traced shard_map body every expert weight is [E/ep, ...] and the receive
  buffer is ep * n * min(k, E/ep) rows."""
  mesh = mesh_of(MESHES["d2e4"][0])
  ep, k = 4, 2
  layer = build(k, "gated", ep_impl="shard_map")
  codec, f = loss_and_grads(layer)
  x, modality, _ = inputs()
  with mesh_lib.activation_sharding(mesh):
    jaxpr = jax.make_jaxpr(f)(codec.flatten(layer), x, modality)
  bodies = list(shard_map_bodies(jaxpr.jaxpr))
  assert len(bodies) == 2, "the forward and the backward shard_map"
  n = B * L // 8
  for body in bodies:
    shapes = {tuple(v.aval.shape) for v in body.invars}
    assert (E // ep, D, F) in shapes and (E // ep, F, D) in shapes
    assert (E, D, F) not in shapes and (E, F, D) not in shapes
    assert f"f32[{ep * n * min(k, E // ep)},{D}]" in str(body)


def shard_map_bodies(jaxpr):
  """The bodies of every shard_map in a jaxpr, nested calls included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      yield eqn.params["jaxpr"]
      continue
    for v in eqn.params.values():
      inner = getattr(v, "jaxpr", None)
      if inner is not None and hasattr(inner, "eqns"):
        yield from shard_map_bodies(inner)


# ------------------------------------------------------------ the exchange itself


def line_mesh(n: int = 8):
  return jax.make_mesh((n,), ("x",), axis_types=(AxisType.Auto,))


def np_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets):
  """The exchange as `jax.lax.ragged_all_to_all`'s documentation states it, per device:
  operand [ep, N, ...], output [ep, M, ...], offsets and sizes [ep (sender), ep (peer)]."""
  out = output.copy()
  ep = operand.shape[0]
  for i in range(ep):
    for j in range(ep):
      s, a, b = send_sizes[i, j], input_offsets[i, j], output_offsets[i, j]
      out[j, b:b + s] = operand[i, a:a + s]
  return out


def ragged_case(seed: int, ep: int = 8, n_in: int = 48, n_out: int = 56, max_send: int = 5):
  """Random sizes (zeros included: a device sends nothing, one receives nothing) and
  layouts with gaps and out of peer order on both sides."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(0, max_send + 1, size=(ep, ep))
  sizes[sizes == 1] = 0
  sizes[3, :] = 0
  sizes[:, 6] = 0
  sizes[0, 1] = max_send

  def layout(chunks, rows):
    """Offsets of chunks placed in a random order with random gaps within `rows`."""
    offsets, at = np.zeros(len(chunks), np.int32), 0
    slack = rows - chunks.sum()
    for c in rng.permutation(len(chunks)):
      at += rng.integers(0, slack // len(chunks) + 1)
      offsets[c], at = at, at + chunks[c]
    assert at <= rows
    return offsets

  input_offsets = np.stack([layout(sizes[i], n_in) for i in range(ep)])
  placed = np.stack([layout(sizes[:, j], n_out) for j in range(ep)])  # [dst, src]
  output_offsets = placed.T                                           # [src, dst]
  operand = rng.normal(size=(ep, n_in, 3, 2)).astype(np.float32)
  output = rng.normal(size=(ep, n_out, 3, 2)).astype(np.float32)
  ct = rng.normal(size=(ep, n_out, 3, 2)).astype(np.float32)
  return sizes.astype(np.int32), input_offsets, output_offsets, operand, output, ct


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_emulation_matches_numpy_ragged_exchange(seed):
  ep, max_send = 8, 5
  sizes, in_off, out_off, operand, output, ct = ragged_case(seed, ep, max_send=max_send)
  want = np_ragged_all_to_all(operand, output, in_off, sizes, out_off)
  recv_sizes = sizes.T  # device j receives sizes[i, j] from each i
  mesh = line_mesh(ep)
  flat = lambda a: jnp.asarray(a.reshape((-1,) + a.shape[2:]))

  def run(max_send):
    def body(operand, output, in_off, send, out_off, recv, ct):
      y = ep_lib.ragged_all_to_all_padded(operand, output, in_off, send, out_off, recv,
                                          axis_name="x", max_send=max_send)
      return y, jnp.sum(y * ct)[None]

    def loss(operand, output, *rest):
      y, l = jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 7,
                           out_specs=(P("x"), P("x")))(operand, output, *rest)
      return jnp.sum(l), y

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return jax.tree.map(np.asarray, f(flat(operand), flat(output), flat(in_off), flat(sizes),
                                      flat(out_off), flat(recv_sizes), flat(ct)))

  for bound in (max_send, None):  # None: one operand-sized slot per peer
    (_, y), (d_operand, d_output) = run(bound)
    np.testing.assert_array_equal(y.reshape(want.shape), want)
    # Gradients: each sent row gets the cotangent of the row it was written to;
    # `output` keeps the cotangent where nothing was written.
    want_dop, want_dout = np.zeros_like(operand), ct.copy()
    for i in range(ep):
      for j in range(ep):
        s, a, b = sizes[i, j], in_off[i, j], out_off[i, j]
        want_dop[i, a:a + s] = ct[j, b:b + s]
        want_dout[j, b:b + s] = 0
    np.testing.assert_array_equal(d_operand.reshape(operand.shape), want_dop)
    np.testing.assert_array_equal(d_output.reshape(output.shape), want_dout)


def test_padded_emulation_needs_one_slice_per_peer():
  mesh = line_mesh(8)
  z = jnp.zeros((8 * 4,), jnp.int32)
  body = lambda o, i: ep_lib.ragged_all_to_all_padded(o, o, i, i, i, i, axis_name="x")
  with pytest.raises(ValueError, match="one slice per peer"):
    jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x"))(
        jnp.zeros((8 * 4, 2)), z)


@pytest.mark.parametrize("exchange", ["padded", "ragged_emulated"])
@pytest.mark.parametrize("shape", [(2, 1, 1, 4), (1, 1, 1, 8), (4, 1, 1, 2)])
def test_exchange_delivers_rows_to_their_expert_and_back(shape, exchange, monkeypatch):
  """`dropless_exchange` with a stand-in for the experts that stamps each row with the
  (device, local expert) it reached: every row meets its own expert, every local
  expert sees the rows of its whole expert group, and each row returns to its place."""
  if exchange == "ragged_emulated":  # the ragged path, the test's own emulation behind it
    monkeypatch.setitem(ep_lib.COLLECTIVES, "ragged", lambda *a, axis_name, max_send:
                        emulated_ragged_all_to_all(*a, axis_name=axis_name))
    name = "ragged"
  else:
    name = "padded"
  mesh = mesh_of(shape)
  ep = mesh.shape["expert"]
  experts_per_shard, k, n = E // ep, 2, 12
  rng = np.random.default_rng(sum(shape))
  # Top-2 choices per token, skewed, expert DEAD never chosen, device 0 all on shard 0.
  p = np.array([8, 4, 2, 2, 1, 0, 2, 1], np.float64)
  idx = np.stack([rng.choice(E, size=k, replace=False, p=p / p.sum()) for _ in range(8 * n)])
  idx[:n] = np.arange(k) % experts_per_shard if experts_per_shard >= k else idx[:n]
  rows = rng.normal(size=(8 * n * k, 4)).astype(np.float32)

  def body(idx, rows):
    sort = jnp.argsort(idx.reshape(-1), stable=True)
    sorted_expert = idx.reshape(-1)[sort]
    group_sizes = jnp.bincount(idx.reshape(-1), length=E).astype(jnp.int32)
    shard = jax.lax.axis_index("expert")

    def stamp(x, sizes, local):
      valid = jnp.arange(x.shape[0]) < jnp.sum(sizes)
      expert = (shard * experts_per_shard + local).astype(x.dtype)
      seen = jnp.zeros((experts_per_shard,), jnp.int32).at[local].add(valid.astype(jnp.int32))
      return jnp.where(valid[:, None], x.at[:, 0].set(expert), -1.0), sizes, seen

    captured = {}

    def grouped(x, sizes, local):
      out, captured["sizes"], captured["seen"] = stamp(x, sizes, local)
      return out

    run = ep_lib.dropless_exchange(grouped, num_experts=E, experts_per_shard=experts_per_shard,
                                   top_k=k, exchange=name)
    back = run(rows[sort], group_sizes, sorted_expert)
    # Every device's local group sizes = its experts' counts over the expert group.
    group_total = jax.lax.psum(group_sizes, "expert").reshape(ep, experts_per_shard)[shard]
    ok = (jnp.all(captured["sizes"] == group_total) & jnp.all(captured["seen"] == group_total))
    return back, sorted_expert, rows[sort], ok[None]

  spec = P(mesh_lib.BATCH_AXES)
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec),
                            out_specs=(spec, spec, spec, spec)))
  back, sorted_expert, sent, ok = map(np.asarray, f(jnp.asarray(idx, jnp.int32),
                                                     jnp.asarray(rows)))
  assert ok.all()
  np.testing.assert_array_equal(back[:, 0], sorted_expert.astype(np.float32))
  np.testing.assert_array_equal(back[:, 1:], sent[:, 1:])


# ------------------------------------------------------------ selection and config


def test_exchange_selection():
  cpu = mesh_of((2, 1, 1, 4))
  assert ep_lib.resolve_exchange("auto", cpu) == "padded"
  for platform in ("tpu", "gpu"):
    fake = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))
    assert ep_lib.resolve_exchange("auto", fake) == "ragged"
    assert ep_lib.resolve_exchange("padded", fake) == "padded"
  assert ep_lib.resolve_exchange("ragged", cpu) == "ragged"
  with pytest.raises(ValueError, match="ep_exchange='nccl'"):
    ep_lib.resolve_exchange("nccl", cpu)
  assert MoEConfig().ep_exchange == "auto"
  with pytest.raises(ConfigError, match="ep_exchange"):
    MoEConfig(ep_exchange="nccl").validate(4)  # type: ignore[arg-type]


def test_ragged_exchange_is_what_accelerators_run():
  """ep_exchange="ragged" (auto on TPU/GPU) traces to ragged_all_to_all in the forward
  and backward programs, with gradients w.r.t. the input too (XLA:CPU cannot compile
  it; tests/test_expert_parallel.py runs it with the collective emulated)."""
  mesh = mesh_of((1, 1, 1, 8))
  layer = build(2, "gated", ep_impl="shard_map", ep_exchange="ragged")
  codec, f = loss_and_grads(layer)
  x, modality, _ = inputs()
  with mesh_lib.activation_sharding(mesh):
    jaxpr = str(jax.make_jaxpr(f)(codec.flatten(layer), x, modality))
  # forward: there and back; backward: the transposes of both
  assert jaxpr.count("ragged_all_to_all") == 4


# ------------------------------------------------------------ on an accelerator


@pytest.mark.skipif(jax.default_backend() == "cpu",
                    reason="the real ragged_all_to_all needs TPU/GPU: run with "
                    "JAX_PLATFORMS='' pytest tests/test_dropless_ep.py -k accelerator")
@pytest.mark.parametrize("k", [1, 2])
def test_ragged_exchange_on_accelerator(k):
  """The real `jax.lax.ragged_all_to_all` (ep_exchange="auto" = ragged off CPU) and the
  padded emulation against the one-device layer, on all local accelerator devices:
  expert = gcd(devices, E), the rest data. With one device the exchange is trivial and
  this checks the lowering and ragged_dot on the exchange buffer."""
  n = jax.device_count()
  if B % n:
    pytest.skip(f"batch {B} is not divisible by {n} devices")
  ep = math.gcd(n, E)
  mesh = mesh_of((n // ep, 1, 1, ep))
  want = reference(k, "gated")
  tol = 1e-4  # reductions run in other orders on the accelerator
  got, hlo = run_sharded(mesh, k, "gated")
  assert_same(got, want, tol)
  if ep > 1:
    assert "ragged-all-to-all" in hlo
  got, hlo = run_sharded(mesh, k, "gated", ep_exchange="padded")
  assert_same(got, want, tol)
  assert "ragged-all-to-all" not in hlo
