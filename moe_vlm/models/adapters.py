"""Per-sample and per-token adapters of the other seed designs.

- `HyperExpert` (HyperLLaVA): a HyperNetwork turns a guidance vector into the weights
  of a small SwiGLU adapter, per sample.
- `LoRAMoE` (Awaker2.5-VL): LoRA experts on frozen projections, mixed by a router, plus
  an always-on shared LoRA expert; `LoRA`: its plain LoRA (q/k/v, and stage I).

Both start as exact no-ops (the generator of W_u and every LoRA B start at zero), so
adding them to a trained model changes nothing until they train.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_vlm.models.attention import first_index, segment_cumsum
from moe_vlm.models.config import HyperExpertConfig, LoRAMoEConfig
from moe_vlm.models.layers import Dense, Norm, param, token_matmul, torch_linear_init

Array = jax.Array


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean of x [B, L, D] over the positions where mask [B, L] is set -> [B, D] (fp32)."""
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def prompt_mask(attention_mask: Array, loss_mask: Array,
                segment_ids: Optional[Array] = None) -> Array:
  """Valid tokens before each row's first target (with `segment_ids`, each segment's:
  packed rows hold several samples): the span guidance vectors read, so that no answer
  token shapes the weights used to predict it."""
  loss = loss_mask.astype(jnp.int32)
  seen = (jnp.cumsum(loss, axis=-1) if segment_ids is None else
          segment_cumsum(loss, segment_ids))
  return (attention_mask.astype(bool) & (seen == 0)).astype(jnp.int32)


class HyperExpert(nnx.Module):
  """expert(x) = W_u . SwiGLU(W_d . x), with {W_d, W_u} generated per sample from a guide.

  guide f [B, G] -> e = E_n(f) (the layer-specific encoder) -> h = W1 e + B1 ->
  W_d = h W2d + B2d [B, in, 2r] (gate and value halves of the SwiGLU) and
  W_u = h W2u + B2u [B, r, out]. W2u/B2u start at zero, so the expert starts silent
  while W_d is already non-degenerate (a zero W_d would get no gradient either).
  """

  def __init__(self, cfg: HyperExpertConfig, guide_dim: int, in_dim: int, out_dim: int, *,
               axes: tuple[Optional[str], Optional[str]], rngs: nnx.Rngs,
               dtype: str = "float32", param_dtype: str = "float32"):
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    e, r = cfg.expert_dim, cfg.bottleneck
    self.in_dim, self.out_dim, self.r = in_dim, out_dim, r
    # Variance-preserving (1/fan_in) encoder and hidden layer: the generated weights scale
    # with h, so h must start O(1) for the experts to learn at a useful rate.
    lecun = nnx.initializers.lecun_normal()
    self.encoder = Dense(guide_dim, e, axes=(axes[0], None), **kw, kernel_init=lecun)
    self.hidden = Dense(e, e, axes=(None, None), **kw, kernel_init=lecun)
    # W_d entries ~ 1/sqrt(in_dim) for a unit-scale h: the adapter's activations start O(1).
    self.gen_down = Dense(e, in_dim * 2 * r, axes=(None, None), **kw,
                          kernel_init=nnx.initializers.normal((e * in_dim) ** -0.5))
    self.gen_up = Dense(e, r * out_dim, axes=(None, None), **kw,
                        kernel_init=nnx.initializers.zeros)
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x: Array, guide: Array) -> Array:
    """x [B, L, in], guide [B, G] (one per row) or [B, L, G] (one per token: a packed
    row gives each token its sample's guide) -> [B, L, out]."""
    b = x.shape[0]
    h = self.hidden(jax.nn.silu(self.encoder(guide.astype(self.dtype))))
    if guide.ndim == 3:
      return self._per_token(x, h)
    w_down = self.gen_down(h).reshape(b, self.in_dim, 2 * self.r)
    w_up = self.gen_up(h).reshape(b, self.r, self.out_dim)
    gate, value = jnp.split(jnp.einsum("bli,bir->blr", x.astype(self.dtype), w_down), 2, -1)
    return jnp.einsum("blr,bro->blo", jax.nn.silu(gate) * value, w_up)

  def _per_token(self, x: Array, h: Array) -> Array:
    """The adapter with weights generated from a per-token code h [B, L, e], without
    materialising per-token weights: W_d and W_u are affine in h, so
    x W_d(h) = sum_j h_j (x G_j) + x B and likewise for W_u (G, B: the generators'
    kernel and bias). Costs e x the per-row adapter's multiply-adds; same function."""
    e, r, din, dout = h.shape[-1], self.r, self.in_dim, self.out_dim
    w = lambda p: p[...].astype(self.dtype)
    x = x.astype(self.dtype)
    g_down = w(self.gen_down.kernel).reshape(e, din, 2 * r)
    down = jnp.einsum("ble,bler->blr", h, jnp.einsum("bli,eir->bler", x, g_down))
    down = down + x @ w(self.gen_down.bias).reshape(din, 2 * r)
    gate, value = jnp.split(down, 2, -1)
    a = jax.nn.silu(gate) * value                                    # [B, L, r]
    outer = (h[..., :, None] * a[..., None, :]).reshape(*a.shape[:2], e * r)
    return outer @ w(self.gen_up.kernel).reshape(e * r, dout) + a @ w(
        self.gen_up.bias).reshape(r, dout)


def lora_dropout(x: Array, rate: float, rng: Optional[Array]) -> Array:
  """torch's nn.Dropout in training (rng given): zero with probability `rate`, scale
  the rest by 1 / (1 - rate); the identity without an rng (evaluation)."""
  if rng is None or rate == 0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _router_bias_init(fan_in: int):
  """torch nn.Linear's bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                  -bound, bound)


class LoRA(nnx.Module):
  """One plain LoRA per projection: y = (alpha / r) B A drop(x).

  Awaker2.5-VL's adapters on q/k/v, and in stage I (`LoRAMoEConfig.single`) on every
  target projection. `shapes` maps a projection's name to (in, out, logical axes of in,
  of out); parameters `<name>_a` [in, r] (torch Linear's init) and `<name>_b` [r, out]
  (zero). Stage II copies each `<name>_a/_b` into every expert of the same name.
  """

  def __init__(self, cfg: LoRAMoEConfig,
               shapes: dict[str, tuple[int, int, Optional[str], Optional[str]]], *,
               rngs: nnx.Rngs, dtype: str = "float32", param_dtype: str = "float32"):
    self.cfg = cfg
    self.names = tuple(shapes)
    self.dtype = jnp.dtype(dtype)
    for name, (din, dout, ain, aout) in shapes.items():
      setattr(self, f"{name}_a", param(rngs, torch_linear_init, (din, cfg.rank), (ain, None),
                                       param_dtype))
      setattr(self, f"{name}_b", param(rngs, nnx.initializers.zeros, (cfg.rank, dout),
                                       (None, aout), param_dtype))

  def delta(self, name: str, x: Array, rng: Optional[Array] = None) -> Array:
    """The adapter's output for projection `name`; `rng` (training) drives dropout."""
    w = lambda n: getattr(self, n)[...].astype(self.dtype)
    x = lora_dropout(x.astype(self.dtype), self.cfg.dropout, rng)
    return token_matmul(token_matmul(x, w(f"{name}_a")), w(f"{name}_b")) * self.cfg.scale

  def merged(self, name: str) -> Array:
    """The kernel delta [in, out]: adding it to the base kernel reproduces `delta`
    (without dropout)."""
    return (getattr(self, f"{name}_a")[...] @ getattr(self, f"{name}_b")[...]) * self.cfg.scale


class LoRAMoE(nnx.Module):
  """One router and the LoRA experts of a group of projections sharing it (Awaker2.5-VL).

  `shapes` maps a projection's name to (in, out, logical axes of in, of out).
  Parameters: the router `router_norm` (RMSNorm scale [R]), `router` [R, E] and
  `router_bias` [E]; per projection `<name>_a` [E, in, r], `<name>_b` [E, r, out] and,
  with a shared (global) expert, `<name>_shared_a` [in, r], `<name>_shared_b` [r, out].
  """

  def __init__(self, cfg: LoRAMoEConfig, router_dim: int,
               shapes: dict[str, tuple[int, int, Optional[str], Optional[str]]], *,
               rngs: nnx.Rngs, dtype: str = "float32", param_dtype: str = "float32"):
    self.cfg = cfg
    self.names = tuple(shapes)
    self.dtype = jnp.dtype(dtype)
    e, r = cfg.num_experts, cfg.rank
    # The gate: RMSNorm (weight starts at one) then a biased nn.Linear, in fp32.
    self.router_norm = Norm(router_dim, kind="rms", eps=cfg.norm_eps, rngs=rngs,
                            param_dtype="float32")
    self.router = param(rngs, torch_linear_init, (router_dim, e), ("embed", None), jnp.float32)
    self.router_bias = param(rngs, _router_bias_init(router_dim), (e,), (None,), jnp.float32)
    # A like LoRA's (kaiming-uniform of torch's Linear), B zero: a fresh expert adds 0.
    a_init = torch_linear_init
    zeros = nnx.initializers.zeros
    for name, (din, dout, ain, aout) in shapes.items():
      setattr(self, f"{name}_a", param(rngs, _per_expert(a_init), (e, din, r),
                                       (None, ain, None), param_dtype))
      setattr(self, f"{name}_b", param(rngs, zeros, (e, r, dout), (None, None, aout),
                                       param_dtype))
      if cfg.shared_expert:
        setattr(self, f"{name}_shared_a", param(rngs, a_init, (din, r), (ain, None),
                                                param_dtype))
        setattr(self, f"{name}_shared_b", param(rngs, zeros, (r, dout), (None, aout),
                                                param_dtype))

  def logits(self, u: Array) -> Array:
    """Router input u [..., R] (the raw embedding output) -> clean gate logits [..., E]."""
    h = self.router_norm(u.astype(jnp.float32))
    return jnp.dot(h, self.router[...]) + self.router_bias[...]

  def route(self, u: Array, *, train: bool = False, rng: Optional[Array] = None,
            noise_index: Optional[Array] = None) -> tuple[Array, Optional[Array]]:
    """Router input u [..., R] -> the routed experts' weights [..., E] (the top-k softmax
    values, zero elsewhere, not renormalised; times G_max again with
    `release_double_gate`) and the shared expert's weight 1 - G_max [..., 1].

    softmax((logits + noise) / temperature) as the release computes it, the noise
    noise_std * jax.random.normal(rng, logits.shape) in training only. A packed row
    routes per token on its sample's guide (u [B, L, R]): `noise_index` (its segment
    ids) then makes the noise one draw per sample, the one at its first token."""
    cfg = self.cfg
    logits = self.logits(u)
    if train and cfg.noise_std > 0 and rng is not None:
      noise = jax.random.normal(rng, logits.shape, jnp.float32)
      if noise_index is not None:
        noise = jnp.take_along_axis(noise, first_index(noise_index)[..., None], axis=1)
      logits = logits + cfg.noise_std * noise
    probs = jax.nn.softmax(logits / cfg.temperature, axis=-1)
    gates, idx = jax.lax.top_k(probs, cfg.top_k)  # descending: gates[..., 0] = G_max
    weights = jnp.sum(jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32)
                      * gates[..., None], axis=-2)
    if not cfg.shared_expert:
      return weights, None
    g_max = gates[..., :1]
    if cfg.release_double_gate:
      weights = weights * g_max
    return weights, 1.0 - g_max

  def delta(self, name: str, x: Array, weights: Array, shared: Optional[Array],
            rng: Optional[Array] = None) -> Array:
    """The experts' sum for projection `name`: x [B, L, in], weights [B, L or 1, E],
    shared [B, L or 1, 1]; `rng` (training) drives the LoRA dropout (one mask for the
    routed experts, another for the shared one)."""
    w = lambda n: getattr(self, n)[...].astype(self.dtype)
    x = x.astype(self.dtype)
    r_routed, r_shared = (None, None) if rng is None else jax.random.split(rng)
    xe = lora_dropout(x, self.cfg.dropout, r_routed)
    a, b = w(f"{name}_a"), w(f"{name}_b")
    if weights.shape[1] == 1 and self.cfg.top_k == 1:
      # One expert per sample (instance routing, top-1): run only that expert's A and B
      # (picked per sample by a one-hot contraction, which partitions like any matmul
      # where a gather's gradient would not) instead of every expert on every token.
      pick = jax.nn.one_hot(jnp.argmax(weights[:, 0], axis=-1), a.shape[0], dtype=self.dtype)
      g = jnp.max(weights[:, 0], axis=-1)[:, None, None].astype(self.dtype)
      xa = jnp.einsum("bli,bir->blr", xe, jnp.einsum("be,eir->bir", pick, a))
      y = jnp.einsum("blr,bro->blo", xa * g, jnp.einsum("be,ero->bro", pick, b))
    else:
      xa = jnp.einsum("bli,eir->bler", xe, a) * weights[..., None].astype(self.dtype)
      y = jnp.einsum("bler,ero->blo", xa, b)
    if shared is not None:
      xs = lora_dropout(x, self.cfg.dropout, r_shared)
      y = y + token_matmul(token_matmul(xs, w(f"{name}_shared_a")),
                           w(f"{name}_shared_b")) * shared.astype(self.dtype)
    return y * self.cfg.scale

  def merged(self, name: str, weights: Array, shared: Optional[Array]) -> Array:
    """The kernel delta [in, out] of one fixed routing (weights [E], shared [1]): adding it
    to the base kernel reproduces `delta` (without dropout) for every token routed so."""
    d = jnp.einsum("eir,ero,e->io", getattr(self, f"{name}_a")[...],
                   getattr(self, f"{name}_b")[...], weights)
    if shared is not None:
      d = d + shared[0] * (getattr(self, f"{name}_shared_a")[...]
                           @ getattr(self, f"{name}_shared_b")[...])
    return d * self.cfg.scale


def _per_expert(init):
  """An [in, out] initializer applied to each [E, in, out] slice (fan-in of one expert)."""
  def f(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)
  return f

