"""The whole vision-language model: LLaVA-1.5 layout with an MoE-capable decoder.

Prompts arrive with the `<image>` placeholder already expanded to
`cfg.num_image_tokens` copies of `image_token_id` (as transformers' LLaVA processor
does), so every shape is static under jit. Row b's image-token positions receive, in
order, the projected features of `pixel_values[b]`; rows with no image tokens are
text-only and ignore their (dummy) pixels.

Packed rows (several samples per row, `segment_ids`) carry M image slots per row:
`pixel_values` [B, M, H, W, C]; the row's image-token positions receive, in order, the
features of slot 0, then slot 1, ..., so each sample's placeholders get its own image
(the packer fills the slots in the order of the samples). Unused slots are zeros and
nothing reads their features.

Qwen2-VL (`vision.variant="qwen2_vl"`, `moe_vlm.models.qwen2_vl`): `pixel_values` are
patches [B, max_patches, patch_dim] (packed: [B, M, max_patches, patch_dim]) and
`image_grid_thw` [B, 3] ([B, M, 3]) says how many are real; a row holds as many image
tokens as its images have real merged patches, which receive them in order. With
`text.rope_type="mrope"` the positions are M-RoPE's (`qwen2_vl.rope_index`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_vlm.models import qwen2_vl
from moe_vlm.models.config import VLMConfig
from moe_vlm.models.layers import KVCache
from moe_vlm.models.llm import DecoderLM, positions_from_mask
from moe_vlm.models.moe import IMAGE, PAD, TEXT
from moe_vlm.models.projector import make_projector
from moe_vlm.models.vision import VisionEncoder

Array = jax.Array


class ImageTokenError(ValueError):
  """The number of image placeholder tokens does not match the images given."""


def check_image_tokens(input_ids: np.ndarray, image_token_id: int,
                       tokens_per_image: int, images_per_row: Optional[int] = None) -> None:
  """Host-side check: each row holds 0 or exactly `tokens_per_image` image tokens
  (packed rows, `images_per_row` slots: a whole number of images, at most that many).

  Runs on concrete arrays (data pipeline, eager calls); under jit it is skipped.
  """
  counts = np.sum(np.asarray(input_ids) == image_token_id, axis=-1)
  for row, n in enumerate(counts):
    if images_per_row is not None:
      if n % tokens_per_image or n > images_per_row * tokens_per_image:
        raise ImageTokenError(
            f"input_ids row {row} has {n} image tokens (id {image_token_id}); a packed row "
            f"holds whole images of {tokens_per_image} tokens, at most {images_per_row}")
      continue
    if n not in (0, tokens_per_image):
      raise ImageTokenError(
          f"input_ids row {row} has {n} image tokens (id {image_token_id}); expected 0 "
          f"or {tokens_per_image} (one image). Expand '<image>' to num_image_tokens "
          "placeholders when tokenizing.")


def check_native_image_tokens(input_ids: np.ndarray, image_token_id: int,
                              image_grid_thw: Optional[np.ndarray], merge: int) -> None:
  """Host-side check for a native-resolution (Qwen2-VL) batch: each row holds exactly
  the merged-patch count of its images (grid [B, 3], or [B, M, 3] for packed rows;
  zeros = no image)."""
  counts = np.sum(np.asarray(input_ids) == image_token_id, axis=-1)
  if image_grid_thw is None:
    want = np.zeros_like(counts)
  else:
    g = np.asarray(image_grid_thw).reshape(len(counts), -1, 3)
    want = np.prod(g, axis=-1).sum(-1) // (merge * merge)
  for row, (n, w) in enumerate(zip(counts.tolist(), want.tolist())):
    if n != w:
      raise ImageTokenError(
          f"input_ids row {row} has {n} image tokens (id {image_token_id}) but its image grid "
          f"gives {w} merged patches; expand '<image>' to the image's merged-patch count "
          "(t*h*w / spatial_merge_size^2) when tokenizing")


def splice_image_features(embeds: Array, features: Array, is_image: Array) -> Array:
  """Writes features[b, j] into the j-th image position of row b.

  embeds [B, L, D], features [B, P, D], is_image [B, L] -> [B, L, D]. (A packed row's
  features are its slots' concatenated: [B, M * P, D].)
  """
  rank = jnp.clip(jnp.cumsum(is_image.astype(jnp.int32), axis=-1) - 1, 0, features.shape[1] - 1)
  gathered = jnp.take_along_axis(features.astype(embeds.dtype), rank[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered, embeds)


class VLM(nnx.Module):
  def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.vision = (qwen2_vl.Qwen2VisionEncoder(cfg.vision, rngs=rngs) if cfg.vision.native
                   else VisionEncoder(cfg.vision, rngs=rngs))
    self.projector = make_projector(cfg, rngs=rngs)
    self.llm = DecoderLM(cfg.text, rngs=rngs)

  def image_features(self, pixel_values: Array,
                     image_grid_thw: Optional[Array] = None) -> Array:
    """[B, H, W, C] -> projected image tokens [B, num_image_tokens, D_text] (for the
    perceiver, its n_latents resampled tokens). Packed [B, M, H, W, C] ->
    [B, M * num_image_tokens, D_text], slot after slot. Qwen2-VL: patches + grids (see
    the module docstring) -> [B, M * num_image_tokens, D_text], each row's real merged
    tokens first, image after image."""
    if self.cfg.vision.native:
      return self._native_features(pixel_values, image_grid_thw)
    if pixel_values.ndim == 5:
      b, m = pixel_values.shape[:2]
      feats = self.image_features(pixel_values.reshape((b * m,) + pixel_values.shape[2:]))
      return feats.reshape(b, m * feats.shape[1], feats.shape[2])
    feats = self.vision.features(pixel_values, self.cfg.vision_feature_layer)
    if self.cfg.vision_feature_select_strategy == "default":
      feats = feats[:, 1:]
    return self.projector(feats)

  def _native_features(self, pixel_values: Array, grid: Optional[Array]) -> Array:
    cfg = self.cfg.vision
    if grid is None:
      raise ValueError("a qwen2_vl vision tower needs image_grid_thw with pixel_values")
    b = pixel_values.shape[0]
    patches = pixel_values.reshape((-1,) + pixel_values.shape[-2:])  # [B * M, P, dim]
    grid = jnp.asarray(grid, jnp.int32).reshape(-1, 3)
    feats = self.vision.features(patches, grid, self.cfg.vision_feature_layer)
    merged = self.projector(feats)  # [B * M, P / merge^2, D]
    valid = qwen2_vl.merged_valid(grid, cfg.max_patches, cfg.spatial_merge_size)
    return qwen2_vl.compact_features(merged.reshape(b, -1, merged.shape[-1]),
                                     valid.reshape(b, -1))

  def _mrope_positions(self, is_image: Array, attention_mask: Array, grid: Optional[Array],
                       segment_ids: Optional[Array], cache: Optional[KVCache],
                       length: int) -> tuple[Array, Optional[Array]]:
    """M-RoPE positions [3, B, L] of this call and, with a cache, the rows' rope delta.
    The call that starts a cache (slot 0, the prefill) computes them from its tokens and
    image grids; later calls (decoding, text only) take plain positions + the delta."""
    merge = self.cfg.vision.spatial_merge_size
    if not self.cfg.vision.native:  # no image grids: every token is positioned as text
      is_image, grid = jnp.zeros_like(is_image), None
    if cache is None:
      return qwen2_vl.rope_index(is_image, attention_mask, grid, merge, segment_ids)[0], None
    token_mask = jax.lax.dynamic_slice_in_dim(attention_mask, cache.index, length, axis=1)
    positions, delta = qwen2_vl.rope_index(is_image, token_mask, grid, merge)
    plain = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), cache.index,
                                         length, axis=1)
    first = cache.index == 0
    if cache.rope_delta is not None:
      delta = jnp.where(first, delta, cache.rope_delta)
    later = jnp.broadcast_to((plain + delta[:, None])[None], positions.shape)
    return jnp.where(first, positions, later), delta

  def __call__(self, input_ids: Array, pixel_values: Optional[Array] = None,
               attention_mask: Optional[Array] = None, *, train: bool = False,
               dispatch: Optional[str] = None, cache: Optional[KVCache] = None,
               rng: Optional[Array] = None, guide_mask: Optional[Array] = None,
               router_mask: Optional[Array] = None,
               segment_ids: Optional[Array] = None, return_hidden: bool = False,
               image_grid_thw: Optional[Array] = None
               ) -> tuple[Array, dict[str, Array]] | tuple[Array, dict[str, Array], KVCache]:
    """Returns (logits [B, L, V] fp32, aux) - aux holds the summed MoE losses and the
    per-layer routing statistics split by modality (see `DecoderLM`). With
    `return_hidden`: the LLM's last hidden states in place of the logits
    (`self.llm.head` maps them to logits).

    With a `cache` (KV-cache decoding): input_ids are the L tokens written at slots
    cache.index.., attention_mask is [B, T] over all cache slots, and the call returns
    (logits, aux, updated cache). `guide_mask` [B, L]: the prompt span that per-sample
    guidance vectors average over (`adapters.prompt_mask`; training passes it);
    `router_mask` [B, L]: the span Awaker's instance router averages over (default
    `guide_mask`; the data pipeline's `router_mask`).

    Packed rows: `segment_ids` [B, L] (1, 2, ... per sample, 0 = padding) and
    `pixel_values` [B, M, H, W, C] (see the module docstring); `attention_mask` is 1 on
    every real token. Each sample sees only itself (`DecoderLM`).

    Qwen2-VL: `image_grid_thw` [B, 3] ([B, M, 3] packed) with the patches in
    `pixel_values` (see the module docstring). With a cache, images belong to the call
    that starts it (the prefill)."""
    cfg = self.cfg
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape if cache is None else
                                (input_ids.shape[0], cache.length), jnp.int32)
    is_image = input_ids == cfg.image_token_id
    native = cfg.vision.native
    if not isinstance(input_ids, jax.core.Tracer) and native:
      if image_grid_thw is None or not isinstance(image_grid_thw, jax.core.Tracer):
        check_native_image_tokens(np.asarray(input_ids), cfg.image_token_id,
                                  None if pixel_values is None else image_grid_thw,
                                  cfg.vision.spatial_merge_size)
    elif not isinstance(input_ids, jax.core.Tracer):
      slots = (pixel_values.shape[1] if pixel_values is not None and pixel_values.ndim == 5
               else None)
      check_image_tokens(np.asarray(input_ids), cfg.image_token_id, cfg.num_image_tokens,
                         slots)
    embeds = self.llm.embed_tokens(input_ids)
    if pixel_values is not None:
      embeds = splice_image_features(embeds, self.image_features(pixel_values, image_grid_thw),
                                     is_image)
    elif not isinstance(input_ids, jax.core.Tracer) and np.any(np.asarray(is_image)):
      raise ImageTokenError("input_ids contain image tokens but pixel_values is None")
    token_mask = attention_mask if cache is None else jax.lax.dynamic_slice_in_dim(
        attention_mask, cache.index, input_ids.shape[1], axis=1)
    modality = jnp.where(token_mask.astype(bool), jnp.where(is_image, IMAGE, TEXT), PAD)
    positions = delta = None
    if cfg.text.rope_type == "mrope":
      positions, delta = self._mrope_positions(
          is_image, attention_mask, image_grid_thw if pixel_values is not None else None,
          segment_ids, cache, input_ids.shape[1])
    out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, modality=modality,
                   positions=positions, train=train, dispatch=dispatch, cache=cache, rng=rng,
                   guide_mask=guide_mask, router_mask=router_mask,
                   segment_ids=segment_ids,
                   return_hidden=return_hidden)
    if delta is not None:
      out = out[:2] + (out[2]._replace(rope_delta=delta),)
    return out
