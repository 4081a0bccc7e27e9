"""Small building blocks shared by the vision tower and the decoder.

Every parameter is created through `param()`, which records its logical axis names
(`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `expert`, ...). The sharding code maps
those names to mesh axes with rules from the config, so no module knows about meshes.
Eager sharding is off: parameters are placed by the train step's explicit shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The attention math lives in `attention` (one interface for every backend); these names
# stay importable from here.
from moe_vlm.models.attention import (SelfMask, causal_blocks_bounds,  # noqa: F401
                                      causal_pairs, causal_self_attention,
                                      dot_product_attention)

Array = jax.Array
Initializer = Callable[..., Array]

# torch.nn.Linear's default init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)):
# used for fresh routers so an upcycled model starts like MoE-LLaVA's.
torch_linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
default_kernel_init = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          axes: Sequence[Optional[str]], dtype: jnp.dtype = jnp.float32) -> nnx.Param:
  """A parameter annotated with logical axis names (one per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(axes), eager_sharding=False)


def token_matmul(x: Array, w: Array) -> Array:
  """x[..., in] @ w[in, out], computed as one 2-D matmul over the flattened tokens.

  Why flatten: a weight gradient contracts every leading (token) axis. With [B, L, in]
  activations XLA:CPU lowers that contraction through transposing copies of the
  activations' gradients (fused into e.g. silu's backward); with [B*L, in] it runs the
  dot on the operands as they lie. The reshape is free in row-major layout.
  """
  if x.ndim <= 2:
    return jnp.dot(x, w)
  y = jnp.dot(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(*x.shape[:-1], w.shape[-1])


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel stored [in, out] (transpose of torch's Linear)."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
               use_bias: bool, rngs: nnx.Rngs, dtype: str = "float32",
               param_dtype: str = "float32", kernel_init: Initializer = default_kernel_init):
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), axes[1:], param_dtype)
                 if use_bias else None)
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x: Array) -> Array:
    y = token_matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Norm(nnx.Module):
  """LayerNorm (with bias) or RMSNorm, computed in fp32 like the HF references."""

  def __init__(self, dim: int, *, kind: str, eps: float, rngs: nnx.Rngs,
               param_dtype: str = "float32", use_bias: bool = True):
    self.kind = kind
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)
                 if kind == "layer" and use_bias else None)

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "rms":
      x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
      # HF casts back to the input dtype before the scale; keep that order.
      return self.scale[...].astype(dtype) * x.astype(dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(dtype)


def activation(name: str) -> Callable[[Array], Array]:
  """HF activation names -> functions with the same numerics."""
  if name == "silu":
    return jax.nn.silu
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"unknown activation {name!r}")


# Largest rope table (positions x rotary_dim) kept as a constant: 4 MiB of float32 each
# for cos and sin (2048 positions at rotary_dim 128 take 1 MiB). Longer contexts compute
# the tables on the device instead of embedding them in the program.
ROPE_TABLE_MAX_ELEMENTS = 1 << 20


def rope_tables(positions: Array, rotary_dim: int, theta: float,
                num_positions: Optional[int] = None) -> tuple[Array, Array]:
  """cos/sin of shape [B, L, rotary_dim] in HF's half-split ("rotate_half") layout.

  With `num_positions` (a static bound: every position is < it), the tables are
  gathered from [num_positions, rotary_dim] constants computed here in float32, as HF
  computes them, instead of by cos/sin on the device. Why: XLA:CPU fuses the cos/sin
  into every consumer (q and k of each layer, forward and backward) and so recomputes
  the trigonometry per head; a gather fused there is a load. On the benchmark train
  step that was worth 1.07x.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
  inv_freq = inv_freq.astype(np.float32)
  if num_positions is not None and num_positions * rotary_dim <= ROPE_TABLE_MAX_ELEMENTS:
    freqs = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return (jnp.take(jnp.asarray(np.cos(emb)), positions, axis=0, mode="clip"),
            jnp.take(jnp.asarray(np.sin(emb)), positions, axis=0, mode="clip"))
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates the first `rotary_dim` channels of x [B, L, H, D]; the rest pass (partial rotary)."""
  rd = cos.shape[-1]
  half = rd // 2
  # HF's x * cos + rotate_half(x) * sin, written per half: the tables repeat their
  # halves, and one concatenate (instead of rotate_half's and the partial split's two)
  # leaves less for XLA to pad and slice in the backward pass.
  cos = cos[:, :, None, :half].astype(x.dtype)
  sin = sin[:, :, None, :half].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:rd]
  parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  if rd < x.shape[-1]:
    parts.append(x[..., rd:])
  return jnp.concatenate(parts, axis=-1)


class KVCache(NamedTuple):
  """Keys and values of every decoder layer over T fixed slots (static decode shapes).

  k, v: [layers, B, T, KV, D]; index: int32 scalar, the slot the next token goes to
  (shared by all rows: prompts are left-padded, so every row appends at the same slot).
  """

  k: Array
  v: Array
  index: Array
  # Per-sample guidance vectors computed from the prompt at prefill (HyperLLaVA's
  # language expert, Awaker's instance router), reused by every later decode step.
  guides: Optional[dict[str, Array]] = None
  # M-RoPE (Qwen2-VL): per row [B], the next free position after the prefill minus its
  # token count; a decoded token's position is its plain one plus this.
  rope_delta: Optional[Array] = None

  @classmethod
  def zeros(cls, shape: Sequence[int], dtype: jnp.dtype) -> KVCache:
    """An empty cache of `shape` [layers, B, T, KV, D] writing from slot 0."""
    # Two buffers, not one shared: a cache passed to a donating jit donates both.
    return cls(jnp.zeros(tuple(shape), dtype), jnp.zeros(tuple(shape), dtype),
               jnp.zeros((), jnp.int32))

  @property
  def length(self) -> int:
    return self.k.shape[2]

  def layer(self, i: int) -> LayerCache:
    return LayerCache(self, i)


@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's view of a KVCache: what a single Attention reads and writes.

  Writes go straight into the stacked buffers (not into a per-layer copy that is put
  back), so inside a decode loop XLA updates the carried cache in place.
  """

  cache: KVCache
  layer: int

  def write(self, k: Array, v: Array) -> LayerCache:
    """k/v [B, L, KV, D] stored at this layer's slots index..index+L-1."""
    start = (self.layer, 0, self.cache.index, 0, 0)
    put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype),
                                                        start)
    return LayerCache(self.cache._replace(k=put(self.cache.k, k), v=put(self.cache.v, v)),
                      self.layer)

  @property
  def keys(self) -> Array:
    return self.cache.k[self.layer]

  @property
  def values(self) -> Array:
    return self.cache.v[self.layer]


class Attention(nnx.Module):
  """Multi-head attention with GQA and optional (partial) rotary embeddings.

  Projections are flat [embed, heads*head_dim] so the HF weights map 1:1 and
  tensor parallelism can shard the `heads` axis on head boundaries.
  """

  def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               qkv_bias: bool, o_bias: bool, rngs: nnx.Rngs, dtype: str = "float32",
               param_dtype: str = "float32", causal_blocks: int = 1, impl: str = "einsum",
               block_size: int = 64):
    """`causal_blocks` > 1: the einsum path may skip the upper triangle of a causal mask
    in that many query blocks. `impl` / `block_size`: how causal self-attention runs
    (`attention.causal_self_attention`; a dense mask always takes the einsum path)."""
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.causal_blocks, self.impl, self.block_size = causal_blocks, impl, block_size
    self.query = Dense(hidden, num_heads * head_dim, axes=("embed", "heads"),
                       use_bias=qkv_bias, **kw)
    self.key = Dense(hidden, num_kv_heads * head_dim, axes=("embed", "kv_heads"),
                     use_bias=qkv_bias, **kw)
    self.value = Dense(hidden, num_kv_heads * head_dim, axes=("embed", "kv_heads"),
                       use_bias=qkv_bias, **kw)
    self.out = Dense(num_heads * head_dim, hidden, axes=("heads", "embed"),
                     use_bias=o_bias, **kw)

  def __call__(self, x: Array, mask: Optional[Array | SelfMask],
               rope: Optional[tuple[Array, Array]] = None,
               cache: Optional[LayerCache] = None, *,
               lora: Optional[Callable[[str, Array], Array]] = None
               ) -> Array | tuple[Array, LayerCache]:
    """x [B, L, D]; mask: a `SelfMask` (causal self-attention, within segments when the
    row is packed), a dense [B, L, L] bool mask (True = may attend), or None for full
    attention.

    With a `cache` (decoding), the L new keys/values are written at slots
    `index ..` of this layer, the queries attend over all T cache slots (mask
    [B, L, T]), and the call returns (out, updated cache). `lora(name, x)` adds an
    adapter's output to projection `name` ("query", "key", "value", "out") for its
    input x, or returns None for a projection it has no adapter on.
    """
    b, l, _ = x.shape

    def proj(name: str, x: Array) -> Array:
      y = getattr(self, name)(x)
      d = None if lora is None else lora(name, x)  # LoRA (Awaker2.5-VL)
      return y if d is None else y + d.astype(y.dtype)

    q = proj("query", x).reshape(b, l, self.num_heads, self.head_dim)
    k = proj("key", x).reshape(b, l, self.num_kv_heads, self.head_dim)
    v = proj("value", x).reshape(b, l, self.num_kv_heads, self.head_dim)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if cache is not None:
      cache = cache.write(k, v)
      k, v = cache.keys, cache.values
    if isinstance(mask, SelfMask):
      if cache is not None:
        raise ValueError("a KV cache needs a dense mask over its slots, not a SelfMask")
      ctx = causal_self_attention(q, k, v, mask, impl=self.impl,
                                  causal_blocks=self.causal_blocks, block_size=self.block_size)
    else:  # a dense mask or none; with a cache the queries sit at slots index.. of T
      blocks = self.causal_blocks if cache is None else 1
      ctx = dot_product_attention(q, k, v, mask, causal_blocks=blocks)
    ctx = ctx.reshape(b, l, self.num_heads * self.head_dim)
    out = proj("out", ctx)
    return out if cache is None else (out, cache)


class MLP(nnx.Module):
  """The dense FFN: gated (SwiGLU-style) or plain two-layer with bias (Phi, ViT)."""

  def __init__(self, hidden: int, intermediate: int, *, kind: str, activation_name: str,
               use_bias: bool, rngs: nnx.Rngs, dtype: str = "float32",
               param_dtype: str = "float32"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
    self.kind = kind
    self.act = activation(activation_name)
    if kind == "gated":
      self.wi_gate = Dense(hidden, intermediate, axes=("embed", "mlp"), **kw)
      self.wi_up = Dense(hidden, intermediate, axes=("embed", "mlp"), **kw)
    else:
      self.wi = Dense(hidden, intermediate, axes=("embed", "mlp"), **kw)
    self.wo = Dense(intermediate, hidden, axes=("mlp", "embed"), **kw)

  def __call__(self, x: Array, lora: Optional[Callable[[str, Array], Array]] = None) -> Array:
    """`lora(name, x)`, when given, adds an adapter's output to projection `name`."""
    proj = (lambda name, x: getattr(self, name)(x)) if lora is None else (
        lambda name, x: getattr(self, name)(x) + lora(name, x).astype(self.wo.dtype))
    if self.kind == "gated":
      h = self.act(proj("wi_gate", x)) * proj("wi_up", x)
    else:
      h = self.act(proj("wi", x))
    return proj("wo", h)
