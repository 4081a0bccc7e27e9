"""The MoE routing core: MoE-LLaVA's routing semantics written once, for every dispatch.

Who owns what (no module below imports one above it):

- this module: everything that decides where a token goes and how its expert outputs
  come back, for one set of tokens - router probabilities and top-k (deterministic, or
  DeepSpeed's Gumbel second expert), gate renormalisation, capacity slots and the
  per-expert [E, C] buffers (scatter, gather), the dropless sort by expert (permute,
  unpermute), the gate-weighted combine, the load-balancing and z losses and the
  routing statistics. `route_and_dispatch` strings them together. It holds no
  parameters and knows no mesh: the experts come in as functions (`ExpertFns`), means
  over other devices' tokens as mesh axis names (a `pmean`, for code running under
  shard_map), and sharding hints as a `layout` callback.
- `moe_vlm.models.moe`: the parameters (`Router`, `Experts`) and the layer. It calls
  `route_and_dispatch` either once over the whole batch (the local / GSPMD dispatch) or
  per device inside shard_map with the experts wrapped by the exchanges of
  `moe_vlm.parallel.expert_parallel` (expert parallelism).
- `moe_vlm.parallel.expert_parallel`: the collectives only (mesh checks, the
  shard_map layout, capacity all-to-all, the dropless ragged exchange and its padded
  emulation). It imports nothing from `moe_vlm.models`.

Semantics (MoE-LLaVA / DeepSpeed 0.9.5 top-2 gating where it defines them):
- router logits in fp32, softmax over all experts, top-k by probability (top-1 first);
- capacity per expert = ceil(S / E * factor * k) over the S tokens of a routing
  group, floored at `min_capacity`; every token's first choice is placed (in sequence
  order) before any second choice; assignments past capacity are dropped;
- gate weights of the kept choices are renormalised to sum to one; a token whose
  choices were all dropped contributes zero (only the residual passes);
- aux loss = mean(me * ce) * E^2 with me the mean router probability and ce the
  fraction of tokens whose top-1 is the expert, measured before dropping.
Dispatch is index arithmetic (a scatter into [E, C, D] buffers, or a sort by expert
and a grouped matmul), not DeepSpeed's one-hot einsums whose cost grows as S^2 x E.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from moe_vlm.models.config import MoEConfig

Array = jax.Array

# Token modality codes carried next to the tokens for routing statistics.
PAD, TEXT, IMAGE = 0, 1, 2

DISPATCHES = ("capacity", "dropless")
# Logical axes of the capacity buffers [E, G*C, D] and of the buffers regrouped per
# routing group [G, E*C, D], for the `layout` callback.
BUFFER_AXES = ("expert", "expert_tokens", "act_embed")
GROUP_AXES = ("batch", None, "act_embed")

Layout = Callable[[Array, Sequence[Optional[str]]], Array]


def no_layout(x: Array, axes: Sequence[Optional[str]]) -> Array:
  del axes
  return x


# ---------------------------------------------------------------------- gating


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


def combine(out: Array, weights: Array) -> Array:
  """The gate-weighted sum of each token's k expert outputs: [..., k, D] -> [..., D]."""
  return jnp.einsum("...kd,...k->...d", out, weights.astype(out.dtype))


# ------------------------------------------------------------- capacity buffers


def buffer_index(idx: Array, keep: Array, slot: Array, num_experts: int,
                 capacity: int) -> Array:
  """Flat position e*C + slot of each (token, choice) of a group: [S, k] -> [S*k].

  Dropped choices point one past the buffer (E*C), so scatter (`mode="drop"`) and
  gather (`mode="fill"`) skip them.
  """
  s, k = idx.shape
  return jnp.where(keep, idx * capacity + slot, num_experts * capacity).reshape(s * k)


def scatter_to_buffers(x: Array, flat: Array, num_experts: int, capacity: int) -> Array:
  """Each group's tokens x [G, S, D] into per-expert buffers [E, G*C, D].

  `flat` [G, S*k] from `buffer_index`. The buffers of all groups meet the experts as
  one array: with groups split over the batch axes and experts over `expert`, that
  relayout is the all-to-all of expert parallelism.
  """
  g, s, d = x.shape
  k = flat.shape[1] // s
  tokens = jnp.repeat(x, k, axis=1)
  scatter = lambda f, t: jnp.zeros((num_experts * capacity, d), x.dtype).at[f].set(
      t, mode="drop")
  buf = jax.vmap(scatter)(flat, tokens).reshape(g, num_experts, capacity, d)
  return buf.transpose(1, 0, 2, 3).reshape(num_experts, g * capacity, d)


def gather_from_buffers(out: Array, flat: Array, layout: Layout = no_layout) -> Array:
  """Inverse of `scatter_to_buffers`: [E, G*C, D] -> each choice's output [G, S, k, D]
  (zeros for dropped choices)."""
  num_experts, _, d = out.shape
  g, sk = flat.shape
  out = out.reshape(num_experts, g, -1, d).transpose(1, 0, 2, 3)
  out = layout(out.reshape(g, -1, d), GROUP_AXES)
  gather = lambda o, f: jnp.take(o, f, axis=0, mode="fill", fill_value=0)
  return jax.vmap(gather)(out, flat).reshape(g, sk, d)


# -------------------------------------------------------------- dropless sort


class ExpertSort(NamedTuple):
  """The S*k (token, choice) assignments sorted by expert (stable: token order within)."""
  order: Array          # [S*k] flat assignment s*k + j of each sorted row
  sorted_expert: Array  # [S*k] expert of each sorted row (non-decreasing)
  group_sizes: Array    # [E] rows per expert


def sort_by_expert(idx: Array, num_experts: int) -> ExpertSort:
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return ExpertSort(order, flat[order], sizes)


def permute(tokens: Array, sort: ExpertSort, k: int) -> Array:
  """tokens [S, D] -> one row per assignment, sorted by expert [S*k, D]."""
  return tokens[sort.order // k]


def unpermute(rows: Array, sort: ExpertSort, k: int) -> Array:
  """Inverse of `permute` on the expert outputs: [S*k, D] -> [S, k, D]."""
  out = jnp.zeros_like(rows).at[sort.order].set(rows, unique_indices=True)
  return out.reshape(-1, k, rows.shape[-1])


# ------------------------------------------------------------ losses and stats


def _mean(x: Array, axis_names: Sequence[str]) -> Array:
  """Mean over the leading axis, then over the devices of `axis_names` (each holds the
  same number of tokens, so the mean of means is the mean)."""
  m = jnp.mean(x, axis=0)
  return jax.lax.pmean(m, tuple(axis_names)) if axis_names else m


def load_balancing_loss(probs: Array, top1: Array, axis_names: Sequence[str] = ()) -> Array:
  """MoE-LLaVA / GShard: mean(me * ce) * E^2; 1.0 when the router is balanced.

  With `axis_names` (under shard_map), me and ce are over the tokens of every device
  along those axes, i.e. the loss of the global batch.
  """
  e = probs.shape[-1]
  me = _mean(probs, axis_names)
  ce = _mean(jax.nn.one_hot(top1, e, dtype=jnp.float32), axis_names)
  return jnp.mean(me * ce) * e * e


def router_z_loss(logits: Array, axis_names: Sequence[str] = ()) -> Array:
  """ST-MoE z-loss: mean(logsumexp(logits)^2), keeps router logits small."""
  return _mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)), axis_names)


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


# ------------------------------------------------------------------- dispatch


class ExpertFns(NamedTuple):
  """How dispatched tokens meet the experts; the only part that differs between the
  local dispatch and expert parallelism (where these wrap the token exchange)."""
  # dropless: rows [N, D] sorted by expert, group_sizes [E], expert of each row [N]
  # -> [N, D]. Rows past sum(group_sizes) may come back as anything; they are not read.
  grouped: Callable[[Array, Array, Array], Array]
  # capacity: buffers [E, T, D] -> [E, T, D]
  batched: Callable[[Array], Array]


class Dispatched(NamedTuple):
  """What a dispatch returns; statistics are computed from idx/keep by the caller."""
  y: Array         # [S, D]
  idx: Array       # [S, k] expert choices (top-1 first)
  keep: Array      # [S, k] whether each choice was computed
  aux_loss: Array  # scalar
  z_loss: Array    # scalar


def dispatch_dropless(tokens: Array, idx: Array, weights: Array, num_experts: int,
                      grouped: Callable[[Array, Array, Array], Array]) -> Array:
  """Sort the S*k assignments by expert, run the experts, unsort, combine: [S, D]."""
  k = idx.shape[1]
  sort = sort_by_expert(idx, num_experts)
  out = grouped(permute(tokens, sort, k), sort.group_sizes, sort.sorted_expert)
  return combine(unpermute(out, sort, k), weights)


def dispatch_capacity(tokens: Array, idx: Array, keep: Array, slot: Array, weights: Array,
                      num_experts: int, capacity: int, batched: Callable[[Array], Array],
                      layout: Layout = no_layout) -> Array:
  """Scatter each group into [E, C, D] buffers, run the experts, gather, combine.

  tokens [G, S, D], idx/keep/slot/weights [G, S, k] -> [G, S, D].
  """
  g, s, k = idx.shape
  flat = jax.vmap(buffer_index, (0, 0, 0, None, None))(idx, keep, slot, num_experts, capacity)
  buf = layout(scatter_to_buffers(tokens, flat, num_experts, capacity), BUFFER_AXES)
  out = layout(batched(buf), BUFFER_AXES)
  picked = gather_from_buffers(out, flat, layout).reshape(g, s, k, -1)
  return combine(picked, weights)


def route_and_dispatch(tokens: Array, logits: Array, cfg: MoEConfig, experts: ExpertFns, *,
                       dispatch: str, train: bool, num_groups: int = 1,
                       rng: Optional[Array] = None, axis_names: Sequence[str] = (),
                       layout: Layout = no_layout) -> Dispatched:
  """Route tokens [S, D] (router logits [S, E]) and dispatch them to the experts.

  The one routing path of the MoE layer: the local dispatch calls it on the whole
  batch, expert parallelism on each device's tokens with `axis_names` (the batch axes,
  so that the losses are those of the global batch) and exchange-wrapped `experts`.
  `num_groups`: capacity routing groups the S tokens split into (S / num_groups each).
  """
  if dispatch not in DISPATCHES:
    raise ValueError(f"dispatch={dispatch!r}: expected 'capacity' or 'dropless'")
  if train and cfg.second_expert_noise == "gumbel":
    if rng is None:
      raise ValueError("moe.second_expert_noise='gumbel' needs an rng in training")
    probs, gates, idx = gumbel_top2_gating(logits, rng)
  else:  # deterministic top-k: the default, and always at evaluation
    probs, gates, idx = top_k_gating(logits, cfg.top_k)
  e = cfg.num_experts
  if dispatch == "dropless":
    keep = jnp.ones_like(idx, dtype=bool)
    weights = combine_weights(gates, keep, cfg.renormalize)
    y = dispatch_dropless(tokens, idx, weights, e, experts.grouped)
    aux_loss = load_balancing_loss(probs, idx[:, 0], axis_names)
  else:
    s = tokens.shape[0] // num_groups
    capacity = cfg.capacity(s, train)
    grouped = lambda a: a.reshape((num_groups, s) + a.shape[1:])
    slot, keep = jax.vmap(capacity_slots, (0, None, None))(grouped(idx), e, capacity)
    weights = combine_weights(grouped(gates), keep, cfg.renormalize)
    y = dispatch_capacity(grouped(tokens), grouped(idx), keep, slot, weights, e, capacity,
                          experts.batched, layout).reshape(tokens.shape)
    keep = keep.reshape(idx.shape)
    # Each group balances its own router (as each DeepSpeed rank does); average them
    # (every device holds the same number of groups).
    per_group = jax.vmap(load_balancing_loss)(grouped(probs), grouped(idx[:, 0]))
    aux_loss = _mean(per_group, axis_names)
  return Dispatched(y, idx, keep, aux_loss, router_z_loss(logits, axis_names))
