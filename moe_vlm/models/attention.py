"""Attention for the decoder: one interface, masks from segment ids, the backend's kernel.

Causal self-attention (training, and any forward pass without a KV cache) goes through
`causal_self_attention(q, k, v, mask, impl=...)`. A row holds one sample or, packed
(`data.packing="first_fit"`), several: `SelfMask.segment_ids` [B, L] numbers them 1, 2,
... (0 = padding), and token i may attend key j exactly when

    j <= i  and  segment_ids[i] == segment_ids[j]

(padding tokens attend padding, so no query is left without a key). Without segment
ids (one sample per row) a token attends the valid keys before it (`attention_mask`),
as before; the fused kernels then take the attention mask as segment ids, which gives
every valid token the same result.

Implementations (`TextConfig.attention_impl`, "auto" picks by backend):
- "einsum": the dense masked softmax of `dot_product_attention`, with causal query
  blocks; runs anywhere, and is the reference the others are tested against;
- "blocked": flash-style attention in `jax.lax` loops (`blocked_attention`): queries
  in blocks of `attention_block_size`, each block visiting only the key blocks from
  the first one its segments start in up to the diagonal, so a packed row of short
  samples costs about what the samples cost one per row; online softmax forward, and a
  backward that recomputes the probabilities from the saved log-sum-exp (custom VJP).
  XLA:CPU has no fused attention kernel: this is "auto" on CPU for packed rows;
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash
  attention) with `is_causal` and the segment mask; "auto" on GPU;
- "splash": Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`)
  with the causal mask and `SegmentIds`; "auto" on TPU. Its blocks are skipped by the
  static causal mask only (segment ids are applied inside the blocks it computes), as
  in MaxText. `interpret=True` runs it on CPU (tests).

Under a mesh the kernels run per device (`jax.shard_map` over the batch axes, and the
heads over `model` when they divide it): a Pallas call or a loop over rows is not
something the SPMD partitioner can split.

With a KV cache (decoding) the decoder passes a dense [B, Lq, T] mask instead, and
`dot_product_attention` runs (the queries sit at slots index.. of the cache).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array

IMPLS = ("auto", "einsum", "blocked", "cudnn", "splash")
# A large finite negative: fully masked entries stay finite (no NaN from -inf - -inf).
NEG = float(jnp.finfo(jnp.float32).min)


class SelfMask(NamedTuple):
  """What causal self-attention without a cache may see (see the module docstring).

  Exactly one of the fields is set: `segment_ids` [B, L] for packed rows, otherwise
  `attention_mask` [B, L] (1 on valid tokens). A NamedTuple of arrays so it passes
  through `nnx.remat` like any other argument.
  """
  segment_ids: Optional[Array] = None
  attention_mask: Optional[Array] = None

  @property
  def packed(self) -> bool:
    return self.segment_ids is not None

  def ids(self) -> Array:
    """The segment ids the fused kernels take (the attention mask for unpacked rows)."""
    return (self.segment_ids if self.packed else self.attention_mask).astype(jnp.int32)


def resolve_impl(impl: str, *, packed: bool, backend: Optional[str] = None) -> str:
  """The implementation "auto" stands for on `backend` (default: jax's)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r}: expected one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend in ("gpu", "cuda", "rocm"):
    return "cudnn"
  return "blocked" if packed else "einsum"


# ----------------------------------------------------------------- segment helpers


def segment_causal_mask(segment_ids: Array) -> Array:
  """[B, L] segment ids -> [B, L, L] bool: causal, and only within a segment."""
  l = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((l, l), dtype=bool))
  return causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def causal_mask(attention_mask: Array) -> Array:
  """[B, L] validity -> [B, L, L] bool: causal and only onto valid keys."""
  l = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((l, l), dtype=bool))
  return causal[None] & attention_mask[:, None, :].astype(bool)


def first_index(segment_ids: Array) -> Array:
  """[B, L] -> for every token, the first position in its row holding its segment id.

  Ids outside [0, L] are clipped into it (merging them can only make the result
  smaller: what callers use it for, a lower bound on the keys a token sees, stays
  true)."""
  b, l = segment_ids.shape
  ids = jnp.clip(segment_ids.astype(jnp.int32), 0, l)
  pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  first = jnp.full((b, l + 1), l, jnp.int32).at[jnp.arange(b)[:, None], ids].min(pos)
  return jnp.take_along_axis(first, ids, axis=1)


def positions_from_segments(segment_ids: Array) -> Array:
  """Position ids that restart at 0 at every segment (segments are contiguous)."""
  return jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)[None] - first_index(segment_ids)


def segment_cumsum(x: Array, segment_ids: Array) -> Array:
  """Cumulative sum of x [B, L] along each row, restarting at every segment (segments
  are contiguous, as the packer lays them out)."""
  c = jnp.cumsum(x, axis=-1)
  first = first_index(segment_ids)
  before = jnp.take_along_axis(c, jnp.maximum(first - 1, 0), axis=1)
  return c - jnp.where(first > 0, before, jnp.zeros_like(before))


def segment_mean(x: Array, mask: Array, segment_ids: Array) -> Array:
  """Per token, the mean of x [B, L, D] over the positions of its own segment where
  mask [B, L] is set -> [B, L, D] (fp32): a per-sample summary, given to every token of
  the sample. Ids are clipped into [0, L]."""
  b, l, _ = x.shape
  ids = jnp.clip(segment_ids.astype(jnp.int32), 0, l)
  m = mask.astype(jnp.float32)
  rows = jnp.arange(b)[:, None]
  sums = jnp.zeros((b, l + 1, x.shape[-1]), jnp.float32).at[rows, ids].add(
      x.astype(jnp.float32) * m[..., None])
  counts = jnp.zeros((b, l + 1), jnp.float32).at[rows, ids].add(m)
  mean = sums / jnp.maximum(counts, 1.0)[..., None]
  return jnp.take_along_axis(mean, ids[..., None], axis=1)


# ------------------------------------------------------------------- einsum path


def causal_blocks_bounds(length: int, causal_blocks: int) -> list[tuple[int, int]]:
  """[start, end) of each query block; block [start, end) attends keys [0, end)."""
  size = -(-length // max(causal_blocks, 1))
  return [(start, min(start + size, length)) for start in range(0, length, size)]


def causal_pairs(length: int, causal_blocks: int) -> int:
  """Query-key pairs `dot_product_attention` computes for causal self-attention over
  `length` tokens in `causal_blocks` blocks (length^2 at 1 block): FLOP accounting."""
  return sum((end - start) * end for start, end in causal_blocks_bounds(length, causal_blocks))


def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array], *,
                          causal_blocks: int = 1) -> Array:
  """softmax(q k^T / sqrt(d)) v with grouped kv heads; softmax in fp32.

  q [B, Lq, H, D], k/v [B, Lk, KV, D], mask [B, Lq, Lk] -> [B, Lq, H, D].

  `causal_blocks` > 1 promises that `mask` is causal (query i sees no key j > i, so
  Lq == Lk: self-attention without a cache): the queries are then split into that
  many blocks and block n attends only keys up to its last query. The keys it skips
  are masked for all its queries, so every query that may attend some key gets the
  same result, while the masked upper triangle is mostly not computed: (n + 1) / 2n of
  the score and value FLOPs, forward and backward (62.5% at 4 blocks). (A query with
  no visible key at all, a left-padding row, averages the values it is given either
  way; nothing reads it.)
  """
  b, lq, h, d = q.shape
  lk, kv = k.shape[1], k.shape[2]
  g = h // kv
  if causal_blocks > 1 and (lq != lk or mask is None):
    raise ValueError(f"causal_blocks={causal_blocks} needs causal self-attention (a mask "
                     f"and Lq == Lk), got Lq={lq}, Lk={lk}, mask={mask is not None}")
  # Batch axes (B, KV) first and the contracted axis last: the layout XLA's dot
  # kernels take as is. On the [B, L, H, D] layout XLA:CPU put a transpose around every
  # dot and its gradient (fwd+bwd 1.5-2x slower at L=256, measured in isolation).
  qt = q.reshape(b, lq, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, Lq, D]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, Lk, D]
  outs = []
  for start, end in causal_blocks_bounds(lq, causal_blocks):
    keys = end if causal_blocks > 1 else lk
    qb = qt[:, :, :, start:end].reshape(b, kv, g * (end - start), d)
    logits = jnp.einsum("bkqd,bksd->bkqs", qb, kt[:, :, :keys]).astype(jnp.float32)
    logits = logits.reshape(b, kv, g, end - start, keys) * (d ** -0.5)
    if mask is not None:
      # A large finite negative keeps fully masked (padding) rows finite instead of NaN.
      logits = jnp.where(mask[:, None, None, start:end, :keys], logits, NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = probs.reshape(b, kv, g * (end - start), keys)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vt[:, :, :keys])
    outs.append(out.reshape(b, kv, g, end - start, d))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)


# -------------------------------------------------------------- the one interface


def causal_self_attention(q: Array, k: Array, v: Array, mask: SelfMask, *,
                          impl: str = "auto", causal_blocks: int = 1,
                          block_size: int = 128) -> Array:
  """Causal self-attention of q [B, L, H, D] over k/v [B, L, KV, D] under `mask`, by
  `impl` (see the module docstring) -> [B, L, H, D]."""
  impl = resolve_impl(impl, packed=mask.packed)
  if impl == "einsum":
    dense = (segment_causal_mask(mask.segment_ids) if mask.packed else
             causal_mask(mask.attention_mask))
    return dot_product_attention(q, k, v, dense, causal_blocks=causal_blocks)
  if impl == "blocked":
    fn = functools.partial(blocked_attention, block_size=block_size)
  elif impl == "cudnn":
    fn = cudnn_attention
  else:
    fn = splash_attention
  return per_device(fn, q, k, v, mask.ids())


def per_device(fn: Callable[[Array, Array, Array, Array], Array], q: Array, k: Array,
               v: Array, segment_ids: Array) -> Array:
  """`fn(q, k, v, segment_ids)` per device under the active mesh (batch over the batch
  axes, heads over `model` when both head counts divide it); as is without a mesh, or
  when the batch does not split (then every device runs the whole batch)."""
  from moe_vlm.parallel import mesh as mesh_lib  # the mesh module imports no models
  mesh = mesh_lib.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn(q, k, v, segment_ids)
  ways = mesh_lib.axis_size(mesh, mesh_lib.BATCH_AXES)
  if q.shape[0] % ways:
    return fn(q, k, v, segment_ids)
  m = mesh.shape["model"]
  heads = "model" if m > 1 and q.shape[2] % m == 0 and k.shape[2] % m == 0 else None
  act = P(mesh_lib.BATCH_AXES, None, heads, None)
  seg = P(mesh_lib.BATCH_AXES, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(act, act, act, seg), out_specs=act,
                       check_vma=False)(q, k, v, segment_ids)


def _pad_length(q: Array, k: Array, v: Array, segment_ids: Array,
                multiple: int) -> tuple[Array, Array, Array, Array, int]:
  """Pad the sequence axis to a multiple of `multiple`: padded tokens get segment id -1
  (they see only each other, and no real token sees them)."""
  l = q.shape[1]
  extra = -l % multiple
  if not extra:
    return q, k, v, segment_ids, l
  pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))
  seg = jnp.pad(segment_ids, ((0, 0), (0, extra)), constant_values=-1)
  return pad(q), pad(k), pad(v), seg, l


# --------------------------------------------------------- blocked (CPU) kernel


def _key_block_starts(segment_ids: Array, block: int) -> Array:
  """[B, L/block]: the first key block each query block needs, i.e. the block of the
  earliest first position among the segments its queries belong to."""
  b, l = segment_ids.shape
  first = first_index(segment_ids)
  return (jnp.min(first.reshape(b, l // block, block), axis=-1) // block).astype(jnp.int32)


def _layout(q: Array, k: Array, v: Array):
  """[B, L, H, D] / [B, L, KV, D] -> q [B, KV, G, L, D], k/v [B, KV, L, D]."""
  b, l, h, d = q.shape
  kv = k.shape[2]
  return (q.reshape(b, l, kv, h // kv, d).transpose(0, 2, 3, 1, 4),
          k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


def _block_logits(qb: Array, kb: Array, sq: Array, sk: Array, qpos: Array, kpos: Array,
                  g: int, scale: float) -> Array:
  """Masked fp32 logits [KV, G*T, Tk] of one query block against one key block."""
  kvh, rows, _ = qb.shape
  t, tk = rows // g, kb.shape[1]
  s = jnp.einsum("kqd,ksd->kqs", qb, kb, preferred_element_type=jnp.float32) * scale
  allowed = (sq[:, None] == sk[None, :]) & (kpos[None, :] <= qpos[:, None])  # [T, Tk]
  s = jnp.where(allowed[None, None], s.reshape(kvh, g, t, tk), NEG)
  return s.reshape(kvh, rows, tk)


def _blocked_forward(q: Array, k: Array, v: Array, segment_ids: Array,
                     block: int) -> tuple[Array, Array]:
  """Online-softmax forward: (out [B, L, H, D], log-sum-exp [B, KV, G, L] in fp32)."""
  b, l, h, d = q.shape
  kvh = k.shape[2]
  g, t, nq = h // kvh, block, l // block
  scale = d ** -0.5
  qt, kt, vt = _layout(q, k, v)
  starts = _key_block_starts(segment_ids, t)
  arange = jnp.arange(t, dtype=jnp.int32)

  def query_block(n, carry):
    out, lse = carry
    r, i = n // nq, n % nq
    qb = jax.lax.dynamic_slice(qt, (r, 0, 0, i * t, 0), (1, kvh, g, t, d)).reshape(
        kvh, g * t, d)
    sq = jax.lax.dynamic_slice(segment_ids, (r, i * t), (1, t))[0]

    def key_block(j, c):
      m, s_sum, acc = c
      kb = jax.lax.dynamic_slice(kt, (r, 0, j * t, 0), (1, kvh, t, d))[0]
      vb = jax.lax.dynamic_slice(vt, (r, 0, j * t, 0), (1, kvh, t, d))[0]
      sk = jax.lax.dynamic_slice(segment_ids, (r, j * t), (1, t))[0]
      s = _block_logits(qb, kb, sq, sk, i * t + arange, j * t + arange, g, scale)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      acc = acc * corr[..., None] + jnp.einsum(
          "kqs,ksd->kqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
      return m_new, s_sum * corr + jnp.sum(p, axis=-1), acc

    init = (jnp.full((kvh, g * t), NEG, jnp.float32), jnp.zeros((kvh, g * t), jnp.float32),
            jnp.zeros((kvh, g * t, d), jnp.float32))
    m, s_sum, acc = jax.lax.fori_loop(starts[r, i], i + 1, key_block, init)
    o = (acc / s_sum[..., None]).astype(out.dtype).reshape(1, kvh, g, t, d)
    out = jax.lax.dynamic_update_slice(out, o, (r, 0, 0, i * t, 0))
    lse = jax.lax.dynamic_update_slice(lse, (m + jnp.log(s_sum)).reshape(1, kvh, g, t),
                                       (r, 0, 0, i * t))
    return out, lse

  out0 = jnp.zeros((b, kvh, g, l, d), q.dtype)
  lse0 = jnp.zeros((b, kvh, g, l), jnp.float32)
  out, lse = jax.lax.fori_loop(0, b * nq, query_block, (out0, lse0))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d), lse


def _blocked_backward(q: Array, k: Array, v: Array, segment_ids: Array, out: Array,
                      lse: Array, dout: Array, block: int) -> tuple[Array, Array, Array]:
  """Gradients w.r.t. q, k, v: the probabilities recomputed block by block from the
  log-sum-exp, over the same key blocks the forward visited (FlashAttention-2's
  backward, written as loops)."""
  b, l, h, d = q.shape
  kvh = k.shape[2]
  g, t, nq = h // kvh, block, l // block
  scale = d ** -0.5
  qt, kt, vt = _layout(q, k, v)
  dot = dout.reshape(b, l, kvh, g, d).transpose(0, 2, 3, 1, 4)
  ot = out.reshape(b, l, kvh, g, d).transpose(0, 2, 3, 1, 4)
  delta = jnp.sum(dot.astype(jnp.float32) * ot.astype(jnp.float32), axis=-1)  # [B,KV,G,L]
  starts = _key_block_starts(segment_ids, t)
  arange = jnp.arange(t, dtype=jnp.int32)

  def query_block(n, carry):
    dq_all, dk_all, dv_all = carry
    r, i = n // nq, n % nq
    take = lambda x: jax.lax.dynamic_slice(x, (r, 0, 0, i * t, 0), (1, kvh, g, t, d)).reshape(
        kvh, g * t, d)
    qb, dob = take(qt), take(dot)
    lse_b = jax.lax.dynamic_slice(lse, (r, 0, 0, i * t), (1, kvh, g, t)).reshape(kvh, g * t)
    dl_b = jax.lax.dynamic_slice(delta, (r, 0, 0, i * t), (1, kvh, g, t)).reshape(kvh, g * t)
    sq = jax.lax.dynamic_slice(segment_ids, (r, i * t), (1, t))[0]

    def key_block(j, c):
      dq, dk_all, dv_all = c
      kb = jax.lax.dynamic_slice(kt, (r, 0, j * t, 0), (1, kvh, t, d))[0]
      vb = jax.lax.dynamic_slice(vt, (r, 0, j * t, 0), (1, kvh, t, d))[0]
      sk = jax.lax.dynamic_slice(segment_ids, (r, j * t), (1, t))[0]
      s = _block_logits(qb, kb, sq, sk, i * t + arange, j * t + arange, g, scale)
      p = jnp.exp(s - lse_b[..., None])  # masked entries: exp(NEG - lse) = 0
      dv = jnp.einsum("kqs,kqd->ksd", p.astype(dob.dtype), dob,
                      preferred_element_type=jnp.float32)
      dp = jnp.einsum("kqd,ksd->kqs", dob, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - dl_b[..., None]) * scale
      dq = dq + jnp.einsum("kqs,ksd->kqd", ds.astype(kb.dtype), kb,
                           preferred_element_type=jnp.float32)
      dk = jnp.einsum("kqs,kqd->ksd", ds.astype(qb.dtype), qb,
                      preferred_element_type=jnp.float32)
      at = (r, 0, j * t, 0)
      add = lambda acc, x: jax.lax.dynamic_update_slice(
          acc, jax.lax.dynamic_slice(acc, at, (1, kvh, t, d)) + x[None], at)
      return dq, add(dk_all, dk), add(dv_all, dv)

    dq0 = jnp.zeros((kvh, g * t, d), jnp.float32)
    dq, dk_all, dv_all = jax.lax.fori_loop(starts[r, i], i + 1, key_block,
                                           (dq0, dk_all, dv_all))
    dq_all = jax.lax.dynamic_update_slice(dq_all, dq.reshape(1, kvh, g, t, d),
                                          (r, 0, 0, i * t, 0))
    return dq_all, dk_all, dv_all

  zeros_kv = jnp.zeros((b, kvh, l, d), jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, b * nq, query_block,
                                 (jnp.zeros((b, kvh, g, l, d), jnp.float32), zeros_kv,
                                  zeros_kv))
  dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d).astype(q.dtype)
  return (dq, dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, segment_ids, block):
  return _blocked_forward(q, k, v, segment_ids, block)[0]


def _blocked_fwd(q, k, v, segment_ids, block):
  out, lse = _blocked_forward(q, k, v, segment_ids, block)
  return out, (q, k, v, segment_ids, out, lse)


def _blocked_bwd(block, residuals, dout):
  q, k, v, segment_ids, out, lse = residuals
  dq, dk, dv = _blocked_backward(q, k, v, segment_ids, out, lse, dout, block)
  return dq, dk, dv, np.zeros(segment_ids.shape, jax.dtypes.float0)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q: Array, k: Array, v: Array, segment_ids: Array, *,
                      block_size: int = 128) -> Array:
  """Causal attention within segments, query and key blocks of `block_size`, visiting
  for each query block only the key blocks from the first one its segments start in
  up to the diagonal (see the module docstring). q [B, L, H, D], k/v [B, L, KV, D],
  segment_ids [B, L] -> [B, L, H, D]. Equal to the einsum path within float rounding."""
  block = max(1, min(block_size, q.shape[1]))
  q, k, v, seg, l = _pad_length(q, k, v, segment_ids.astype(jnp.int32), block)
  return _blocked(q, k, v, seg, block)[:, :l]


# -------------------------------------------------------------- cuDNN (GPU)


def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array, *,
                    implementation: Optional[str] = "cudnn") -> Array:
  """`jax.nn.dot_product_attention` with `is_causal` and the segment mask (cuDNN's
  flash attention on GPU; `implementation="xla"` runs the same call anywhere)."""
  same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, L, L]
  return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True,
                                      implementation=implementation)


# --------------------------------------------------------- splash (TPU Pallas)


SPLASH_BLOCKS = (512, 256, 128)


@functools.lru_cache(maxsize=16)
def _splash_kernel(length: int, heads: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *,
                     interpret: bool = False) -> Array:
  """Pallas splash attention: the static causal mask (its fully masked blocks are never
  computed) and `SegmentIds` (applied inside the blocks), GQA through the kernel's
  grouped heads. The sequence is padded to a multiple of 128 (padding: segment -1);
  queries are pre-scaled by 1/sqrt(d) (the kernel does not scale)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  q, k, v, seg, l = _pad_length(q, k, v, segment_ids.astype(jnp.int32), SPLASH_BLOCKS[-1])
  length, heads, d = q.shape[1], q.shape[2], q.shape[3]
  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  kernel = _splash_kernel(length, heads, block, interpret)
  qt = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, L, D]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out = jax.vmap(kernel, in_axes=(0, 0, 0, sk.SegmentIds(0, 0)))(
      qt, kt, vt, sk.SegmentIds(seg, seg))
  return out.transpose(0, 2, 1, 3)[:, :l].astype(q.dtype)
