"""Batched KV-cache generation for the VLM.

Prompts are left-padded into one [B, P] batch so every row's next token lands in the
same cache slot and every shape is static: the whole run (prefill + decode loop) is one
jit-compiled program.

  prefill   the prompt batch, image features spliced in, writes cache slots [0, P)
            and gives the logits of each row's last prompt token;
  decode    a `lax.while_loop` feeding one token per row into the cache
            [layers, B, P + max_new_tokens, kv_heads, head_dim]; it stops after
            max_new_tokens or as soon as every row has produced a stop token.

It is compiled once per batch shape and per setting that changes the program
(max_new_tokens, greedy or not, top-p or not); stop ids, pad id, temperature and top_p
are traced, so varying them reuses the compiled program.

Positions skip left padding (a row's first real token is position 0, as in training),
MoE layers route dropless (no token competes for capacity, so a row's answer does not
depend on its batch neighbours), and the image placeholder id is never generated (a
placeholder without pixels behind it would be meaningless to the model).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_vlm.infer.sampling import greedy_tokens, sample_tokens
from moe_vlm.models.config import TextConfig
from moe_vlm.models.layers import KVCache
from moe_vlm.parallel.mesh import constrain
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import ImageTokenError, check_image_tokens, check_native_image_tokens
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement

Array = jax.Array

# KV cache [layers, B, T, kv_heads, head_dim]: rows follow the batch, heads the tensor
# axis, as the attention that writes them.
CACHE_AXES = (None, "batch", None, "kv_heads", None)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How to decode."""

  max_new_tokens: int = 128
  # A row stops after emitting any of these (the stop token is kept in the output).
  eos_ids: tuple[int, ...] = ()
  # 0 = greedy; otherwise sample from softmax(logits / temperature) ...
  temperature: float = 0.0
  # ... restricted to the nucleus of this much probability mass.
  top_p: float = 1.0
  # Written after a row has stopped (and where the loop ended early).
  pad_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(sorted({int(i) for i in self.eos_ids})))
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature}: expected >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p}: expected 0 < top_p <= 1")

  def knobs(self) -> dict[str, Array]:
    """The traced settings. Stop ids are padded with -1 (never a token) to a multiple of
    8, so stop sets of similar size share one compiled program."""
    n = -(-max(len(self.eos_ids), 1) // 8) * 8
    stop = np.full((n,), -1, np.int32)
    stop[:len(self.eos_ids)] = self.eos_ids
    return {"stop": jnp.asarray(stop), "pad": jnp.asarray(self.pad_id, jnp.int32),
            "temperature": jnp.asarray(self.temperature, jnp.float32),
            "top_p": jnp.asarray(self.top_p, jnp.float32)}


def init_cache(cfg: TextConfig, batch: int, length: int) -> KVCache:
  """An empty [layers, batch, length, kv_heads, head_dim] cache in the compute dtype."""
  return KVCache.zeros((cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.dim_per_head),
                       jnp.dtype(cfg.dtype))


def cache_mask(attention_mask: Array, length: int) -> Array:
  """Prompt mask [B, P] -> validity of all `length` cache slots [B, length].

  Generated slots count as valid from the start: the causal mask already hides the
  ones not written yet, and a stopped row's later tokens are never read back.
  """
  b, p = attention_mask.shape
  return jnp.concatenate([attention_mask.astype(jnp.int32),
                          jnp.ones((b, length - p), jnp.int32)], axis=1)


def prefill(model, input_ids: Array, attention_mask: Array, pixel_values: Optional[Array],
            cache: KVCache) -> tuple[Array, KVCache]:
  """Runs the left-padded prompts [B, P] into an empty cache -> (logits [B, P, V], cache)."""
  mask = cache_mask(attention_mask, cache.length)
  logits, _, cache = model(input_ids, pixel_values, mask, dispatch="dropless", cache=cache)
  return logits, cache


def decode_step(model, tokens: Array, mask: Array, cache: KVCache) -> tuple[Array, KVCache]:
  """Feeds one token per row [B] at slot cache.index -> (next-token logits [B, V], cache).

  `mask` [B, T] is `cache_mask` of the prompt mask.
  """
  logits, _, cache = model(tokens[:, None], None, mask, dispatch="dropless", cache=cache)
  return logits[:, 0], cache


def _run(model, cache: KVCache, mask: Array, input_ids: Array, pixel_values: Optional[Array],
         rng: Array, knobs: dict[str, Array], router_mask: Optional[Array] = None,
         image_grid_thw: Optional[Array] = None, *,
         max_new_tokens: int, greedy: bool, nucleus: bool,
         return_logits: bool) -> tuple[Array, Optional[Array], KVCache]:
  """Prefill `input_ids` [B, P] at slots cache.index.., then the decode loop.

  `mask` [B, T] is the validity of every cache slot (earlier turns, the new prompt, and
  the generated slots). Returns (tokens [B, N], logits or None, cache); the last
  generated token is not fed back, so the cache ends at index + P + steps - 1.
  `router_mask` [B, P]: the prompt's router span (Awaker's instance router).
  `image_grid_thw`: Qwen2-VL's image grids (with its patches in `pixel_values`).
  """
  b = input_ids.shape[0]
  n = max_new_tokens
  cache = cache._replace(k=constrain(cache.k, CACHE_AXES), v=constrain(cache.v, CACHE_AXES))
  logits, _, cache = model(input_ids, pixel_values, mask, dispatch="dropless", cache=cache,
                           router_mask=router_mask, image_grid_thw=image_grid_thw)
  logits = logits[:, -1]  # left padding: every row's last prompt token is at P - 1
  stop, pad = knobs["stop"], knobs["pad"]

  def pick(logits, step):
    logits = logits.at[:, model.cfg.image_token_id].set(-jnp.inf)
    if greedy:
      return greedy_tokens(logits)
    return sample_tokens(logits, jax.random.fold_in(rng, step), knobs["temperature"],
                         knobs["top_p"] if nucleus else None)

  first = pick(logits, 0)
  tokens = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(first)
  seen = (jnp.zeros((b, n, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
          if return_logits else None)
  done = jnp.isin(first, stop)

  def cond(carry):
    step, _, done, _, _ = carry
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, tokens, done, cache, seen = carry
    logits, cache = decode_step(model, tokens[:, step - 1], mask, cache)
    nxt = jnp.where(done, pad, pick(logits, step))
    tokens = tokens.at[:, step].set(nxt)
    if seen is not None:
      seen = seen.at[:, step].set(logits)
    return step + 1, tokens, done | jnp.isin(nxt, stop), cache, seen

  _, tokens, _, cache, seen = jax.lax.while_loop(
      cond, body, (jnp.ones((), jnp.int32), tokens, done, cache, seen))
  return tokens, seen, cache


_STATIC = ("max_new_tokens", "greedy", "nucleus", "return_logits")


@nnx.jit(static_argnames=_STATIC)
def _generate(model, input_ids, attention_mask, pixel_values, rng, knobs, router_mask=None,
              image_grid_thw=None, **static):
  """Fresh cache of P + max_new_tokens slots -> (tokens, logits or None)."""
  b, p = input_ids.shape
  length = p + static["max_new_tokens"]
  cache = init_cache(model.cfg.text, b, length)
  tokens, seen, _ = _run(model, cache, cache_mask(attention_mask, length), input_ids,
                         pixel_values, rng, knobs, router_mask, image_grid_thw, **static)
  return tokens, seen


@nnx.jit(static_argnames=_STATIC, donate_argnames=("cache",))
def _extend(model, cache, mask, input_ids, pixel_values, rng, knobs, image_grid_thw=None,
            **static):
  """Continues a cache that already holds earlier turns -> (tokens, logits, cache)."""
  return _run(model, cache, mask, input_ids, pixel_values, rng, knobs, None, image_grid_thw,
              **static)


def _check_inputs(model, input_ids: np.ndarray, attention_mask: np.ndarray,
                  pixel_values: Any, image_grid_thw: Any = None) -> None:
  """Host-side checks that would otherwise fail silently inside the compiled program."""
  if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
    raise ValueError(f"input_ids {input_ids.shape} and attention_mask "
                     f"{attention_mask.shape} must both be [B, P]")
  ends_padded = np.flatnonzero(attention_mask[:, -1] == 0)
  if ends_padded.size:
    raise ValueError(f"rows {ends_padded.tolist()} end with padding: prompts must be "
                     "left-padded (see `left_pad`)")
  cfg = model.cfg
  if cfg.vision.native:  # Qwen2-VL: as many image tokens as the grid's merged patches
    check_native_image_tokens(input_ids, cfg.image_token_id,
                              None if pixel_values is None else image_grid_thw,
                              cfg.vision.spatial_merge_size)
  else:
    check_image_tokens(input_ids, cfg.image_token_id, cfg.num_image_tokens)
  if pixel_values is None and np.any(input_ids == cfg.image_token_id):
    raise ImageTokenError("input_ids contain image tokens but pixel_values is None")


def shard_model(model, mesh: jax.sharding.Mesh,
                rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES):
  """The model with its parameters placed on `mesh` by their logical axes (as in
  training: experts over `expert`, heads and FFN over `model`, embed over `fsdp`)."""
  mesh_lib.check_model_fits_mesh(model.cfg, mesh)
  codec = ParamCodec(model)
  shardings = mesh_lib.param_shardings(codec.logical_axes, codec.shapes, mesh, rules)
  return codec.merge(jax.device_put(codec.flatten(model), shardings))


def _place(x: Optional[np.ndarray], mesh: Optional[jax.sharding.Mesh]) -> Optional[Array]:
  """Host array -> device array (split over the mesh's batch axes when they divide it)."""
  if x is None:
    return None
  return jnp.asarray(x) if mesh is None else mesh_lib.place_batch(x, mesh)


def _static(config: GenerationConfig, return_logits: bool) -> dict[str, Any]:
  return dict(max_new_tokens=config.max_new_tokens, greedy=config.temperature == 0.0,
              nucleus=config.top_p < 1.0, return_logits=return_logits)


def generate(model, input_ids: Any, attention_mask: Any, pixel_values: Any = None,
             config: Optional[GenerationConfig] = None, *, rng: Optional[Array] = None,
             return_logits: bool = False, mesh: Optional[jax.sharding.Mesh] = None,
             router_mask: Any = None, image_grid_thw: Any = None, **overrides: Any):
  """Generates up to max_new_tokens per row with a KV cache.

  Args:
    model: a `VLM` (with `mesh`: placed by `shard_model`).
    input_ids, attention_mask: [B, P] LEFT-padded prompts (image placeholders expanded).
    pixel_values: [B, H, W, 3] row-aligned images, or None for text-only prompts (Qwen2-VL:
      patches [B, max_patches, patch_dim], `data.images.qwen2_vl_patches`).
    config: decoding settings; keyword `overrides` replace its fields, e.g.
      `generate(model, ids, mask, px, max_new_tokens=32, eos_ids=(2,))`.
    rng: PRNG key for sampling (temperature > 0); fixed key -> same tokens.
    return_logits: also return each step's raw next-token logits [B, N, V] (fp32).
    mesh: run sharded: the batch (and KV cache rows) split over the batch axes, heads
      and experts as the parameters are; the tokens equal an unsharded run's.
    router_mask: [B, P] left-padded like the prompts: the span Awaker's instance router
      averages over (`templates.encode_prompt(..., with_router_mask=True)`); None: the
      whole prompt.
    image_grid_thw: Qwen2-VL, each row's image grid [B, 3] (zeros: no image); M-RoPE
      positions follow it at prefill and continue past the prompt while decoding.

  Returns:
    tokens [B, max_new_tokens] int32: a row's stop token is kept, then pad_id follows.
    With return_logits, (tokens, logits); logits of a stopped row's later steps are
    those of its pad continuations, and steps after an early exit are zero.
  """
  config = dataclasses.replace(config or GenerationConfig(), **overrides)
  ids, mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
  grid = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int32)
  _check_inputs(model, ids, mask, pixel_values, grid)
  rng = jax.random.key(0) if rng is None else rng
  pixels = None if pixel_values is None else np.asarray(pixel_values, np.float32)
  if mesh is not None:
    mesh_lib.check_model_fits_mesh(model.cfg, mesh)
  with (contextlib.nullcontext() if mesh is None else mesh_lib.activation_sharding(mesh)):
    span = None if router_mask is None else _place(np.asarray(router_mask, np.int32), mesh)
    tokens, logits = _generate(model, _place(ids, mesh), _place(mask, mesh),
                               _place(pixels, mesh), rng, config.knobs(), span,
                               _place(grid, mesh), **_static(config, return_logits))
  if mesh is not None and not tokens.is_fully_addressable:
    # Rows split over other processes' devices: every process gets all of them (small).
    tokens = placement.host_value(tokens)
    logits = None if logits is None else placement.host_value(logits)
  return (tokens, logits) if return_logits else tokens


def extend(model, cache: KVCache, slot_mask: np.ndarray, input_ids: np.ndarray,
           pixel_values: Optional[np.ndarray], config: GenerationConfig, *,
           rng: Array, return_logits: bool = False, image_grid_thw: Optional[np.ndarray] = None
           ) -> tuple[Array, Optional[Array], KVCache]:
  """`generate` on a cache that already holds earlier tokens (multi-turn chat).

  input_ids [B, P] are written at slots cache.index..; `slot_mask` [B, T] marks every
  valid slot (earlier turns, this prompt, and the next max_new_tokens slots); the cache
  must have room for P + max_new_tokens more slots. It is donated: use the returned one,
  whose index is past the last token fed (every generated token except the last).
  Qwen2-VL (M-RoPE): an image belongs to the call that starts the cache (slot 0), with
  its `image_grid_thw`; later calls are text, positioned after it.
  """
  ids = np.asarray(input_ids, np.int32)
  need = int(cache.index) + ids.shape[1] + config.max_new_tokens
  if need > cache.length:
    raise ValueError(f"cache of {cache.length} slots is too short: {need} needed")
  if slot_mask.shape != (ids.shape[0], cache.length):
    raise ValueError(f"slot_mask {slot_mask.shape}: expected {(ids.shape[0], cache.length)}")
  return _extend(model, cache, jnp.asarray(slot_mask, jnp.int32), jnp.asarray(ids),
                 None if pixel_values is None else jnp.asarray(pixel_values), rng,
                 config.knobs(),
                 None if image_grid_thw is None else jnp.asarray(image_grid_thw, jnp.int32),
                 **_static(config, return_logits))


def until_stop(tokens: Any, eos_ids: Iterable[int]) -> list[list[int]]:
  """Each row's tokens up to (excluding) its first stop token."""
  stop = set(int(i) for i in eos_ids)
  out = []
  for row in np.asarray(tokens).tolist():
    end = next((i for i, t in enumerate(row) if t in stop), len(row))
    out.append(row[:end])
  return out


def left_pad(prompts: Sequence[np.ndarray], pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-aligns each prompt in a [B, length] array; returns ids and attention mask."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt {row} has {len(p)} tokens, more than the buffer ({length})")
    ids[row, length - len(p):] = p
    mask[row, length - len(p):] = 1
  return ids, mask


def greedy_generate(model, prompts: Sequence[np.ndarray], pixels: np.ndarray, *, pad_id: int,
                    eos_id: int, max_new_tokens: int, prompt_length: int,
                    mesh: Optional[jax.sharding.Mesh] = None,
                    router_masks: Optional[Sequence[np.ndarray]] = None,
                    image_grid_thw: Optional[np.ndarray] = None) -> list[list[int]]:
  """New tokens per prompt (up to, excluding, eos). `pixels` [B, H, W, 3] row-aligned;
  `router_masks` the prompts' router spans, `image_grid_thw` Qwen2-VL's grids (see
  `generate`)."""
  ids, mask = left_pad(prompts, pad_id, prompt_length)
  span = None if router_masks is None else left_pad(router_masks, 0, prompt_length)[0]
  tokens = generate(model, ids, mask, pixels, max_new_tokens=max_new_tokens,
                    eos_ids=(eos_id,), pad_id=eos_id, mesh=mesh, router_mask=span,
                    image_grid_thw=image_grid_thw)
  return until_stop(tokens, (eos_id,))
