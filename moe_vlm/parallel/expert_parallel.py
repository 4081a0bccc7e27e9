"""Expert parallelism's collectives: the shard_map layout and the token exchanges.

The default (`moe.ep_impl="gspmd"`) leaves the token <-> expert relayout to GSPMD: the
MoE layer only names logical axes and the partitioner picks the collectives. The
explicit alternative (`moe.ep_impl="shard_map"`) runs the MoE layer's routing core
(`moe_vlm.models.routing`) on every device, as MaxText and DeepSpeed do:

  1. each device routes its own tokens (the batch is split over `data` x `fsdp` x
     `expert`) and packs them per expert (capacity buffers, or rows sorted by expert),
  2. the tokens travel over the `expert` axis to the device holding their expert,
  3. that device runs its E/ep local experts,
  4. the outputs travel back and are combined with the gates where the tokens live.

Who owns what: `moe_vlm.models.routing` owns the routing semantics and
`moe_vlm.models.moe` the layer, which builds the per-device body and hands this module
the mesh and its experts as functions; this module owns steps 2-4's communication
only (`capacity_exchange`, `dropless_exchange`), the shard_map around the body
(`expert_shard_map`) and the mesh checks. It imports nothing from `moe_vlm.models`.

Capacity path: [E, G*C, D] buffers, one `all_to_all` there and one back.

Dropless path (MaxText's `sparse_matmul` design): rows sorted by expert, hence by
destination shard, are sent with `jax.lax.ragged_all_to_all` (only the routed rows
travel; offsets from one all_gather of the [ep, E/ep] row counts), sorted on arrival
by local expert ("local permute"), run through the grouped matmul, unsorted and sent
back with the transposed offsets. XLA:CPU does not implement `ragged_all_to_all`, so
`ragged_all_to_all_padded` emulates the same collective (same arguments, same
result) with a dense `all_to_all` of one worst-case slot per peer; `moe.ep_exchange`
picks ("auto": padded on CPU meshes, ragged elsewhere). Both run the same offset
arithmetic, so the CPU tests of the padded exchange test the ragged path's offsets.

Buffers: per device n tokens x k choices = N rows; a token sends at most min(k, E/ep)
rows to one shard, so a peer slot holds n * min(k, E/ep) rows and a receive buffer ep
times that (nothing is ever dropped). Rows of the receive buffer past the routed ones
are padding: the grouped matmul skips them and nothing reads them.

Weights: the expert weights enter with spec P("expert"), i.e. whole experts per device.
Where the rules also split them over `fsdp`/`model` (the default rules do), the
partitioner all-gathers those shards before the shard_map, which is FSDP's gather at
use; their gradient is summed over the batch axes and resharded on the way back.
Tensor parallelism inside the experts over `model` is not done here: devices that
differ only in `model` compute the same thing.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from moe_vlm.parallel.mesh import BATCH_AXES, MeshError, axis_size

Array = jax.Array

EXPERT_AXIS = "expert"
EXCHANGES = ("auto", "ragged", "padded")

# shard_map specs: tokens split over the batch axes, replicated values (the router,
# scalar losses), the expert-stacked weights split over `expert`.
TOKENS = P(BATCH_AXES)
REPLICATED = P()
EXPERTS = P(EXPERT_AXIS)

# (rows, group_sizes, expert_of_row) -> rows: the experts' grouped matmul.
GroupedFn = Callable[[Array, Array, Array], Array]


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


def resolve_exchange(name: str, mesh: Mesh) -> str:
  """`moe.ep_exchange` -> "ragged" or "padded"; "auto" is padded on a CPU mesh, where
  XLA has no ragged-all-to-all, and ragged on TPU/GPU."""
  if name not in EXCHANGES:
    raise ValueError(f"moe.ep_exchange={name!r}: expected one of {', '.join(EXCHANGES)}")
  if name != "auto":
    return name
  return "padded" if mesh.devices.flat[0].platform == "cpu" else "ragged"


# ------------------------------------------------------------------- shard_map


def expert_shard_map(body: Callable[..., Any], mesh: Mesh, *, in_specs: Any,
                     out_specs: Any) -> Callable[..., Any]:
  """`body` run per device over `mesh` (specs from TOKENS, REPLICATED, EXPERTS)."""
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# --------------------------------------------------------------- capacity path


def capacity_exchange(batched: Callable[[Array], Array],
                      axis: str = EXPERT_AXIS) -> Callable[[Array], Array]:
  """Wrap `batched` (this device's E/ep experts on [E/ep, T, D]) into a function of all
  E experts' buffers [E, G*C, D], as the routing core's capacity dispatch calls it."""

  def run(buf: Array) -> Array:
    # Expert e lives on expert shard e // (E/ep): each block of E/ep experts goes
    # there; received blocks are stacked by source device along the token axis.
    buf = jax.lax.all_to_all(buf, axis, 0, 1, tiled=True)          # [E/ep, ep*G*C, D]
    out = batched(buf)
    return jax.lax.all_to_all(out, axis, 1, 0, tiled=True)         # [E, G*C, D]

  return run


# ------------------------------------------------- ragged all-to-all (emulated)


def ragged_all_to_all_padded(operand: Array, output: Array, input_offsets: Array,
                             send_sizes: Array, output_offsets: Array, recv_sizes: Array, *,
                             axis_name: str, max_send: Optional[int] = None) -> Array:
  """`jax.lax.ragged_all_to_all` (one slice per peer) from dense `all_to_all`s.

  Same arguments and result: slice j of `operand` (rows input_offsets[j] +
  [0, send_sizes[j])) is written on peer j at rows output_offsets[j] + [0,
  send_sizes[j]) of its `output`; rows nobody writes keep `output`'s values. Each
  peer's slice travels in a slot of `max_send` rows (static; every send size must fit,
  default the operand's rows), so the exchange moves ep * max_send rows whatever the
  sizes. Differentiable (gathers, all_to_all, a scatter with unique indices).
  """
  ep = jax.lax.axis_size(axis_name)
  if input_offsets.shape != (ep,):
    raise ValueError(f"ragged_all_to_all_padded: expected one slice per peer ({ep}), got "
                     f"offsets of shape {input_offsets.shape}")
  m = output.shape[0]
  max_send = operand.shape[0] if max_send is None else max_send
  pos = jnp.arange(max_send)
  trailing = (1,) * (operand.ndim - 1)
  rows = jnp.take(operand, input_offsets[:, None] + pos[None], axis=0, mode="fill",
                  fill_value=0)                                      # [ep, max_send, ...]
  sent = (pos[None] < send_sizes[:, None]).reshape(rows.shape[:2] + trailing)
  recv = jax.lax.all_to_all(jnp.where(sent, rows, 0), axis_name, 0, 0, tiled=True)
  # Where each peer's slice lands here: the offsets it chose for me.
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  valid = pos[None] < recv_sizes[:, None]
  # Rows not received point past the output, each to its own index (unique, dropped).
  target = jnp.where(valid, where[:, None] + pos[None], m + jnp.arange(ep * max_send).reshape(
      ep, max_send))
  recv = recv.reshape((ep * max_send,) + operand.shape[1:]).astype(output.dtype)
  return output.at[target.reshape(-1)].set(recv, mode="drop", unique_indices=True)


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                       recv_sizes, *, axis_name, max_send=None):
  del max_send  # the ragged collective sends exactly send_sizes rows
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                   output_offsets, recv_sizes, axis_name=axis_name)


# The collective behind each `moe.ep_exchange` (looked up at trace time, so a test may
# put an emulation behind "ragged").
COLLECTIVES: dict[str, Callable[..., Array]] = {
    "ragged": _ragged_all_to_all,
    "padded": ragged_all_to_all_padded,
}


# --------------------------------------------------------------- dropless path


def _exclusive_cumsum(a: Array, axis: int = 0) -> Array:
  return jnp.cumsum(a, axis=axis) - a


class ExchangePlan(NamedTuple):
  """Offsets and sizes of one device's dropless exchange over the expert axis."""
  input_offsets: Array   # [ep] first row of my rows for each peer (rows sorted by peer)
  send_sizes: Array      # [ep] rows I send to each peer
  output_offsets: Array  # [ep] where my rows land in each peer's receive buffer
  recv_offsets: Array    # [ep] where each peer's rows land in mine
  recv_sizes: Array      # [ep] rows each peer sends me
  back_offsets: Array    # [ep] where my outputs for each peer land in its rows
  recv_counts: Array     # [ep, E/ep] rows each peer sends to each of my local experts


def exchange_plan(counts: Array, axis: str = EXPERT_AXIS) -> ExchangePlan:
  """All offsets from one all_gather of the row counts.

  counts [ep, E/ep]: rows this device sends to each local expert of each peer
  (its group sizes per expert, reshaped). Received chunks are packed by source.
  """
  every = jax.lax.all_gather(counts, axis)          # [src, dst, E/ep]
  me = jax.lax.axis_index(axis)
  sizes = jnp.sum(every, axis=-1)                   # [src, dst]
  recv_sizes = sizes[:, me]
  return ExchangePlan(
      input_offsets=_exclusive_cumsum(sizes[me]),
      send_sizes=sizes[me],
      output_offsets=_exclusive_cumsum(sizes, axis=0)[me],
      recv_offsets=_exclusive_cumsum(recv_sizes),
      recv_sizes=recv_sizes,
      back_offsets=_exclusive_cumsum(sizes, axis=1)[:, me],
      recv_counts=every[:, me])


class LocalSort(NamedTuple):
  """Received rows sorted by local expert (padding last)."""
  order: Array          # [R] received row of each sorted row
  group_sizes: Array    # [E/ep]
  expert_of_row: Array  # [R] local expert of each sorted row (padding: the last one)


def local_permute(recv_counts: Array, num_rows: int) -> LocalSort:
  """Order the receive buffer (chunks by source, each sorted by local expert, then
  padding) by local expert, sources in order within an expert."""
  ep, experts = recv_counts.shape
  labels = jnp.concatenate([jnp.tile(jnp.arange(experts, dtype=jnp.int32), ep),
                            jnp.array([experts], jnp.int32)])
  repeats = jnp.concatenate([recv_counts.reshape(-1),
                             (num_rows - jnp.sum(recv_counts)).reshape(1)])
  expert = jnp.repeat(labels, repeats, total_repeat_length=num_rows)
  order = jnp.argsort(expert, stable=True)
  return LocalSort(order, jnp.sum(recv_counts, axis=0).astype(jnp.int32),
                   jnp.minimum(expert[order], experts - 1))


def dropless_exchange(grouped: GroupedFn, *, num_experts: int, experts_per_shard: int,
                      top_k: int, exchange: str, axis: str = EXPERT_AXIS) -> GroupedFn:
  """Wrap `grouped` (this device's E/ep experts) into the routing core's dropless
  `grouped`: rows [N, D] sorted by global expert, group_sizes [E] -> outputs [N, D].

  `exchange`: "ragged" or "padded" (`resolve_exchange`).
  """
  if exchange not in COLLECTIVES:
    raise ValueError(f"exchange={exchange!r}: expected one of {', '.join(COLLECTIVES)}")
  ep = num_experts // experts_per_shard

  def run(rows: Array, group_sizes: Array, sorted_expert: Array) -> Array:
    del sorted_expert  # local experts are recomputed from the counts on arrival
    collective = COLLECTIVES[exchange]
    n_rows, d = rows.shape
    # A token sends at most min(k, E/ep) of its k rows to one shard.
    max_send = n_rows // top_k * min(top_k, experts_per_shard)
    plan = exchange_plan(group_sizes.reshape(ep, experts_per_shard), axis)
    zeros = lambda n, like: jnp.zeros_like(like, shape=(n, d))
    recv = collective(rows, zeros(ep * max_send, rows), plan.input_offsets, plan.send_sizes,
                      plan.output_offsets, plan.recv_sizes, axis_name=axis, max_send=max_send)
    local = local_permute(plan.recv_counts, ep * max_send)
    out = grouped(recv[local.order], local.group_sizes, local.expert_of_row)
    out = jnp.zeros_like(out).at[local.order].set(out, unique_indices=True)
    return collective(out, zeros(n_rows, out), plan.recv_offsets, plan.recv_sizes,
                      plan.back_offsets, plan.send_sizes, axis_name=axis, max_send=max_send)

  return run
