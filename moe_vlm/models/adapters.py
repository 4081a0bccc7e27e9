"""Per-sample and per-token adapters of the other seed designs.

- `HyperExpert` (HyperLLaVA): a HyperNetwork turns a guidance vector into the weights
  of a small SwiGLU adapter, per sample.
- `LoRAMoE` (Awaker2.5-VL): LoRA experts on frozen projections, mixed by a router, plus
  an always-on shared LoRA expert.

Both start as exact no-ops (the generator of W_u and every LoRA B start at zero), so
adding them to a trained model changes nothing until they train.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_vlm.models.attention import segment_cumsum
from moe_vlm.models.config import HyperExpertConfig, LoRAMoEConfig
from moe_vlm.models.layers import Dense, param, torch_linear_init

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


class LoRAMoE(nnx.Module):
  """One router and the LoRA experts of a group of projections sharing it.

  `shapes` maps a projection's name to (in, out, logical axes of in, of out). Parameters:
  `router` [R, E]; per projection `<name>_a` [E, in, r], `<name>_b` [E, r, out] and,
  with a shared expert, `<name>_shared_a` [in, r], `<name>_shared_b` [r, out].
  """

  def __init__(self, cfg: LoRAMoEConfig, router_dim: int,
               shapes: dict[str, tuple[int, int, Optional[str], Optional[str]]], *,
               rngs: nnx.Rngs, dtype: str = "float32", param_dtype: str = "float32"):
    self.cfg = cfg
    self.names = tuple(shapes)
    self.scale = cfg.alpha / cfg.rank
    self.dtype = jnp.dtype(dtype)
    e, r = cfg.num_experts, cfg.rank
    self.router = param(rngs, torch_linear_init, (router_dim, e), ("embed", None), jnp.float32)
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

  def route(self, u: Array, *, train: bool = False, rng: Optional[Array] = None,
            noise_index: Optional[Array] = None) -> tuple[Array, Optional[Array]]:
    """Router input u [..., R] -> expert weights [..., E] (top-k softmax values, zero
    elsewhere; not renormalised) and the shared expert's weight 1 - sum(top-k) [..., 1].
    `noise_index` [B, L] (u [B, L, R]): tokens with the same index in a row draw the
    same training noise (the samples of a packed row, each routed as one instance)."""
    cfg = self.cfg
    logits = jnp.dot(u.astype(jnp.float32), self.router[...]) / cfg.temperature
    if train and cfg.noise_std > 0 and rng is not None:
      if noise_index is None:
        noise = jax.random.normal(rng, logits.shape, jnp.float32)
      else:
        b, l, e = logits.shape
        table = jax.random.normal(rng, (b, l + 1, e), jnp.float32)
        noise = jnp.take_along_axis(table, jnp.clip(noise_index, 0, l)[..., None], axis=1)
      logits = logits + cfg.noise_std * noise
    probs = jax.nn.softmax(logits, axis=-1)
    gates, idx = jax.lax.top_k(probs, cfg.top_k)
    weights = jnp.sum(jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32)
                      * gates[..., None], axis=-2)
    shared = 1.0 - jnp.sum(gates, axis=-1, keepdims=True) if cfg.shared_expert else None
    return weights, shared

  def delta(self, name: str, x: Array, weights: Array, shared: Optional[Array]) -> Array:
    """The experts' sum for projection `name`: x [B, L, in], weights [B, L or 1, E]."""
    w = lambda n: getattr(self, n)[...].astype(self.dtype)
    x = x.astype(self.dtype)
    xa = jnp.einsum("bli,eir->bler", x, w(f"{name}_a")) * weights[..., None].astype(self.dtype)
    y = jnp.einsum("bler,ero->blo", xa, w(f"{name}_b"))
    if shared is not None:
      y = y + (x @ w(f"{name}_shared_a") @ w(f"{name}_shared_b")) * shared.astype(self.dtype)
    return y * self.scale

  def merged(self, name: str, weights: Array, shared: Optional[Array]) -> Array:
    """The kernel delta [in, out] of one fixed routing (weights [E], shared [1]): adding it
    to the base kernel reproduces `delta` for every token routed that way."""
    d = jnp.einsum("eir,ero,e->io", getattr(self, f"{name}_a")[...],
                   getattr(self, f"{name}_b")[...], weights)
    if shared is not None:
      d = d + shared[0] * (getattr(self, f"{name}_shared_a")[...]
                           @ getattr(self, f"{name}_shared_b")[...])
    return d * self.scale


def _per_expert(init):
  """An [in, out] initializer applied to each [E, in, out] slice (fan-in of one expert)."""
  def f(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)
  return f

