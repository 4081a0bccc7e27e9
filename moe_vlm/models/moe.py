"""The MoE FFN: router, top-k gating, capacity or dropless dispatch, aux losses, stats.

Semantics follow MoE-LLaVA (DeepSpeed 0.9.5 top-2 gating) where it defines them:
- router logits = x @ W in fp32, softmax over all experts, top-k by probability;
- capacity per expert = ceil(S / E * factor * k) over all S tokens of the call,
  floored at `min_capacity`; every token's first choice is placed (in sequence order)
  before any second choice, and assignments past capacity are dropped;
- gate weights of the kept choices are renormalised to sum to one; a token whose
  choices were all dropped contributes zero (only the residual passes);
- aux loss = mean(me * ce) * E^2 with me the mean router probability and ce the
  fraction of tokens whose top-1 is the expert, measured before dropping.

Dispatch uses index arithmetic (scatter into an [E, C, D] buffer, or sort + a grouped
matmul for the dropless path) instead of DeepSpeed's one-hot einsums, whose cost grows
as S^2 x E. The grouped matmul is `jax.lax.ragged_dot` on TPU/GPU and the blocked
kernel of `moe_vlm.models.gmm` on CPU (`moe.gmm_impl`).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_vlm.models import gmm
from moe_vlm.models.config import MoEConfig
from moe_vlm.models.layers import (activation, default_kernel_init, param, token_matmul,
                                   torch_linear_init)
from moe_vlm.parallel.mesh import constrain, current_mesh

Array = jax.Array

# Token modality codes carried next to the tokens for routing statistics.
PAD, TEXT, IMAGE = 0, 1, 2


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

    Rows past sum(group_sizes) give zeros from the matmuls (biases aside).
    """
    matmul = lambda a, w: gmm.grouped_matmul(a, w, group_sizes, impl=self.gmm_impl,
                                             block_size=self.gmm_block_size)
    return self._ffn(x, matmul, lambda b: b[expert_of_row])


def top_k_gating(logits: Array, k: int) -> tuple[Array, Array, Array]:
  """fp32 softmax over all experts, then the k most probable (top-1 first).

  Returns probs [S, E], gate values [S, k] (unnormalised) and expert indices [S, k].
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  gates, idx = jax.lax.top_k(probs, k)
  return probs, gates, idx


def gumbel_top2_gating(logits: Array, rng: Array) -> tuple[Array, Array, Array]:
  """DeepSpeed 0.9.5 `top2gating`: top-1 by probability, the second expert sampled as
  argmax(logits + Gumbel noise) over the other experts. Gate values stay the noise-free
  softmax probabilities of the two chosen experts."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  first = jnp.argmax(probs, axis=-1)
  noisy = logits.astype(jnp.float32) + jax.random.gumbel(rng, logits.shape, jnp.float32)
  noisy = jnp.where(jax.nn.one_hot(first, logits.shape[-1], dtype=bool), -jnp.inf, noisy)
  second = jnp.argmax(noisy, axis=-1)
  idx = jnp.stack([first, second], axis=-1).astype(jnp.int32)
  return probs, jnp.take_along_axis(probs, idx, axis=-1), idx


def capacity_slots(expert_idx: Array, num_experts: int, capacity: int) -> tuple[Array, Array]:
  """Slot of each (token, choice) in its expert's buffer, and whether it fits.

  Priority is choice-major then sequence order: every token's first choice is
  placed before any token's second choice (DeepSpeed's `locations2 += sum(mask1)`).
  """
  s, k = expert_idx.shape
  onehot = jax.nn.one_hot(expert_idx.T.reshape(k * s), num_experts, dtype=jnp.int32)
  position = jnp.cumsum(onehot, axis=0) - 1
  slot = jnp.sum(position * onehot, axis=-1).reshape(k, s).T
  return slot, slot < capacity


def combine_weights(gates: Array, keep: Array, renormalize: bool) -> Array:
  """Zero the dropped choices, then renormalise over the kept ones (eps as DeepSpeed)."""
  w = gates * keep
  if renormalize:
    w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
  return w


def load_balancing_loss(probs: Array, top1: Array) -> Array:
  """MoE-LLaVA / GShard: mean(me * ce) * E^2; 1.0 when the router is balanced."""
  e = probs.shape[-1]
  me = jnp.mean(probs, axis=0)
  ce = jnp.mean(jax.nn.one_hot(top1, e, dtype=jnp.float32), axis=0)
  return jnp.mean(me * ce) * e * e


def router_z_loss(logits: Array) -> Array:
  """ST-MoE z-loss: mean(logsumexp(logits)^2), keeps router logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def dispatch_capacity(experts: Experts, x: Array, idx: Array, keep: Array, slot: Array,
                      weights: Array, capacity: int) -> Array:
  """Scatter each group's tokens into [E, C, D] buffers, run the experts, gather back.

  x [G, S, D], idx/keep/slot/weights [G, S, k] -> [G, S, D]. The buffers of all groups
  meet the experts as one [E, G*C, D] array: with groups split over the batch axes and
  experts over `expert`, that relayout is the all-to-all of expert parallelism.
  """
  g, s, k = idx.shape
  d = x.shape[-1]
  num_experts = experts.wo.shape[0]
  # Dropped choices point one past the buffer so `mode="drop"`/`"fill"` ignore them.
  flat = jnp.where(keep, idx * capacity + slot, num_experts * capacity).reshape(g, s * k)
  tokens = jnp.repeat(x, k, axis=1)
  scatter = lambda f, t: jnp.zeros((num_experts * capacity, d), x.dtype).at[f].set(
      t, mode="drop")
  buf = jax.vmap(scatter)(flat, tokens).reshape(g, num_experts, capacity, d)
  buf = buf.transpose(1, 0, 2, 3).reshape(num_experts, g * capacity, d)
  buf = constrain(buf, ("expert", "expert_tokens", "act_embed"))
  out = constrain(experts.batched(buf), ("expert", "expert_tokens", "act_embed"))
  out = out.reshape(num_experts, g, capacity, d).transpose(1, 0, 2, 3)
  out = constrain(out.reshape(g, num_experts * capacity, d), ("batch", None, "act_embed"))
  gather = lambda o, f: jnp.take(o, f, axis=0, mode="fill", fill_value=0)
  picked = jax.vmap(gather)(out, flat).reshape(g, s, k, d)
  return jnp.einsum("gskd,gsk->gsd", picked, weights.astype(picked.dtype))


def dispatch_dropless(experts: Experts, x: Array, idx: Array, weights: Array) -> Array:
  """Sort the S*k assignments by expert and run one grouped matmul per weight."""
  s, k = idx.shape
  num_experts = experts.wo.shape[0]
  flat_expert = idx.reshape(s * k)
  order = jnp.argsort(flat_expert, stable=True)
  sorted_expert = flat_expert[order]
  group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
  out_sorted = experts.grouped(x[order // k], group_sizes, sorted_expert)
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(s, k, -1)
  return jnp.einsum("skd,sk->sd", out, weights.astype(out.dtype))


def routing_stats(idx: Array, keep: Array, modality: Array, num_experts: int) -> dict[str, Array]:
  """Tokens per expert (all k choices, before dropping), drop rates, split by modality."""
  onehot = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32)  # [S, k, E]
  top1 = onehot[:, 0]
  dropped = 1.0 - keep.astype(jnp.float32)
  stats = {
      "tokens_per_expert": jnp.sum(onehot, axis=(0, 1)),
      "dropped_fraction": jnp.mean(dropped),
  }
  for name, code in (("image", IMAGE), ("text", TEXT)):
    m = (modality == code).astype(jnp.float32)
    stats[f"tokens_per_expert_{name}"] = jnp.einsum("ske,s->e", onehot, m)
    stats[f"top1_per_expert_{name}"] = jnp.einsum("se,s->e", top1, m)
    stats[f"dropped_fraction_{name}"] = (
        jnp.sum(dropped * m[:, None]) / jnp.maximum(jnp.sum(m) * idx.shape[1], 1.0))
  return stats


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
    tokens = x.reshape(b * l, d)
    modality = (jnp.full((b * l,), TEXT, jnp.int32) if modality is None
                else modality.reshape(b * l))
    if cfg.ep_impl == "shard_map" and current_mesh() is not None:
      # Imported here: expert_parallel builds on this module's functions.
      from moe_vlm.parallel import expert_parallel
      out = expert_parallel.moe_forward(self, x, dispatch=dispatch, train=train)
      stats = routing_stats(out.idx, out.keep, modality, cfg.num_experts)
      stats["aux_loss"] = out.aux_loss
      stats["z_loss"] = out.z_loss
      return out.y, stats
    logits = self.router(tokens)
    if train and cfg.second_expert_noise == "gumbel":
      if rng is None:
        raise ValueError("moe.second_expert_noise='gumbel' needs an rng in training")
      probs, gates, idx = gumbel_top2_gating(logits, rng)
    else:  # deterministic top-k: the default, and always at evaluation
      probs, gates, idx = top_k_gating(logits, cfg.top_k)
    if dispatch == "dropless":
      keep = jnp.ones_like(idx, dtype=bool)
      weights = combine_weights(gates, keep, cfg.renormalize)
      y = dispatch_dropless(self.experts, tokens, idx, weights)
      aux_loss = load_balancing_loss(probs, idx[:, 0])
    elif dispatch == "capacity":
      group = cfg.group_size or b
      if b % group:
        raise ValueError(f"batch of {b} sequences is not divisible by moe.group_size={group}")
      g, s = b // group, group * l
      capacity = cfg.capacity(s, train)
      grouped = lambda a: a.reshape((g, s) + a.shape[1:])
      slot, keep = jax.vmap(capacity_slots, (0, None, None))(grouped(idx), cfg.num_experts,
                                                             capacity)
      weights = combine_weights(grouped(gates), keep, cfg.renormalize)
      y = dispatch_capacity(self.experts, grouped(tokens), grouped(idx), keep, slot, weights,
                            capacity)
      keep = keep.reshape(b * l, cfg.top_k)
      # Each group balances its own router (as each DeepSpeed rank does); average them.
      aux_loss = jnp.mean(jax.vmap(load_balancing_loss)(grouped(probs), grouped(idx[:, 0])))
    else:
      raise ValueError(f"dispatch={dispatch!r}: expected 'capacity' or 'dropless'")
    stats = routing_stats(idx, keep, modality, cfg.num_experts)
    stats["aux_loss"] = aux_loss
    stats["z_loss"] = router_z_loss(logits)
    return y.reshape(b, l, d).astype(x.dtype), stats
