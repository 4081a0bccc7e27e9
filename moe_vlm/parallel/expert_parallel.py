"""Expert parallelism written out with shard_map and all-to-all.

The default (`moe.ep_impl="gspmd"`) leaves the token <-> expert relayout to GSPMD: the
MoE layer only names logical axes and the partitioner picks the collectives. This
module is the explicit alternative (`moe.ep_impl="shard_map"`), as MaxText and
DeepSpeed do it: every device

  1. routes its own tokens (the batch is split over `data` x `fsdp` x `expert`),
  2. packs them per destination expert shard,
  3. `all_to_all` over the `expert` axis: each device receives, from every member of
     its expert group, the tokens routed to its E/ep local experts,
  4. runs its local experts,
  5. `all_to_all` back and combines the k choices of each token.

Semantics are those of `moe_vlm.models.moe` exactly (same groups, capacities, drops,
aux loss and statistics), so a run may switch implementation without changing its
numbers beyond float rounding.

Weights: the expert weights enter with spec P("expert"), i.e. whole experts per device.
Where the rules also split them over `fsdp`/`model` (the default rules do), the
partitioner all-gathers those shards before the shard_map, which is FSDP's gather at
use; their gradient is summed over the batch axes and resharded on the way back.
Tensor parallelism inside the experts
over `model` is not done here: devices that differ only in `model` compute the same
thing.

Dropless exchange: `jax.lax.ragged_all_to_all` would send exactly the routed rows, but
XLA:CPU does not implement it, so the default exchange uses fixed-size buffers sized for
the worst case (every local assignment going to one shard): `ep` times the rows of an
exact exchange. `ragged=True` switches to `ragged_all_to_all` for TPU/GPU; its offset
arithmetic is tested on CPU against an emulation of the collective.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from moe_vlm.models import gmm
from moe_vlm.models import moe as moe_lib
from moe_vlm.parallel.mesh import BATCH_AXES, MeshError, axis_size, current_mesh

Array = jax.Array

EXPERT_AXIS = "expert"
RaggedAllToAll = Callable[..., Array]


class EPOutput(NamedTuple):
  """What the layer needs back from the shard_map; statistics are computed outside."""
  y: Array         # [B, L, D]
  idx: Array       # [B * L, k] expert choices (top-1 first)
  keep: Array      # [B * L, k] whether each choice was computed
  aux_loss: Array  # scalar, the same value as the GSPMD path's
  z_loss: Array    # scalar


# ------------------------------------------------------------------------ checks


def local_batch(mesh: Mesh, batch: int) -> int:
  """Sequences per device: the batch is split over every batch axis of the mesh."""
  ways = axis_size(mesh, BATCH_AXES)
  if batch % ways:
    raise MeshError(f"ep_impl='shard_map': batch of {batch} sequences is not divisible by "
                    f"data x fsdp x expert = {ways}")
  return batch // ways


def check_expert_axis(mesh: Mesh, num_experts: int) -> int:
  """Experts per device; the expert axis must split them evenly."""
  ep = mesh.shape[EXPERT_AXIS]
  if num_experts % ep:
    raise MeshError(f"ep_impl='shard_map': moe.num_experts={num_experts} is not divisible "
                    f"by the expert axis ({ep})")
  return num_experts // ep


def check_groups(group_size: Optional[int], per_device_batch: int) -> int:
  """Routing groups must not straddle devices, or each device could not route alone."""
  if group_size is None:
    raise ValueError("ep_impl='shard_map' with dispatch='capacity' needs moe.group_size "
                     "(sequences per routing group): a group spanning the whole batch "
                     "cannot be routed device by device")
  if per_device_batch % group_size:
    raise ValueError(f"ep_impl='shard_map': the per-device batch of {per_device_batch} "
                     f"sequences is not divisible by moe.group_size={group_size}")
  return per_device_batch // group_size


# ------------------------------------------------------------ global reductions


def global_mean(x: Array, axes: tuple[str, ...]) -> Array:
  """Mean over all devices' tokens; every device holds the same number of them."""
  return jax.lax.pmean(x, axes)


def global_load_balancing_loss(probs: Array, top1: Array, axes: tuple[str, ...]) -> Array:
  """`moe.load_balancing_loss` over the tokens of every device (the dropless aux loss)."""
  e = probs.shape[-1]
  me = global_mean(jnp.mean(probs, axis=0), axes)
  ce = global_mean(jnp.mean(jax.nn.one_hot(top1, e, dtype=jnp.float32), axis=0), axes)
  return jnp.mean(me * ce) * e * e


# -------------------------------------------------------------- capacity path


def scatter_to_buffers(x: Array, flat: Array, num_experts: int, capacity: int) -> Array:
  """x [G, S, D] into per-expert buffers [E, G*C, D]; `flat` [G, S*k] = e*C + slot.

  Dropped choices carry the index E*C (one past the end) and are skipped.
  """
  g, s, d = x.shape
  k = flat.shape[1] // s
  tokens = jnp.repeat(x, k, axis=1)
  scatter = lambda f, t: jnp.zeros((num_experts * capacity, d), x.dtype).at[f].set(
      t, mode="drop")
  buf = jax.vmap(scatter)(flat, tokens).reshape(g, num_experts, capacity, d)
  return buf.transpose(1, 0, 2, 3).reshape(num_experts, g * capacity, d)


def gather_from_buffers(out: Array, flat: Array, weights: Array) -> Array:
  """Inverse of `scatter_to_buffers`, then the gate-weighted sum of the k choices."""
  g, s, k = weights.shape
  num_experts, _, d = out.shape
  out = out.reshape(num_experts, g, -1, d).transpose(1, 0, 2, 3).reshape(g, -1, d)
  gather = lambda o, f: jnp.take(o, f, axis=0, mode="fill", fill_value=0)
  picked = jax.vmap(gather)(out, flat).reshape(g, s, k, d)
  return jnp.einsum("gskd,gsk->gsd", picked, weights.astype(picked.dtype))


def capacity_dispatch(experts: moe_lib.Experts, x: Array, idx: Array, keep: Array,
                      slot: Array, weights: Array, num_experts: int, capacity: int) -> Array:
  """`moe.dispatch_capacity` for one device's groups, local experts, two all-to-alls.

  x [G, S, D], idx/keep/slot/weights [G, S, k] -> [G, S, D]. `experts` holds this
  device's E/ep experts.
  """
  g, s, k = idx.shape
  flat = jnp.where(keep, idx * capacity + slot, num_experts * capacity).reshape(g, s * k)
  buf = scatter_to_buffers(x, flat, num_experts, capacity)             # [E, G*C, D]
  # Expert e lives on expert shard e // (E/ep): send each block of E/ep experts there;
  # received blocks are stacked by source device along the token axis.
  buf = jax.lax.all_to_all(buf, EXPERT_AXIS, 0, 1, tiled=True)         # [E/ep, ep*G*C, D]
  out = experts.batched(buf)
  out = jax.lax.all_to_all(out, EXPERT_AXIS, 1, 0, tiled=True)         # [E, G*C, D]
  return gather_from_buffers(out, flat, weights)


# --------------------------------------------------------------- dropless path


class Exchange(NamedTuple):
  """Rows received by one device and the local expert each one goes to."""
  rows: Array          # [M, D]
  local_expert: Array  # [M] in [0, E/ep]; E/ep marks padding


def local_expert_of(pos: Array, counts: Array, valid: Array) -> Array:
  """Expert of the row at `pos` of a chunk sorted by expert with `counts` rows each.

  pos [M], counts [M, E_local] (that row's source chunk), valid [M] -> [M]; padding
  rows get E_local so a stable sort puts them last.
  """
  ends = jnp.cumsum(counts, axis=-1)
  expert = jnp.sum(pos[:, None] >= ends, axis=-1)
  return jnp.where(valid, expert, counts.shape[-1])


def exchange_fixed(rows: Array, dest: Array, send_sizes: Array, recv_counts: Array
                   ) -> tuple[Exchange, Callable[[Array], Array]]:
  """all_to_all with one worst-case-sized slot [N, D] per destination shard.

  rows [N, D] sorted by destination; dest [N]; send_sizes [ep]; recv_counts [ep, E_l]
  (rows each source sends to each local expert). Returns the exchange and the inverse
  (processed received rows [ep*N, D] -> rows [N, D] in the order of `rows`).
  """
  n, d = rows.shape
  ep = send_sizes.shape[0]
  starts = jnp.cumsum(send_sizes) - send_sizes
  send_at = dest * n + jnp.arange(n) - starts[dest]  # unique: slot of each row
  send = jnp.zeros((ep * n, d), rows.dtype).at[send_at].set(rows, unique_indices=True)
  recv = jax.lax.all_to_all(send.reshape(ep, n, d), EXPERT_AXIS, 0, 0, tiled=True)
  src, pos = jnp.divmod(jnp.arange(ep * n), n)
  recv_sizes = jnp.sum(recv_counts, axis=-1)
  expert = local_expert_of(pos, recv_counts[src], pos < recv_sizes[src])

  def back(out: Array) -> Array:
    out = jax.lax.all_to_all(out.reshape(ep, n, d), EXPERT_AXIS, 0, 0, tiled=True)
    return out.reshape(ep * n, d)[send_at]

  return Exchange(recv.reshape(ep * n, d), expert), back


def exchange_ragged(rows: Array, send_sizes: Array, recv_counts: Array,
                    ragged_all_to_all: RaggedAllToAll
                    ) -> tuple[Exchange, Callable[[Array], Array]]:
  """The same exchange with `ragged_all_to_all`: only routed rows travel.

  The receive buffer keeps the worst-case size ep*N (static shapes); received chunks
  are packed by source, padding at the end.
  """
  n, d = rows.shape
  ep = send_sizes.shape[0]
  me = jax.lax.axis_index(EXPERT_AXIS)
  exclusive = lambda a, axis=0: jnp.cumsum(a, axis=axis) - a
  input_offsets = exclusive(send_sizes)
  recv_sizes = jnp.sum(recv_counts, axis=-1)
  recv_offsets = exclusive(recv_sizes)
  # Where my chunk lands on each receiver: after the chunks of lower-index sources.
  sizes = jax.lax.all_gather(send_sizes, EXPERT_AXIS)               # [src, dest]
  output_offsets = exclusive(sizes, axis=0)[me]
  recv = ragged_all_to_all(rows, jnp.zeros((ep * n, d), rows.dtype), input_offsets,
                           send_sizes, output_offsets, recv_sizes, axis_name=EXPERT_AXIS)
  p = jnp.arange(ep * n)
  src = jnp.clip(jnp.sum(p[:, None] >= jnp.cumsum(recv_sizes)[None], axis=-1), 0, ep - 1)
  pos = p - recv_offsets[src]
  expert = local_expert_of(pos, recv_counts[src], p < jnp.sum(recv_sizes))
  # On the way back each source's rows return to where they came from on it.
  back_offsets = jax.lax.all_to_all(input_offsets, EXPERT_AXIS, 0, 0, tiled=True)

  def back(out: Array) -> Array:
    return ragged_all_to_all(out, jnp.zeros((n, d), out.dtype), recv_offsets, recv_sizes,
                             back_offsets, send_sizes, axis_name=EXPERT_AXIS)

  return Exchange(recv, expert), back


def run_local_experts(experts: moe_lib.Experts, ex: Exchange, experts_per_shard: int) -> Array:
  """Sort received rows by local expert, one grouped matmul per weight, unsort.

  For ragged_dot, padding rows join the last group, so that it has defined semantics
  everywhere; the blocked gmm gives rows past the groups zeros and skips them, which
  matters here because the fixed exchange's buffer is mostly padding. Either way
  their outputs are never read back (so they receive no gradient either).
  """
  m = ex.rows.shape[0]
  order = jnp.argsort(ex.local_expert, stable=True)
  expert = ex.local_expert[order]
  group_sizes = jnp.bincount(expert, length=experts_per_shard).astype(jnp.int32)
  if gmm.resolve_impl(experts.gmm_impl) == "ragged_dot":
    group_sizes = group_sizes.at[-1].add(m - jnp.sum(group_sizes))
  out = experts.grouped(ex.rows[order], group_sizes, jnp.minimum(expert, experts_per_shard - 1))
  return jnp.zeros_like(out).at[order].set(out, unique_indices=True)


def dropless_dispatch(experts: moe_lib.Experts, x: Array, idx: Array, weights: Array,
                      num_experts: int, *, ragged: bool = False,
                      ragged_all_to_all: RaggedAllToAll = jax.lax.ragged_all_to_all) -> Array:
  """`moe.dispatch_dropless` for one device's tokens and its local experts.

  x [n, D], idx/weights [n, k] -> [n, D]. Every assignment is computed (no capacity).
  """
  n, k = idx.shape
  experts_per_shard = experts.wo.shape[0]
  ep = num_experts // experts_per_shard
  flat_expert = idx.reshape(n * k)
  order = jnp.argsort(flat_expert, stable=True)
  sorted_expert = flat_expert[order]
  rows = x[order // k]                        # sorted by expert, hence by destination
  counts = jnp.bincount(flat_expert, length=num_experts).reshape(ep, experts_per_shard)
  send_sizes = jnp.sum(counts, axis=-1)
  # recv_counts[i, e]: rows source i sends to my local expert e.
  recv_counts = jax.lax.all_to_all(counts, EXPERT_AXIS, 0, 0, tiled=True)
  if ragged:
    # TPU/GPU: XLA:CPU has no ragged-all-to-all ("HLO opcode ragged-all-to-all is not
    # supported by XLA:CPU"); on CPU only the offsets are tested, with an emulation.
    ex, back = exchange_ragged(rows, send_sizes, recv_counts, ragged_all_to_all)
  else:
    ex, back = exchange_fixed(rows, sorted_expert // experts_per_shard, send_sizes,
                              recv_counts)
  out_sorted = back(run_local_experts(experts, ex, experts_per_shard))
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)
  return jnp.einsum("skd,sk->sd", out.reshape(n, k, -1), weights.astype(out.dtype))


# ------------------------------------------------------------------- the layer


def moe_forward(layer: moe_lib.MoE, x: Array, *, dispatch: str, train: bool,
                mesh: Optional[Mesh] = None, ragged: bool = False,
                ragged_all_to_all: RaggedAllToAll = jax.lax.ragged_all_to_all) -> EPOutput:
  """The MoE layer's routing and dispatch under shard_map; x [B, L, D].

  Routing statistics are left to the caller (`moe.routing_stats` on the returned
  choices), so they are computed by the same code as on the GSPMD path.
  """
  cfg = layer.cfg
  mesh = mesh or current_mesh()
  if mesh is None:
    raise ValueError("ep_impl='shard_map' needs a mesh (trace under "
                     "mesh_lib.activation_sharding)")
  b, l, d = x.shape
  check_expert_axis(mesh, cfg.num_experts)
  per_device = local_batch(mesh, b)
  if dispatch == "capacity":
    groups = check_groups(cfg.group_size, per_device)
  elif dispatch != "dropless":
    raise ValueError(f"dispatch={dispatch!r}: expected 'capacity' or 'dropless'")
  k, e = cfg.top_k, cfg.num_experts
  router_def, router_state = nnx.split(layer.router)
  experts_def, experts_state = nnx.split(layer.experts)

  def body(x: Array, router_state: Any, experts_state: Any) -> EPOutput:
    router = nnx.merge(router_def, router_state)
    experts = nnx.merge(experts_def, experts_state)
    tokens = x.reshape(-1, d)
    logits = router(tokens)
    probs, gates, idx = moe_lib.top_k_gating(logits, k)
    if dispatch == "dropless":
      keep = jnp.ones_like(idx, dtype=bool)
      weights = moe_lib.combine_weights(gates, keep, cfg.renormalize)
      y = dropless_dispatch(experts, tokens, idx, weights, e, ragged=ragged,
                            ragged_all_to_all=ragged_all_to_all)
      aux_loss = global_load_balancing_loss(probs, idx[:, 0], BATCH_AXES)
    else:
      s = cfg.group_size * l
      capacity = cfg.capacity(s, train)
      grouped = lambda a: a.reshape((groups, s) + a.shape[1:])
      slot, keep = jax.vmap(moe_lib.capacity_slots, (0, None, None))(grouped(idx), e,
                                                                     capacity)
      weights = moe_lib.combine_weights(grouped(gates), keep, cfg.renormalize)
      y = capacity_dispatch(experts, grouped(tokens), grouped(idx), keep, slot, weights,
                            e, capacity)
      keep = keep.reshape(-1, k)
      # Same number of groups on every device: the mean of device means is the mean.
      per_group = jax.vmap(moe_lib.load_balancing_loss)(grouped(probs), grouped(idx[:, 0]))
      aux_loss = global_mean(jnp.mean(per_group), BATCH_AXES)
    z_loss = global_mean(moe_lib.router_z_loss(logits), BATCH_AXES)
    return EPOutput(y.reshape(x.shape).astype(x.dtype), idx, keep, aux_loss, z_loss)

  tokens_spec = P(BATCH_AXES)
  out_specs = EPOutput(tokens_spec, tokens_spec, tokens_spec, P(), P())
  run = jax.shard_map(body, mesh=mesh, out_specs=out_specs,
                      # Whole router, whole experts (E/ep of them) on every device.
                      in_specs=(tokens_spec, P(), P(EXPERT_AXIS)))
  return run(x, router_state, experts_state)
