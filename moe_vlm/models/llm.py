"""Decoder-only LLM covering the families MoE-LLaVA builds on.

Switches in `TextConfig` select the family's details:
- Llama / Qwen2: RMSNorm, gated SiLU MLP, GQA, full rotary; Qwen2 adds qkv bias.
- Phi-2: LayerNorm, one norm feeding attention and MLP in parallel, partial rotary,
  gelu_new MLP with biases, biased output projection and lm_head.
- StableLM-2: LayerNorm, sequential residual, partial rotary (0.25), gated SiLU MLP,
  optional qkv bias.
Any subset of layers may hold an MoE FFN instead of the dense one.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_vlm.models import attention
from moe_vlm.models.adapters import HyperExpert, LoRA, LoRAMoE, masked_mean
from moe_vlm.models.attention import SelfMask, causal_mask  # noqa: F401  (re-exported)
from moe_vlm.models.config import TextConfig
from moe_vlm.models.layers import (MLP, Attention, Dense, KVCache, LayerCache, Norm, param,
                                   rope_tables, token_matmul)
from moe_vlm.models.moe import MoE
from moe_vlm.models.qwen2_vl import mrope_tables

Array = jax.Array


class DecoderBlock(nnx.Module):
  """Pre-norm attention + FFN (dense or MoE) with sequential or parallel residual."""

  def __init__(self, cfg: TextConfig, *, use_moe: bool, rngs: nnx.Rngs,
               use_language_expert: bool = False, use_lora: bool = False):
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.parallel_residual = cfg.parallel_residual
    self.input_norm = Norm(cfg.hidden_size, kind=cfg.norm, eps=cfg.norm_eps, rngs=rngs,
                           param_dtype=cfg.param_dtype)
    self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head,
                          qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias,
                          causal_blocks=cfg.attention_causal_blocks,
                          impl=cfg.attention_impl, block_size=cfg.attention_block_size, **kw)
    self.post_attn_norm = (None if cfg.parallel_residual else
                           Norm(cfg.hidden_size, kind=cfg.norm, eps=cfg.norm_eps, rngs=rngs,
                                param_dtype=cfg.param_dtype))
    ffn_kw = dict(kind=cfg.mlp, activation_name=cfg.activation, use_bias=cfg.mlp_bias, **kw)
    self.is_moe = use_moe
    if use_moe:
      self.mlp = MoE(cfg.hidden_size, cfg.intermediate_size, cfg.moe, **ffn_kw)
    else:
      self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **ffn_kw)
    d, f, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.dim_per_head
    # HyperLLaVA: a dynamic expert beside the FFN, reading the same input.
    self.language_expert = (
        HyperExpert(cfg.language_expert, d, d, d, axes=("embed", "embed"), **kw)
        if use_language_expert else None)
    # Awaker2.5-VL (LoRAMoEConfig): one plain LoRA each on the frozen q/k/v; on the
    # attention output and on the MLP's projections routed LoRA experts (a router per
    # group: the MLP's projections share one, as the release's gate_proj hands its gates
    # to up_proj and down_proj) or, in stage I (`single`), one plain LoRA each.
    lm = cfg.lora_moe if use_lora else None
    lora_qkv = lora_mlp = lora_attn = None
    if lm is not None:
      group = ((lambda shapes: LoRA(lm, shapes, **kw)) if lm.single else
               (lambda shapes: LoRAMoE(lm, d, shapes, **kw)))
      if "qkv" in lm.targets:
        kv = cfg.num_kv_heads * cfg.dim_per_head
        lora_qkv = LoRA(lm, {"query": (d, heads, "embed", "heads"),
                             "key": (d, kv, "embed", "kv_heads"),
                             "value": (d, kv, "embed", "kv_heads")}, **kw)
      if "mlp" in lm.targets:
        shapes = ({"wi_gate": (d, f, "embed", "mlp"), "wi_up": (d, f, "embed", "mlp")}
                  if cfg.mlp == "gated" else {"wi": (d, f, "embed", "mlp")})
        shapes["wo"] = (f, d, "mlp", "embed")
        lora_mlp = group(shapes)
      if "attn_out" in lm.targets:
        lora_attn = group({"out": (heads, d, "heads", "embed")})
    self.lora_qkv = nnx.data(lora_qkv)
    self.lora_mlp, self.lora_attn = nnx.data(lora_mlp), nnx.data(lora_attn)

  def _lora(self, lora: Optional[LoRA | LoRAMoE], guides: Optional[dict], train: bool,
            rng: Optional[Array], salt: int, segment_ids: Optional[Array] = None):
    """The `lora(name, x)` hook of a projection group. Routed experts route once per
    call on the router input `guides["lora_router"]` (the detached embedding output:
    [B, D] per sample, or [B, L, D] per token: token routing, and the instance guide of
    a packed row, where the router noise is then one draw per segment, `segment_ids`),
    then add the experts' outputs. Noise and LoRA dropout only in training."""
    if lora is None:
      return None
    rng = None if rng is None or not train else jax.random.fold_in(rng, salt)
    fold = lambda i: None if rng is None else jax.random.fold_in(rng, i)
    drop_rng = lambda name: fold(1 + lora.names.index(name))
    if isinstance(lora, LoRA):
      return lambda name, x: lora.delta(name, x, drop_rng(name))
    routed = {}

    def hook(name: str, x: Array) -> Array:
      if "w" not in routed:
        g = guides["lora_router"]
        u = g if g.ndim == 3 else g[:, None, :]
        packed = g.ndim == 3 and lora.cfg.routing == "instance"
        routed["w"] = lora.route(u, train=train, rng=fold(0),
                                 noise_index=segment_ids if packed else None)
      return lora.delta(name, x, *routed["w"], rng=drop_rng(name))
    return hook

  def _attn_lora(self, guides: Optional[dict], train: bool, rng: Optional[Array],
                 segment_ids: Optional[Array]):
    """The attention's `lora(name, x)` hook: q/k/v's plain LoRA and the output's."""
    qkv = self._lora(self.lora_qkv, guides, train, rng, 3, segment_ids)
    out = self._lora(self.lora_attn, guides, train, rng, 2, segment_ids)
    if qkv is None and out is None:
      return None

    def hook(name: str, x: Array) -> Optional[Array]:
      f = out if name == "out" else qkv
      return None if f is None else f(name, x)
    return hook

  def _ffn(self, x: Array, modality: Optional[Array], train: bool,
           dispatch: Optional[str], rng: Optional[Array],
           guides: Optional[dict] = None,
           segment_ids: Optional[Array] = None) -> tuple[Array, Optional[dict]]:
    if self.is_moe:
      # Packed rows route like any other: every token of the routing group (padding
      # included, as DeepSpeed) meets the router; see MoEConfig.group_size for what
      # packing changes about capacity.
      y, stats = self.mlp(x, modality, train=train, dispatch=dispatch, rng=rng)
    else:
      y, stats = self.mlp(x, self._lora(self.lora_mlp, guides, train, rng, 1,
                                        segment_ids)), None
    if self.language_expert is not None:
      y = y + self.language_expert(x, guides["language_expert"]).astype(y.dtype)
    return y, stats

  def __call__(self, x: Array, mask: Array | SelfMask, rope: tuple[Array, Array],
               modality: Optional[Array] = None, *, train: bool = False,
               dispatch: Optional[str] = None, cache: Optional[LayerCache] = None,
               rng: Optional[Array] = None, guides: Optional[dict[str, Array]] = None
               ) -> tuple[Array, Optional[dict]] | tuple[Array, Optional[dict], LayerCache]:
    """-> (x, stats), or (x, stats, updated cache) when given this layer's `cache`.
    `rng` feeds the routers' optional training noise; `guides` are the per-sample
    guidance vectors of the language expert and the LoRA instance router."""
    segment_ids = mask.segment_ids if isinstance(mask, SelfMask) else None
    h = self.input_norm(x)
    attn = self.attn(h, mask, rope, cache,
                     lora=self._attn_lora(guides, train, rng, segment_ids))
    if cache is not None:
      attn, cache = attn
    if self.parallel_residual:
      ffn, stats = self._ffn(h, modality, train, dispatch, rng, guides, segment_ids)
      x = x + attn + ffn
    else:
      x = x + attn
      ffn, stats = self._ffn(self.post_attn_norm(x), modality, train, dispatch, rng, guides,
                             segment_ids)
      x = x + ffn
    return (x, stats) if cache is None else (x, stats, cache)


def cached_causal_mask(attention_mask: Array, index: Array, length: int) -> Array:
  """[B, T] validity of cache slots -> [B, length, T] bool for the `length` queries
  written at slots index..index+length-1: causal over slots, only onto valid keys.
  Equals `causal_mask` when index is 0 and length is T."""
  t = attention_mask.shape[-1]
  q_slot = index + jnp.arange(length)
  causal = jnp.arange(t)[None, :] <= q_slot[:, None]
  return causal[None] & attention_mask[:, None, :].astype(bool)


def positions_from_mask(attention_mask: Array) -> Array:
  """Position ids that skip left padding: 0 at each row's first valid token."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class DecoderLM(nnx.Module):
  """Token embeddings -> blocks -> final norm -> logits, plus MoE losses and stats."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.embed = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                       ("vocab", "embed"), cfg.param_dtype)
    moe_layers = set(cfg.moe_layers())
    expert_layers = (set(cfg.language_expert.language_layers(cfg.num_layers))
                     if cfg.language_expert else set())
    lora_layers = set(cfg.lora_moe.layer_indices(cfg.num_layers)) if cfg.lora_moe else set()
    self.layers = nnx.List([
        DecoderBlock(cfg, use_moe=i in moe_layers, use_language_expert=i in expert_layers,
                     use_lora=i in lora_layers and i not in moe_layers, rngs=rngs)
        for i in range(cfg.num_layers)])
    self.final_norm = Norm(cfg.hidden_size, kind=cfg.norm, eps=cfg.norm_eps, rngs=rngs,
                           param_dtype=cfg.param_dtype)
    self.lm_head = (None if cfg.tie_embeddings else
                    Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                          use_bias=cfg.lm_head_bias, rngs=rngs, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype))

  def embed_tokens(self, input_ids: Array) -> Array:
    return jnp.take(self.embed[...], input_ids, axis=0).astype(self.cfg.dtype)

  def head(self, x: Array) -> Array:
    """Final norm + LM head: last-layer hidden states [..., L, D] -> fp32 logits.

    Per token, so it may run on any subset of positions: training applies it only where
    a loss target is (`train.step.answer_loss`), which skips the image tokens and the
    prompt - most of a LLaVA sequence, and a large share of the step FLOPs at a 150k
    vocabulary."""
    fn, params = self.head_fn()
    return fn(params, x)

  def head_fn(self) -> tuple[Callable[[Any, Array], Array], Any]:
    """`head` as a pure function of its own parameters: (fn, params), fn(params, x) ==
    head(x). For code that differentiates the head apart from the model (the train
    step's loss computes its gradient in the forward pass, under a custom VJP)."""
    norm_def, norm_state = nnx.split(self.final_norm)
    tied = self.lm_head is None
    proj_def, proj_state = (None, self.embed[...]) if tied else nnx.split(self.lm_head)

    def fn(params: Any, x: Array) -> Array:
      norm_state, proj_state = params
      x = nnx.merge(norm_def, norm_state)(x)
      if tied:
        logits = token_matmul(x, proj_state.astype(x.dtype).T)
      else:
        logits = nnx.merge(proj_def, proj_state)(x)
      return logits.astype(jnp.float32)

    return fn, (norm_state, proj_state)

  def __call__(self, input_ids: Optional[Array] = None, *,
               inputs_embeds: Optional[Array] = None,
               attention_mask: Optional[Array] = None,
               positions: Optional[Array] = None,
               modality: Optional[Array] = None,
               train: bool = False,
               dispatch: Optional[str] = None,
               cache: Optional[KVCache] = None,
               rng: Optional[Array] = None,
               guide_mask: Optional[Array] = None,
               router_mask: Optional[Array] = None,
               segment_ids: Optional[Array] = None,
               return_hidden: bool = False
               ) -> tuple[Array, dict[str, Array]] | tuple[Array, dict[str, Array], KVCache]:
    """Returns logits [B, L, V] (fp32) and `aux`: summed MoE losses + per-layer stats.
    With `return_hidden`, the last layer's hidden states [B, L, D] instead of the logits
    (before the final norm: `head` maps them to logits).

    aux["aux_loss"] is the SUM over MoE layers of the load-balancing loss (MoE-LLaVA adds
    coef * sum); per-layer statistics are stacked on a leading [num_moe_layers] axis.

    With a `cache` (KV-cache decoding, k/v [layers, B, T, KV, D]) the L inputs are the
    tokens at slots cache.index.., `attention_mask` is [B, T] over all cache slots,
    default positions skip its padding, and the call returns (logits, aux, cache).

    Guidance vectors (`TextConfig.guides()`) are masked means over `guide_mask` [B, L]
    (the prompt span; default: every valid token of the call). With a cache they are
    computed by the call that starts at slot 0 (the prefill) and kept in the cache.
    Awaker's instance router averages over `router_mask` [B, L] instead when given (the
    span from the image start to the end of the first user turn, `data.templates`); its
    token router reads each token's own (detached) embedding output.

    Packed rows (`segment_ids` [B, L]: 1, 2, ... per sample, 0 = padding; no cache):
    attention stays inside each segment, positions restart at 0 in each segment (unless
    `positions` are given), and guidance vectors are per segment (each token gets its
    sample's).

    M-RoPE (`rope_type="mrope"`, Qwen2-VL): `positions` may be [3, B, L] (temporal,
    height, width rows; `qwen2_vl.rope_index`); [B, L] or the default ones put every
    token at the same position in the three rows (text).
    """
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    b, l, _ = x.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, l if cache is None else cache.length), jnp.int32)
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packed rows) are for training-style calls without a "
                       "KV cache")
    num_positions = None  # a static bound on the positions, when they are ours
    if positions is None:
      positions = (positions_from_mask(attention_mask) if segment_ids is None else
                   attention.positions_from_segments(segment_ids))
      num_positions = attention_mask.shape[1]
      if cache is not None:
        positions = jax.lax.dynamic_slice_in_dim(positions, cache.index, l, axis=1)
    if cache is not None:
      mask = cached_causal_mask(attention_mask, cache.index, l)
    elif segment_ids is not None:
      mask = SelfMask(segment_ids=segment_ids.astype(jnp.int32))
    else:
      mask = SelfMask(attention_mask=attention_mask)
    if self.cfg.rope_type == "mrope":  # Qwen2-VL: positions [3, B, L] (t, h, w) or [B, L]
      rope = mrope_tables(positions, self.cfg.rotary_dim, self.cfg.rope_theta,
                          self.cfg.mrope_section)
    else:
      rope = rope_tables(positions, self.cfg.rotary_dim, self.cfg.rope_theta, num_positions)
    wanted = self.cfg.guides()
    if guide_mask is None:
      guide_mask = (attention_mask if cache is None else
                    jax.lax.dynamic_slice_in_dim(attention_mask, cache.index, l, axis=1))
    guides: dict[str, Array] = {}

    def add_guide(name: str, h: Array, span: Optional[Array] = None) -> None:
      span = guide_mask if span is None else span
      g = (masked_mean(h, span) if segment_ids is None else  # [B, D] or [B, L, D]
           attention.segment_mean(h, span, segment_ids))
      if cache is not None and cache.guides and name in cache.guides:
        g = jnp.where(cache.index == 0, g, cache.guides[name])  # decode: the prompt's
      guides[name] = g

    if "lora_router" in wanted:  # Awaker: the embedding output, detached
      add_guide("lora_router", jax.lax.stop_gradient(x), router_mask)
    elif self.cfg.lora_moe is not None and not self.cfg.lora_moe.single:
      guides["lora_router"] = jax.lax.stop_gradient(x)  # token routing: each token's own
    guide_layer = (self.cfg.language_expert.guide_layer(self.cfg.num_layers)
                   if "language_expert" in wanted else -1)
    per_layer = []
    run = _rematted(self.cfg.remat, train, dispatch)
    for i, block in enumerate(self.layers):
      if i == guide_layer:  # HyperLLaVA: the hidden state entering the middle layer
        add_guide("language_expert", x)
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      if cache is None:
        x, stats = run(block, x, mask, rope, modality, layer_rng, guides or None)
      else:  # inference only: no remat
        x, stats, view = block(x, mask, rope, modality, train=train, dispatch=dispatch,
                               cache=cache.layer(i), guides=guides or None)
        cache = view.cache
      if stats is not None:
        per_layer.append(stats)
    out = x if return_hidden else self.head(x)
    if cache is None:
      return out, summarize_moe(per_layer)
    kept = {k: v for k, v in guides.items() if k in wanted}  # per-sample guides only
    return out, summarize_moe(per_layer), cache._replace(index=cache.index + l,
                                                         guides=kept or None)


_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _rematted(policy: str, train: bool, dispatch: Optional[str]):
  """A block runner, wrapped in nnx.remat when a policy asks for recomputation."""
  def run(block, x, mask, rope, modality, rng, guides):
    return block(x, mask, rope, modality, train=train, dispatch=dispatch, rng=rng,
                 guides=guides)
  if policy == "none":
    return run
  return nnx.remat(run, policy=_POLICIES[policy])


def summarize_moe(per_layer: list[dict[str, Array]]) -> dict[str, Array]:
  """Stacks per-layer MoE stats; sums the losses over layers. Empty for dense models."""
  if not per_layer:
    zero = jnp.zeros((), jnp.float32)
    return {"aux_loss": zero, "z_loss": zero}
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  out = {f"layers/{k}": v for k, v in stacked.items()}
  out["aux_loss"] = jnp.sum(stacked["aux_loss"])
  out["z_loss"] = jnp.sum(stacked["z_loss"])
  return out
