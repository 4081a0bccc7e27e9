"""The MoE FFN layer: its parameters, and where its routing core runs.

Who owns what:
- `moe_vlm.models.routing`: the routing semantics (router probabilities, top-k, gate
  renormalisation, capacity slots or the dropless sort by expert, scatter/gather,
  combine, aux and z losses, routing statistics), written once;
- this module: the parameters (`Router`, `Experts`: E stacked copies of the family's
  FFN, run as batched einsums on capacity buffers or as a grouped matmul on rows
  sorted by expert) and the layer `MoE`, which runs the routing core
    * locally: one program over the whole batch; under a mesh GSPMD shards it from the
      logical axes the core names (`moe.ep_impl="gspmd"`, the default);
    * per device under shard_map (`moe.ep_impl="shard_map"`, with a mesh): every
      device routes its own tokens and the experts are wrapped by the token exchanges
      of `moe_vlm.parallel.expert_parallel` (capacity: all-to-all of the buffers;
      dropless: sort by expert, ragged all-to-all or its padded emulation, grouped
      matmul on the local experts, and back; `moe.ep_exchange`).
  Both go through `routing.route_and_dispatch`, so they agree to float rounding.
- `moe_vlm.parallel.expert_parallel`: the collectives; it receives the mesh and the
  expert functions from here and imports nothing from `moe_vlm.models`.

The grouped matmul is `jax.lax.ragged_dot` on TPU/GPU and the blocked kernel of
`moe_vlm.models.gmm` on CPU (`moe.gmm_impl`).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from moe_vlm.models import gmm
from moe_vlm.models import routing
from moe_vlm.models.config import MoEConfig
from moe_vlm.models.layers import (activation, default_kernel_init, param, token_matmul,
                                   torch_linear_init)
from moe_vlm.models.routing import (IMAGE, PAD, TEXT, gumbel_top2_gating, routing_stats,
                                    top_k_gating)
from moe_vlm.parallel import expert_parallel
from moe_vlm.parallel.mesh import BATCH_AXES, constrain, current_mesh

Array = jax.Array

# The modality codes and gating functions are the routing core's, re-exported for the
# callers that know them from here.
__all__ = ["PAD", "TEXT", "IMAGE", "Router", "Experts", "MoE", "top_k_gating",
           "gumbel_top2_gating", "routing_stats"]


class Router(nnx.Module):
  """Linear router without bias, evaluated in fp32 on fp32 input (as DeepSpeed's `wg`)."""

  def __init__(self, hidden: int, num_experts: int, *, rngs: nnx.Rngs):
    self.kernel = param(rngs, torch_linear_init, (hidden, num_experts), ("embed", None),
                        jnp.float32)

  def __call__(self, x: Array) -> Array:
    return token_matmul(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))


class Experts(nnx.Module):
  """E copies of the family's FFN, stacked on a leading `expert` axis."""

  def __init__(self, num_experts: int, hidden: int, intermediate: int, *, kind: str,
               activation_name: str, use_bias: bool, rngs: nnx.Rngs,
               dtype: str = "float32", param_dtype: str = "float32",
               gmm_impl: str = "auto", gmm_block_size: int = gmm.DEFAULT_BLOCK_SIZE):
    e, d, f = num_experts, hidden, intermediate
    init, zeros = default_kernel_init, nnx.initializers.zeros
    self.kind = kind
    gmm.resolve_impl(gmm_impl)  # fail on a bad name now, not at the first dropless call
    # "auto" is resolved when traced, against the backend the program is built for.
    self.gmm_impl, self.gmm_block_size = gmm_impl, gmm_block_size
    self.act = activation(activation_name)
    self.dtype = jnp.dtype(dtype)
    if kind == "gated":
      self.wi_gate = param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), param_dtype)
      self.wi_up = param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), param_dtype)
    else:
      self.wi = param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), param_dtype)
    self.wo = param(rngs, init, (e, f, d), ("expert", "mlp", "embed"), param_dtype)
    self.wi_bias = (param(rngs, zeros, (e, f), ("expert", "mlp"), param_dtype)
                    if use_bias and kind == "plain" else None)
    self.wo_bias = param(rngs, zeros, (e, d), ("expert", "embed"), param_dtype) if use_bias else None

  def _ffn(self, x: Array, matmul: Callable[[Array, Array], Array],
           bias: Callable[[Array], Array]) -> Array:
    """The FFN written once; `matmul`/`bias` say how tokens meet their expert's weights."""
    w = lambda p: p[...].astype(self.dtype)
    x = x.astype(self.dtype)
    if self.kind == "gated":
      h = self.act(matmul(x, w(self.wi_gate))) * matmul(x, w(self.wi_up))
    else:
      h = matmul(x, w(self.wi))
      if self.wi_bias is not None:
        h = h + bias(w(self.wi_bias))
      h = self.act(h)
    y = matmul(h, w(self.wo))
    if self.wo_bias is not None:
      y = y + bias(w(self.wo_bias))
    return y

  def batched(self, x: Array) -> Array:
    """x [E, C, D] (each expert's capacity buffer) -> [E, C, D]."""
    return self._ffn(x, lambda a, w: jnp.einsum("ecd,edf->ecf", a, w),
                     lambda b: b[:, None, :])

  def grouped(self, x: Array, group_sizes: Array, expert_of_row: Array) -> Array:
    """x [N, D] sorted by expert, `group_sizes` [E] rows each -> [N, D] (dropless).

    Rows past sum(group_sizes) (the padding of an exchange buffer) are computed by
    neither kernel's matmuls; what they hold afterwards is never read.
    """
    matmul = lambda a, w: gmm.grouped_matmul(a, w, group_sizes, impl=self.gmm_impl,
                                             block_size=self.gmm_block_size)
    return self._ffn(x, matmul, lambda b: b[expert_of_row])


class MoE(nnx.Module):
  """Drop-in replacement for a decoder layer's FFN."""

  def __init__(self, hidden: int, intermediate: int, cfg: MoEConfig, *, kind: str,
               activation_name: str, use_bias: bool, rngs: nnx.Rngs,
               dtype: str = "float32", param_dtype: str = "float32"):
    self.cfg = cfg
    self.router = Router(hidden, cfg.num_experts, rngs=rngs)
    self.experts = Experts(cfg.num_experts, hidden, cfg.expert_intermediate_size or intermediate,
                           kind=kind, activation_name=activation_name, use_bias=use_bias,
                           rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           gmm_impl=cfg.gmm_impl, gmm_block_size=cfg.gmm_block_size)

  def __call__(self, x: Array, modality: Optional[Array] = None, *, train: bool = False,
               dispatch: Optional[str] = None,
               rng: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """x [B, L, D] -> (y [B, L, D], losses and routing statistics).

    `dispatch` overrides the config ("dropless" at inference, for instance).
    """
    cfg = self.cfg
    dispatch = dispatch or cfg.dispatch
    b, l, d = x.shape
    modality = (jnp.full((b * l,), TEXT, jnp.int32) if modality is None
                else modality.reshape(b * l))
    mesh = current_mesh()
    if cfg.ep_impl == "shard_map" and mesh is not None:
      out = self._expert_parallel(x, mesh, dispatch=dispatch, train=train)
    else:
      out = self._local(x, dispatch=dispatch, train=train, rng=rng)
    stats = routing_stats(out.idx, out.keep, modality, cfg.num_experts)
    stats["aux_loss"] = out.aux_loss
    stats["z_loss"] = out.z_loss
    return out.y.reshape(b, l, d).astype(x.dtype), stats

  def _local(self, x: Array, *, dispatch: str, train: bool,
             rng: Optional[Array]) -> routing.Dispatched:
    """The whole batch as one program; GSPMD places it from the logical axes."""
    cfg = self.cfg
    b, l, d = x.shape
    tokens = x.reshape(b * l, d)
    groups = 1
    if dispatch == "capacity":
      group = cfg.group_size or b
      if b % group:
        raise ValueError(f"batch of {b} sequences is not divisible by moe.group_size={group}")
      groups = b // group
    experts = routing.ExpertFns(self.experts.grouped, self.experts.batched)
    return routing.route_and_dispatch(tokens, self.router(tokens), cfg, experts,
                                      dispatch=dispatch, train=train, num_groups=groups,
                                      rng=rng, layout=constrain)

  def _expert_parallel(self, x: Array, mesh: Mesh, *, dispatch: str,
                       train: bool) -> routing.Dispatched:
    """The routing core per device under shard_map, experts behind the exchanges."""
    cfg = self.cfg
    b, l, d = x.shape
    ep = expert_parallel
    experts_per_shard = ep.check_expert_axis(mesh, cfg.num_experts)
    per_device = ep.local_batch(mesh, b)
    if dispatch not in routing.DISPATCHES:
      raise ValueError(f"dispatch={dispatch!r}: expected 'capacity' or 'dropless'")
    groups = ep.check_groups(cfg.group_size, per_device) if dispatch == "capacity" else 1
    exchange = ep.resolve_exchange(cfg.ep_exchange, mesh)
    router_def, router_state = nnx.split(self.router)
    experts_def, experts_state = nnx.split(self.experts)

    def body(x: Array, router_state, experts_state) -> routing.Dispatched:
      router = nnx.merge(router_def, router_state)
      experts = nnx.merge(experts_def, experts_state)  # this device's E/ep experts
      fns = routing.ExpertFns(
          ep.dropless_exchange(experts.grouped, num_experts=cfg.num_experts,
                               experts_per_shard=experts_per_shard, top_k=cfg.top_k,
                               exchange=exchange),
          ep.capacity_exchange(experts.batched))
      tokens = x.reshape(-1, d)
      out = routing.route_and_dispatch(tokens, router(tokens), cfg, fns, dispatch=dispatch,
                                       train=train, num_groups=groups,
                                       axis_names=BATCH_AXES)
      return out._replace(y=out.y.astype(x.dtype))

    tokens, whole = ep.TOKENS, ep.REPLICATED
    run = ep.expert_shard_map(body, mesh, in_specs=(tokens, whole, ep.EXPERTS),
                              out_specs=routing.Dispatched(tokens, tokens, tokens, whole, whole))
    return run(x, router_state, experts_state)
