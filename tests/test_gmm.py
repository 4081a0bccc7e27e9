"""The blocked grouped matmul (moe_vlm.models.gmm) and its use by the MoE layer.

References: a float64 numpy loop over groups (forward, and the analytic gradients
dlhs = dout @ rhs[g]^T, drhs[e] = lhs_e^T @ dout_e), and `jax.lax.ragged_dot` with
its own autodiff. The layer with gmm_impl="blocked" must equal gmm_impl="ragged_dot",
with and without expert parallelism.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.models.config import ConfigError, MoEConfig
from moe_vlm.models.gmm import gmm, grouped_matmul, resolve_impl, tgmm
from moe_vlm.models.moe import MoE
from moe_vlm.parallel import mesh as mesh_lib
from tests import test_expert_parallel as ep_test

N, K, M, E = 37, 6, 5, 4
TOL = 1e-5
# Zero-size groups first, last and in the middle; sums below N (rows left over, which
# must give zeros) and above N (the last groups cut off at the last row).
GROUP_SIZES = [
    [10, 0, 20, 7],
    [0, 37, 0, 0],
    [0, 0, 0, 37],
    [5, 0, 3, 0],
    [0, 0, 0, 0],
    [1, 1, 1, 1],
    [30, 30, 0, 0],
    [9, 9, 9, 9],
]
BLOCKS = [1, 4, 8, 64]  # 64 > N: one block of N rows per group


def np_gmm(lhs, rhs, gs):
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for e, g in enumerate(gs):
    end = min(start + g, lhs.shape[0])
    out[start:end] = lhs[start:end].astype(np.float64) @ rhs[e].astype(np.float64)
    start = end
  return out


def np_grads(lhs, rhs, gs, dout):
  """Analytic gradients of sum(gmm(lhs, rhs) * dout)."""
  dlhs, drhs = np.zeros(lhs.shape), np.zeros(rhs.shape)
  start = 0
  for e, g in enumerate(gs):
    end = min(start + g, lhs.shape[0])
    x, d = lhs[start:end].astype(np.float64), dout[start:end].astype(np.float64)
    dlhs[start:end] = d @ rhs[e].T.astype(np.float64)
    drhs[e] = x.T @ d
    start = end
  return dlhs, drhs


@pytest.fixture(scope="module")
def operands():
  rng = np.random.default_rng(0)
  lhs = rng.normal(size=(N, K)).astype(np.float32)
  rhs = rng.normal(size=(E, K, M)).astype(np.float32)
  dout = rng.normal(size=(N, M)).astype(np.float32)
  return lhs, rhs, dout


@functools.cache
def compiled(block: int):
  """jit-compiled forward and gradients for one block size (group sizes are traced)."""
  def grads(f):
    return jax.jit(jax.grad(lambda l, r, g, d: jnp.sum(f(l, r, g) * d), argnums=(0, 1)))
  blocked = lambda l, r, g: gmm(l, r, g, block_size=block)
  return (jax.jit(blocked), grads(blocked), grads(jax.lax.ragged_dot),
          jax.jit(functools.partial(tgmm, block_size=block)))


@pytest.mark.parametrize("block", BLOCKS)
def test_forward_and_grads_match_numpy_and_ragged_dot(operands, block):
  lhs, rhs, dout = operands
  fwd, grad, ragged_grad, _ = compiled(block)
  for gs in GROUP_SIZES:
    g = jnp.asarray(gs, jnp.int32)
    y = np.asarray(fwd(lhs, rhs, g))
    np.testing.assert_allclose(y, np_gmm(lhs, rhs, gs), rtol=TOL, atol=TOL, err_msg=str(gs))
    np.testing.assert_allclose(y, jax.lax.ragged_dot(lhs, rhs, g), rtol=TOL, atol=TOL)
    used = min(sum(gs), N)
    assert not y[used:].any(), f"rows past sum(group_sizes) must be zero: {gs}"
    dlhs, drhs = grad(lhs, rhs, g, dout)
    want_dlhs, want_drhs = np_grads(lhs, rhs, gs, dout)
    np.testing.assert_allclose(dlhs, want_dlhs, rtol=TOL, atol=TOL, err_msg=str(gs))
    np.testing.assert_allclose(drhs, want_drhs, rtol=TOL, atol=TOL, err_msg=str(gs))
    for got, want in zip((dlhs, drhs), ragged_grad(lhs, rhs, g, dout)):
      np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=str(gs))


def test_tgmm_is_the_per_group_weight_gradient(operands):
  lhs, _, dout = operands
  for gs in GROUP_SIZES:
    _, want = np_grads(lhs, np.zeros((E, K, M), np.float32), gs, dout)
    got = compiled(8)[3](lhs, dout, jnp.asarray(gs, jnp.int32))
    assert got.shape == (E, K, M)
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=str(gs))


def test_random_group_sizes_and_bf16(operands):
  lhs, rhs, dout = operands
  rng = np.random.default_rng(1)
  fwd, grad, _, _ = compiled(4)
  for _ in range(5):
    gs = rng.multinomial(int(rng.integers(0, N + 1)), np.ones(E) / E).tolist()
    np.testing.assert_allclose(fwd(lhs, rhs, jnp.asarray(gs, jnp.int32)),
                               np_gmm(lhs, rhs, gs), rtol=TOL, atol=TOL, err_msg=str(gs))
  # bf16 operands give a bf16 result (as ragged_dot), accumulated in fp32.
  gs = jnp.asarray([10, 0, 20, 7], jnp.int32)
  y = gmm(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16), gs, block_size=8)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np_gmm(lhs, rhs, gs.tolist()),
                             rtol=0.05, atol=0.1)


def _largest_array(hlo: str) -> int:
  dims = re.findall(r"f32\[([\d,]*)\]", hlo)
  return max(int(np.prod([int(d) for d in s.split(",") if d])) for s in dims)


def test_cost_is_proportional_to_rows_not_rows_times_experts():
  """No [E, N, K]-sized array anywhere in the compiled forward + backward.

  The dense lowering of ragged_dot on CPU (the reason gmm exists) materialises the
  rows once per expert; the check is seen to fail on it.
  """
  n, k, m, e = 64, 8, 12, 4
  args = (jnp.zeros((n, k)), jnp.zeros((e, k, m)), jnp.full((e,), n // e, jnp.int32),
          jnp.zeros((n, m)))
  def hlo(f):
    g = jax.grad(lambda l, r, gs, d: jnp.sum(f(l, r, gs) * d), argnums=(0, 1))
    return jax.jit(g).lower(*args).compile().as_text()
  biggest_operand = max(n * k, n * m, e * k * m)
  assert _largest_array(hlo(lambda l, r, gs: gmm(l, r, gs, block_size=16))) <= biggest_operand
  assert _largest_array(hlo(jax.lax.ragged_dot)) >= e * n * k


def test_impl_choice_and_errors():
  assert resolve_impl("auto", "cpu") == "blocked"
  assert resolve_impl("auto", "gpu") == resolve_impl("auto", "tpu") == "ragged_dot"
  assert resolve_impl("ragged_dot", "cpu") == "ragged_dot"
  assert resolve_impl("blocked", "tpu") == "blocked"
  with pytest.raises(ValueError, match="moe.gmm_impl='megablox'"):
    resolve_impl("megablox")
  lhs, rhs, gs = jnp.zeros((8, 3)), jnp.zeros((2, 3, 4)), jnp.array([4, 4])
  with pytest.raises(ValueError, match="block_size=0"):
    gmm(lhs, rhs, gs, block_size=0)
  with pytest.raises(ValueError, match="disagree on K or E"):
    gmm(lhs, jnp.zeros((2, 5, 4)), gs)
  with pytest.raises(ValueError, match="disagree on K or E"):
    gmm(lhs, rhs, jnp.array([8]))
  with pytest.raises(ValueError, match="integers"):
    gmm(lhs, rhs, jnp.array([4.0, 4.0]))
  with pytest.raises(ValueError, match=r"lhs \[N, K\]"):
    grouped_matmul(lhs[None], rhs, gs, impl="blocked")
  assert gmm(jnp.zeros((0, 3)), rhs, gs).shape == (0, 4)
  with pytest.raises(ConfigError, match="moe.gmm_impl='dense'"):
    MoEConfig(gmm_impl="dense").validate(4)
  with pytest.raises(ConfigError, match="moe.gmm_block_size=0"):
    MoEConfig(gmm_block_size=0).validate(4)
  with pytest.raises(ValueError, match="moe.gmm_impl='dense'"):
    MoE(8, 16, MoEConfig(gmm_impl="dense"), kind="gated", activation_name="silu",
        use_bias=False, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------- the MoE layer


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_layer_blocked_equals_ragged_dot(kind):
  """Outputs, losses, statistics and every parameter gradient of the dropless layer."""
  results = {}
  for impl in ("ragged_dot", "blocked", "auto"):
    layer = ep_test.build(ep_test.moe_config(gmm_impl=impl, gmm_block_size=8), kind)
    codec, f = ep_test.loss_and_grads(layer, "dropless")
    x, modality, _ = ep_test.inputs()
    params = codec.flatten(layer)
    jaxpr = str(jax.make_jaxpr(f)(params, x, modality))
    # "auto" is "blocked" on CPU: no ragged_dot left in the program.
    assert ("ragged_dot" in jaxpr) == (impl == "ragged_dot"), impl
    results[impl] = jax.tree.map(np.asarray, jax.jit(f)(params, x, modality))
  ep_test.assert_same(results["blocked"], results["ragged_dot"])
  ep_test.assert_same(results["auto"], results["blocked"])
  grads = results["blocked"][1]
  assert all(np.abs(g).max() > 0 for g in grads.values()), "every parameter gets a gradient"


def test_expert_parallel_ragged_dot_equals_single_device_blocked():
  """shard_map + all-to-all with ragged_dot (padding rows join the last group) gives
  the single-device result of the default ("auto" = blocked on CPU, where
  tests/test_expert_parallel.py covers the blocked shard_map path)."""
  kind, group_size = ep_test.CASES["d2e4"]
  want = ep_test.reference(kind, "dropless", group_size)
  mesh = ep_test.mesh_of("d2e4")
  cfg = ep_test.moe_config(group_size, ep_impl="shard_map", gmm_impl="ragged_dot")
  layer = ep_test.build(cfg, kind)
  codec, f = ep_test.loss_and_grads(layer, "dropless")
  x, modality, _ = ep_test.inputs()
  params = jax.device_put(codec.flatten(layer),
                          mesh_lib.param_shardings(codec.logical_axes, codec.shapes, mesh))
  x, modality = (jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim)) for a in (x, modality))
  with mesh_lib.activation_sharding(mesh):
    assert "ragged_dot" in str(jax.make_jaxpr(f)(params, x, modality))
    got = jax.tree.map(np.asarray, jax.jit(f)(params, x, modality))
  ep_test.assert_same(got, want)
