"""The attention interface: every kernel equals the einsum path, and "auto" picks by backend.

Kernels (`moe_vlm.models.attention`): the blocked lax kernel (CPU), cuDNN through
`jax.nn.dot_product_attention` (its call is checked here with `implementation="xla"`,
the same arguments; cuDNN itself needs a GPU) and Pallas splash attention (in Pallas
interpret mode on CPU). Inputs cover causal attention, segment ids (packed rows), padding
and grouped kv heads; outputs and gradients are compared with the einsum path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_vlm.models import attention
from moe_vlm.models.attention import SelfMask
from moe_vlm.parallel import mesh as mesh_lib

B, L, H, KV, D = 2, 40, 4, 2, 8


def _inputs(seed=0, packed=True):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, L, KV, D)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, L, KV, D)), jnp.float32)
  if packed:  # row 0: three samples and padding; row 1: two samples filling the row
    seg = np.zeros((B, L), np.int32)
    seg[0, :11], seg[0, 11:30], seg[0, 30:37] = 1, 2, 3
    seg[1, :25], seg[1, 25:] = 1, 2
    return q, k, v, SelfMask(segment_ids=jnp.asarray(seg))
  mask = np.ones((B, L), np.int32)
  mask[0, -9:] = 0  # right padding
  return q, k, v, SelfMask(attention_mask=jnp.asarray(mask))


def _valid_rows(mask: SelfMask) -> np.ndarray:
  """[B, L] queries every implementation must agree on: all of them in packed rows
  (padding attends padding), the valid tokens of unpacked ones."""
  if mask.packed:
    return np.ones(mask.segment_ids.shape, bool)
  return np.asarray(mask.attention_mask).astype(bool)


KERNELS = {
    "blocked8": functools.partial(attention.blocked_attention, block_size=8),
    "blocked16": functools.partial(attention.blocked_attention, block_size=16),
    "cudnn_call": functools.partial(attention.cudnn_attention, implementation="xla"),
    "splash": functools.partial(attention.splash_attention, interpret=True),
}


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernels_equal_the_einsum_path(name, packed):
  q, k, v, mask = _inputs(packed=packed)
  want = attention.causal_self_attention(q, k, v, mask, impl="einsum", causal_blocks=3)
  got = KERNELS[name](q, k, v, mask.ids())
  rows = _valid_rows(mask)
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-6)


@pytest.mark.parametrize("name", ["blocked8", "splash"])
def test_kernel_gradients_equal_the_einsum_path(name):
  q, k, v, mask = _inputs(1)
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  want = jax.grad(loss(lambda q, k, v: attention.causal_self_attention(
      q, k, v, mask, impl="einsum")), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(lambda q, k, v: KERNELS[name](q, k, v, mask.ids())),
                         argnums=(0, 1, 2)))(q, k, v)
  for n, a, b in zip("qkv", got, want):
    assert float(jnp.max(jnp.abs(b))) > 1e-2, n
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, err_msg=f"d{n}")


def test_auto_picks_the_backends_kernel():
  pick = lambda backend, packed=True: attention.resolve_impl("auto", packed=packed,
                                                              backend=backend)
  assert pick("tpu") == pick("tpu", False) == "splash"
  assert pick("gpu") == pick("cuda") == "cudnn"
  assert pick("cpu") == "blocked" and pick("cpu", False) == "einsum"
  assert attention.resolve_impl("einsum", packed=True, backend="tpu") == "einsum"
  with pytest.raises(ValueError, match="attention impl"):
    attention.resolve_impl("flash", packed=True)


def test_blocked_kernel_visits_only_the_key_blocks_of_its_segments():
  _, _, _, mask = _inputs()
  starts = np.asarray(attention._key_block_starts(mask.segment_ids, 8))
  # Row 0: segments [0, 11) [11, 30) [30, 37), padding [37, 40). Query block 3 (24-31)
  # holds segments 2 and 3: keys from block 1 (segment 2 starts at 11) up to itself.
  # Row 1: [0, 25) [25, 40); block 3 (24-31) still holds token 24 of the first sample.
  np.testing.assert_array_equal(starts, [[0, 0, 1, 1, 3], [0, 0, 0, 0, 3]])
  np.testing.assert_array_equal(np.asarray(attention.first_index(mask.segment_ids))[0, 28:40],
                                [11, 11, 30, 30, 30, 30, 30, 30, 30, 37, 37, 37])


def test_the_mesh_runs_the_kernel_per_device():
  q, k, v, mask = _inputs()
  q, k, v = (jnp.concatenate([x] * 4) for x in (q, k, v))  # 8 rows for 4 x 2 devices
  seg = jnp.concatenate([mask.segment_ids] * 4)
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 1, "model": 2, "expert": 1},
                            jax.devices()[:8])
  want = attention.causal_self_attention(q, k, v, SelfMask(segment_ids=seg), impl="einsum")

  def run(q, k, v, seg):
    with mesh_lib.activation_sharding(mesh):
      return attention.causal_self_attention(q, k, v, SelfMask(segment_ids=seg),
                                             impl="blocked", block_size=8)

  lowered = jax.jit(run).lower(q, k, v, seg)
  assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
  np.testing.assert_allclose(np.asarray(jax.jit(run)(q, k, v, seg)), np.asarray(want),
                             atol=2e-6)
