"""Qwen2-VL's native-resolution pieces (arXiv 2409.12191), as options of the one VLM.

- `Qwen2VisionEncoder` (`VisionConfig.variant="qwen2_vl"`): a ViT without class token or
  position table. An image is `t x h x w` patches (`data.images.qwen2_vl_patches`: each
  patch `channels x temporal_patch_size x patch x patch` values, laid out in merge
  groups: the `merge^2` patches of a 2x2 block are consecutive). Every attention layer
  rotates queries and keys by the patch's (row, column), half the rotary frequencies
  each (2D RoPE), and a patch attends the patches of its own frame.
- `PatchMerger` (`projector="qwen2_vl_merger"`): LayerNorm, the merge group's patches
  concatenated, Linear-GELU-Linear into one LLM token per group.
- M-RoPE (`TextConfig.rope_type="mrope"`): three position rows (temporal, height,
  width). `rope_index` computes them from the prompt and the image grids as
  transformers' `Qwen2VLModel.get_rope_index` does: text tokens count up (the same value
  in the three rows); an image's tokens sit at `start + (t, row, column)` of its merged
  grid, and the text after it continues at `start + max(h, w) / merge`. `mrope_tables`
  turns them into cos/sin: rotary frequency chunk i (`mrope_section`) follows row i % 3.

Static shapes: an image's patches fill the first `t*h*w` of a fixed budget of
`VisionConfig.max_patches` slots, the grid `(t, h, w)` (int32 [3]; zeros = no image)
says how many are real. Padding patches attend only padding (so no row of the softmax
is empty), no real patch sees them, and their merged tokens are never spliced into the
prompt: a row's image tokens receive, in order, the real merged tokens of its images
(`compact_features`). So the results of real tokens equal those of an unpadded run.
The number of image tokens of a prompt thus varies with the image: the data pipeline
expands `<image>` to the image's merged-patch count (`merged_tokens`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_vlm.models import attention
from moe_vlm.models.config import VisionConfig
from moe_vlm.models.layers import (MLP, Attention, Dense, Norm, activation,
                                   default_kernel_init, param, token_matmul)

Array = jax.Array


# ------------------------------------------------------------------ grids and counts


def merged_tokens(grid: Sequence[int] | np.ndarray, merge: int) -> int:
  """LLM tokens of an image of patch grid (t, h, w): t*h*w / merge^2 (host side)."""
  t, h, w = (int(x) for x in grid)
  return t * h * w // (merge * merge)


def _grids(grid: Array) -> Array:
  """[B, 3] or packed [B, M, 3] -> int32 [B, M, 3]."""
  grid = jnp.asarray(grid, jnp.int32)
  return grid[:, None] if grid.ndim == 2 else grid


def merged_valid(grid: Array, num_patches: int, merge: int) -> Array:
  """Which of the num_patches / merge^2 merged tokens of each image are real:
  grid [..., 3] -> bool [..., num_patches / merge^2]."""
  n = jnp.prod(grid, axis=-1) // (merge * merge)
  return jnp.arange(num_patches // (merge * merge)) < n[..., None]


def compact_features(features: Array, valid: Array) -> Array:
  """features [B, N, D] with a bool validity [B, N] -> the real ones first, in order
  (padding after them), so the r-th image token of a row takes the r-th real feature."""
  order = jnp.argsort(~valid, axis=-1, stable=True)
  return jnp.take_along_axis(features, order[..., None], axis=1)


# ----------------------------------------------------------------- vision positions


def patch_positions(grid: Array, num_patches: int, merge: int) -> tuple[Array, Array, Array]:
  """Row, column and frame segment of each patch slot: grid [N, 3] -> three int32
  [N, num_patches]. Patches are in merge-group order (transformers' processor and
  `get_vision_position_ids`); a slot past t*h*w is padding (segment 0), a real patch's
  segment is its frame + 1."""
  t, h, w = grid[:, 0:1], grid[:, 1:2], grid[:, 2:3]
  i = jnp.arange(num_patches, dtype=jnp.int32)[None]
  hw = jnp.maximum(h * w, 1)
  j = i % hw
  block, r = j // (merge * merge), j % (merge * merge)
  blocks_w = jnp.maximum(w // merge, 1)
  row = (block // blocks_w) * merge + r // merge
  col = (block % blocks_w) * merge + r % merge
  segment = jnp.where(i < t * h * w, i // hw + 1, 0)
  return row, col, segment


def vision_rope(row: Array, col: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """2D rotary tables [N, P, head_dim] (rotate-half layout): the first half of the
  frequencies (head_dim / 4 of them) turn with the row, the second with the column."""
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
  inv_freq = jnp.asarray(inv_freq.astype(np.float32))
  freqs = jnp.concatenate([row.astype(jnp.float32)[..., None] * inv_freq,
                           col.astype(jnp.float32)[..., None] * inv_freq], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


# --------------------------------------------------------------------- vision tower


class Qwen2VisionBlock(nnx.Module):
  """Pre-LN block: x + attn(norm1(x)) with 2D RoPE and the frame mask, then the MLP."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d = cfg.hidden_size
    self.norm1 = Norm(d, kind="layer", eps=cfg.norm_eps, rngs=rngs, param_dtype=cfg.param_dtype)
    self.attn = Attention(d, cfg.num_heads, cfg.num_heads, d // cfg.num_heads,
                          qkv_bias=True, o_bias=True, **kw)
    self.norm2 = Norm(d, kind="layer", eps=cfg.norm_eps, rngs=rngs, param_dtype=cfg.param_dtype)
    self.mlp = MLP(d, cfg.intermediate_size, kind="plain", activation_name=cfg.activation,
                   use_bias=True, **kw)

  def __call__(self, x: Array, mask: Array, rope: tuple[Array, Array]) -> Array:
    x = x + self.attn(self.norm1(x), mask, rope)
    return x + self.mlp(self.norm2(x))


class Qwen2VisionEncoder(nnx.Module):
  """Qwen2-VL's vision transformer on a patch budget (see the module docstring)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    if not cfg.native:
      raise ValueError(f"Qwen2VisionEncoder needs vision.variant='qwen2_vl', got "
                       f"{cfg.variant!r}")
    self.cfg = cfg
    self.patch_kernel = param(rngs, default_kernel_init, (cfg.patch_dim, cfg.hidden_size),
                              (None, "embed"), cfg.param_dtype)
    self.layers = nnx.List([Qwen2VisionBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def _check(self, patches: Array, grid: Array) -> None:
    cfg = self.cfg
    want = (cfg.max_patches, cfg.patch_dim)
    if patches.ndim != 3 or tuple(patches.shape[1:]) != want:
      raise ValueError(f"pixel_values shape {tuple(patches.shape)}: expected [N, "
                       f"{want[0]}, {want[1]}] (patches of a qwen2_vl tower: max_patches x "
                       "channels*temporal*patch*patch)")
    if grid.shape != (patches.shape[0], 3):
      raise ValueError(f"image_grid_thw shape {tuple(grid.shape)}: expected "
                       f"[{patches.shape[0]}, 3] (t, h, w per image)")
    if not isinstance(grid, jax.core.Tracer):
      g = np.asarray(grid)
      m = cfg.spatial_merge_size
      bad = [i for i, (t, h, w) in enumerate(g.tolist())
             if t * h * w > cfg.max_patches or h % m or w % m or min(t, h, w) < 0]
      if bad:
        raise ValueError(f"image_grid_thw rows {bad} ({g[bad[0]].tolist()}, ...): expected "
                         f"t*h*w <= max_patches={cfg.max_patches} and h, w multiples of "
                         f"spatial_merge_size={m}")

  def __call__(self, patches: Array, grid: Array,
               num_layers: Optional[int] = None) -> list[Array]:
    """patches [N, max_patches, patch_dim], grid [N, 3] -> every hidden state
    [N, max_patches, D] (the embeddings, then each layer's output; as many layers as
    `num_layers`, default all)."""
    cfg = self.cfg
    self._check(patches, grid)
    grid = jnp.asarray(grid, jnp.int32)
    dtype = jnp.dtype(cfg.dtype)
    row, col, segment = patch_positions(grid, cfg.max_patches, cfg.spatial_merge_size)
    rope = vision_rope(row, col, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
    # Within a frame; padding sees padding only (finite softmax rows, never read).
    mask = segment[:, :, None] == segment[:, None, :]
    x = token_matmul(patches.astype(dtype), self.patch_kernel[...].astype(dtype))
    hidden = [x]
    n = cfg.num_layers if num_layers is None else num_layers
    for block in self.layers[:n]:
      hidden.append(block(hidden[-1], mask, rope))
    return hidden

  def features(self, patches: Array, grid: Array, layer: int = -1) -> Array:
    """Hidden state `layer` (python indexing over the n+1 states; Qwen2-VL: -1)."""
    index = layer % (self.cfg.num_layers + 1)
    return self(patches, grid, num_layers=index)[index]


class PatchMerger(nnx.Module):
  """`projector="qwen2_vl_merger"`: LayerNorm(eps 1e-6 in Qwen2-VL: `vision.norm_eps`),
  then each merge group's patches concatenated and Linear-GELU-Linear to the text
  width: [N, P, D] -> [N, P / merge^2, D_text]."""

  def __init__(self, vision: VisionConfig, text_dim: int, *, rngs: nnx.Rngs,
               dtype: str = "float32", param_dtype: str = "float32"):
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.group = vision.spatial_merge_size ** 2
    wide = vision.hidden_size * self.group
    self.ln_q = Norm(vision.hidden_size, kind="layer", eps=vision.norm_eps, rngs=rngs,
                     param_dtype=param_dtype)
    self.linear_1 = Dense(wide, wide, axes=("vision_embed", "mlp"), **kw)
    self.linear_2 = Dense(wide, text_dim, axes=("mlp", "embed"), **kw)
    self.act = activation("gelu")

  def __call__(self, x: Array) -> Array:
    n, p, d = x.shape
    h = self.ln_q(x).reshape(n, p // self.group, self.group * d)
    return self.linear_2(self.act(self.linear_1(h)))


# ------------------------------------------------------------------------- M-RoPE


def rope_index(is_image: Array, token_mask: Array, grid: Optional[Array], merge: int,
               segment_ids: Optional[Array] = None) -> tuple[Array, Array]:
  """M-RoPE positions of a batch, as transformers' `get_rope_index` computes them.

  is_image [B, L] (image placeholder tokens), token_mask [B, L] (1 on real tokens; the
  others get position 0), grid [B, 3] or packed [B, M, 3] (the row's images in order;
  zeros for none), segment_ids [B, L] (packed rows: positions restart per segment).
  A row's k-th image token belongs to the image whose merged tokens cover rank k.
  Returns (positions int32 [3, B, L], delta int32 [B]): delta = the next free position
  after the row minus its token count, what decoding adds to plain positions.
  """
  valid = token_mask.astype(bool)
  is_image = is_image & valid
  text = valid & ~is_image
  if grid is None:
    grid = jnp.zeros((is_image.shape[0], 1, 3), jnp.int32)
  grids = _grids(grid)
  llm_h = grids[..., 1] // merge
  llm_w = grids[..., 2] // merge
  count = grids[..., 0] * llm_h * llm_w  # [B, M] image tokens per image
  ends = jnp.cumsum(count, axis=-1)  # [B, M]
  rank = jnp.cumsum(is_image.astype(jnp.int32), axis=-1) - 1  # [B, L]
  slot = jnp.sum(ends[:, None, :] <= rank[..., None], axis=-1)  # [B, L]
  slot = jnp.clip(slot, 0, grids.shape[1] - 1)
  take = lambda a: jnp.take_along_axis(a, slot, axis=1)
  k = rank - take(ends - count)
  h_i, w_i, n_i = take(llm_h), take(llm_w), take(count)
  area = jnp.maximum(h_i * w_i, 1)
  t_idx, rem = k // area, k % area
  h_idx, w_idx = rem // jnp.maximum(w_i, 1), rem % jnp.maximum(w_i, 1)
  last = is_image & (k == n_i - 1)
  advance = (text.astype(jnp.int32)
             + jnp.where(last, jnp.maximum(h_i, w_i), 0))  # what each token adds after it
  inclusive = (jnp.cumsum(advance, axis=-1) if segment_ids is None else
               attention.segment_cumsum(advance, segment_ids))
  start = inclusive - advance  # the running position before the token
  rows = [jnp.where(is_image, start + idx, start) for idx in (t_idx, h_idx, w_idx)]
  positions = jnp.where(valid[None], jnp.stack(rows), 0).astype(jnp.int32)
  top = jnp.max(jnp.where(valid[None], positions, -1), axis=(0, 2))
  delta = top + 1 - jnp.sum(valid, axis=-1)
  return positions, delta.astype(jnp.int32)


def mrope_tables(positions: Array, rotary_dim: int, theta: float,
                 section: Sequence[int]) -> tuple[Array, Array]:
  """cos/sin [B, L, rotary_dim] of M-RoPE from positions [3, B, L] (or [B, L]: the same
  position in the three rows, a text-only call): frequency chunk i of `section` turns
  with row i % 3, in the rotate-half layout of `layers.apply_rope`."""
  if positions.ndim == 2:
    positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
  inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
  rows = np.concatenate([np.full(n, i % 3) for i, n in enumerate(section)])
  # Each frequency picks its row's position: [B, L, rotary_dim / 2].
  pos = jnp.moveaxis(positions.astype(jnp.float32), 0, -1)[..., rows]
  freqs = pos * jnp.asarray(inv_freq.astype(np.float32))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)
