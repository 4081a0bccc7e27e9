"""The train step: one pure function, jit-compiled with explicit shardings.

State is a `TrainState` of flat parameter dicts split into `params` (trainable, with
optimizer state) and `frozen` (no gradient, no optimizer state: XLA never computes
their weight gradients). Loss = masked next-token cross-entropy over answer tokens,
normalised by the answer-token count of the whole (accumulated) batch, plus
`aux_loss_coef * sum of per-layer load-balancing losses` and an optional z-loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_vlm.models.adapters import prompt_mask
from moe_vlm.models.params import ParamCodec, Params
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train.optim import OptimConfig, make_optimizer, schedule

Batch = Mapping[str, jax.Array]
MODEL_INPUTS = ("input_ids", "attention_mask", "loss_mask", "pixel_values")
# Packed batches (`data.packing="first_fit"`) add the rows' segment ids [B, L] (1, 2, ...
# per sample, 0 = padding), and their pixel_values are [B, M, H, W, C].
PACKED_INPUTS = ("segment_ids",)
# The span Awaker's instance router averages over (`data.templates`: the first user
# turn's content); batches without it route on the prompt (`adapters.prompt_mask`).
# Qwen2-VL batches carry each image's patch grid [B, 3] ([B, M, 3] packed).
OPTIONAL_INPUTS = ("router_mask", "image_grid_thw")


def model_inputs(batch: Mapping[str, Any]) -> tuple[str, ...]:
  """The keys of `batch` the train step reads."""
  return MODEL_INPUTS + tuple(k for k in PACKED_INPUTS + OPTIONAL_INPUTS if k in batch)


class TrainState(NamedTuple):
  step: jax.Array
  params: Params       # trainable
  frozen: Params       # everything else
  opt_state: Any
  rng: jax.Array       # raw uint32 key data (checkpointable); folded with the step


@dataclasses.dataclass(frozen=True)
class StepConfig:
  optim: OptimConfig = OptimConfig()
  grad_accum: int = 1
  aux_loss_coef: float = 0.01
  z_loss_coef: float = 0.0
  # Override the MoE dispatch used in training (None: the model config's).
  dispatch: Optional[str] = None
  # Run the LM head only on this fraction of each row's positions - the ones with a
  # loss target - instead of all of them (None: all). Exact either way: a batch with a
  # row of more targets takes the full head (counted in the metric `head_full`).
  head_fraction: Optional[float] = None

  def head_capacity(self, seq_len: int) -> Optional[int]:
    """Positions per row the compact LM head runs on (a multiple of 8), or None."""
    if self.head_fraction is None:
      return None
    if not 0.0 < self.head_fraction <= 1.0:
      raise ValueError(f"head_fraction={self.head_fraction}: expected a fraction in (0, 1]")
    k = -(-int(math.ceil(self.head_fraction * seq_len)) // 8) * 8
    return None if k >= seq_len else k


class EmptyTrainableSet(ValueError):
  """A stage would train nothing - usually a module list that matches no parameter."""


def split_params(params: Params, trainable: Callable[[str], bool]) -> tuple[Params, Params]:
  train = {k: v for k, v in params.items() if trainable(k)}
  frozen = {k: v for k, v in params.items() if not trainable(k)}
  if not train:
    raise EmptyTrainableSet("no parameter is trainable: the trainable-module selection "
                            "matched nothing (check the stage's train_modules)")
  return train, frozen


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array,
                       segment_ids: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Per position: the next token and its loss weight (1 where it is an answer token).
  With `segment_ids` (packed rows) the last token of a sample predicts nothing: the
  next position belongs to another sample."""
  # The targets move left (the last position gets a dummy target of weight 0) instead
  # of the logits: slicing [B, L, V] logits copies them, and so does its gradient.
  shift = lambda a: jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
  w = shift(loss_mask).astype(jnp.float32)
  if segment_ids is not None:
    w = w * (shift(segment_ids) == segment_ids).astype(jnp.float32)
  return shift(input_ids), w


def weighted_ce(logits: jax.Array, targets: jax.Array, w: jax.Array) -> jax.Array:
  """sum(w * cross-entropy(logits, targets)) over every position."""
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * w)


def token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
               segment_ids: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Sum of next-token CE over positions whose TARGET is an answer token, and their count."""
  targets, w = next_token_targets(input_ids, loss_mask, segment_ids)
  return weighted_ce(logits, targets, w), jnp.sum(w)


def target_positions(w: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """The first `capacity` positions of each row with a loss weight [B, capacity] (the
  rest filled with the last position, whose weight is always 0), and whether every
  row's targets fit."""
  has = w > 0
  idx = jax.vmap(lambda r: jnp.nonzero(r, size=capacity, fill_value=r.shape[0] - 1)[0])(has)
  return idx.astype(jnp.int32), jnp.all(jnp.sum(has, axis=1) <= capacity)


def cond_grad_in_forward(pred: jax.Array, true_fn: Callable[..., jax.Array],
                         false_fn: Callable[..., jax.Array], *args: Any) -> jax.Array:
  """`lax.cond(pred, true_fn, false_fn, *args)` for scalar functions, differentiable in
  `args`, whose gradient the taken branch computes in the forward pass.

  Differentiating `lax.cond` itself makes each branch output the residuals of both (the
  branch not taken fills the other's with zeros): here the compact LM head would write
  a zero [B, L, V] logits buffer every step. Taking the gradient inside each branch
  keeps the outputs the same for both (value, d args), and nothing of the head's
  [B, K, V] activations lives on until the backward pass: it only scales the stored
  gradients by the incoming cotangent.
  """
  argnums = tuple(range(len(args)))

  @jax.custom_vjp
  def f(*a):
    return jax.lax.cond(pred, true_fn, false_fn, *a)

  def fwd(*a):
    return jax.lax.cond(pred, jax.value_and_grad(true_fn, argnums),
                        jax.value_and_grad(false_fn, argnums), *a)

  def bwd(grads, ct):
    return jax.tree.map(lambda g: (g * ct).astype(g.dtype), grads)

  f.defvjp(fwd, bwd)
  return f(*args)


def answer_loss(head_fn: Callable[[Any, jax.Array], jax.Array], head_params: Any,
                hidden: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                capacity: Optional[int] = None,
                segment_ids: Optional[jax.Array] = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`token_loss` of `head_fn(head_params, hidden)`, the head run only where a target is.

  The head (final norm, [D, V] projection, softmax over V) is per token, and only the
  answer tokens' logits reach the loss: in a LLaVA batch the image tokens and the prompt
  are most positions. With `capacity`, each row's target positions are gathered into
  [B, capacity] first. A batch where some row has more targets takes the full head
  instead (a `lax.cond`: one program, the branch chosen on the device), so the loss and
  gradients never depend on the capacity. Returns (CE sum, target count, 1.0 if the
  full head ran else 0.0). `segment_ids`: packed rows (see `next_token_targets`).
  """
  targets, w = next_token_targets(input_ids, loss_mask, segment_ids)

  full = lambda p, h: weighted_ce(head_fn(p, h), targets, w)
  if capacity is None or capacity >= hidden.shape[1]:
    return full(head_params, hidden), jnp.sum(w), jnp.ones((), jnp.float32)
  idx, fits = target_positions(w, capacity)
  pick = lambda a: jnp.take_along_axis(a, idx, axis=1)

  def compact(p, h):
    h = jnp.take_along_axis(h, idx[..., None], axis=1)
    return weighted_ce(head_fn(p, h), pick(targets), pick(w))

  return (cond_grad_in_forward(fits, compact, full, head_params, hidden), jnp.sum(w),
          1.0 - fits.astype(jnp.float32))


def _moe_metrics(aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  out = {}
  for key in ("tokens_per_expert", "tokens_per_expert_image", "tokens_per_expert_text",
              "dropped_fraction"):
    if f"layers/{key}" in aux:
      out[f"moe/{key}"] = aux[f"layers/{key}"]
  return out


def make_loss_fn(codec: ParamCodec, cfg: StepConfig):
  def loss_fn(params: Params, frozen: Params, batch: Batch, num_targets: jax.Array,
              rng: jax.Array):
    model = codec.merge({**frozen, **params})
    segment_ids = batch.get("segment_ids")
    # Per-sample guidance (HyperLLaVA, Awaker instance routing) reads only the prompt
    # (of each sample, in a packed row).
    guide = prompt_mask(batch["attention_mask"], batch["loss_mask"], segment_ids)
    hidden, aux = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                        train=True, dispatch=cfg.dispatch, rng=rng, guide_mask=guide,
                        router_mask=batch.get("router_mask"), segment_ids=segment_ids,
                        image_grid_thw=batch.get("image_grid_thw"), return_hidden=True)
    head_fn, head_params = model.llm.head_fn()
    ce_sum, n, head_full = answer_loss(head_fn, head_params, hidden, batch["input_ids"],
                                       batch["loss_mask"],
                                       cfg.head_capacity(batch["input_ids"].shape[1]),
                                       segment_ids)
    ce = ce_sum / jnp.maximum(num_targets, 1.0)
    total = ce + cfg.aux_loss_coef * aux["aux_loss"] + cfg.z_loss_coef * aux["z_loss"]
    metrics = {"ce_sum": ce_sum, "targets": n, "aux_loss": aux["aux_loss"],
               "z_loss": aux["z_loss"], "head_full": head_full, **_moe_metrics(aux)}
    return total, metrics
  return loss_fn


def make_train_step(codec: ParamCodec, cfg: StepConfig,
                    tx: Optional[optax.GradientTransformation] = None):
  """(state, batch) -> (state, metrics); pure, so it can be jitted with any shardings."""
  tx = tx or make_optimizer(cfg.optim)
  grad_fn = jax.grad(make_loss_fn(codec, cfg), has_aux=True)
  lr_at = schedule(cfg.optim)
  a = cfg.grad_accum

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    batch = {k: batch[k] for k in model_inputs(batch)}
    # The loss is normalised by the answer tokens of the whole (accumulated) batch.
    num_targets = jnp.sum(next_token_targets(batch["input_ids"], batch["loss_mask"],
                                             batch.get("segment_ids"))[1])
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if a == 1:
      grads, m = grad_fn(state.params, state.frozen, batch, num_targets, rng)
    else:
      # Micro-batch i takes rows i, i+a, i+2a, ...: each keeps the full batch sharding
      # (a plain [a, B/a] reshape would spread the shards over the accumulation axis and
      # leave every micro-step split fewer ways - 5x the memory on a v5e-16 mesh).
      micro = jax.tree.map(
          lambda x: x.reshape((x.shape[0] // a, a) + x.shape[1:]).swapaxes(0, 1), batch)

      def body(acc, inputs):
        i, mb = inputs
        g, m = grad_fn(state.params, state.frozen, mb, num_targets, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, (g, m)), None

      zeros = jax.eval_shape(lambda: grad_fn(state.params, state.frozen,
                                             jax.tree.map(lambda x: x[0], micro), num_targets,
                                             rng))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, m), _ = jax.lax.scan(body, zeros, (jnp.arange(a), micro))
      # Losses and routing fractions are per micro-batch means: average them; counts add.
      m = {k: (v if k in ("ce_sum", "targets") or k.startswith("moe/tokens") else v / a)
           for k, v in m.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": m["ce_sum"] / jnp.maximum(m["targets"], 1.0),
        "aux_loss": m["aux_loss"], "z_loss": m["z_loss"], "targets": m["targets"],
        "grad_norm": optax.tree.norm(grads), "lr": lr_at(state.step),
        "head_full": m["head_full"],
        **{k: v for k, v in m.items() if k.startswith("moe/")},
    }
    return TrainState(state.step + 1, params, state.frozen, opt_state, state.rng), metrics

  return step


# ------------------------------------------------------------------ sharded set-up


def state_shardings(codec: ParamCodec, trainable: Callable[[str], bool], mesh: Mesh,
                    tx: optax.GradientTransformation,
                    rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES) -> TrainState:
  """NamedShardings for every leaf of the TrainState (optimizer moments like params)."""
  shard = mesh_lib.param_shardings(codec.logical_axes, codec.shapes, mesh, rules)
  train, frozen = split_params(shard, trainable)
  abstract = {k: codec.shapes[k] for k in train}
  opt_abstract = jax.eval_shape(tx.init, abstract)
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, train,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return TrainState(replicated, train, frozen, opt, replicated)


def init_state(params: Params, trainable: Callable[[str], bool],
               tx: optax.GradientTransformation, shardings: Optional[TrainState] = None,
               step: int = 0, seed: int = 0) -> TrainState:
  """TrainState from full params, placed on the mesh when `shardings` is given."""
  train, frozen = split_params(params, trainable)
  rng = jax.random.key_data(jax.random.key(seed))
  if shardings is None:
    return TrainState(jnp.asarray(step, jnp.int32), train, frozen, tx.init(train), rng)
  train = jax.device_put(train, shardings.params)
  frozen = jax.device_put(frozen, shardings.frozen)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(train)
  return TrainState(jax.device_put(jnp.asarray(step, jnp.int32), shardings.step), train,
                    frozen, opt_state, jax.device_put(rng, shardings.rng))


def batch_shardings(mesh: Mesh, batch: Batch,
                    rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES) -> dict[str, NamedSharding]:
  return {k: mesh_lib.batch_sharding(mesh, jnp.ndim(batch[k]), rules)
          for k in model_inputs(batch)}


def jit_train_step(step_fn, mesh: Mesh, shardings: TrainState, example_batch: Batch,
                   rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES):
  """jit with explicit in/out shardings and the state donated; activations are pinned
  by logical names while tracing (see `mesh_lib.activation_sharding`)."""
  bsh = batch_shardings(mesh, example_batch, rules)
  replicated = NamedSharding(mesh, P())

  def traced(state, batch):
    with mesh_lib.activation_sharding(mesh, rules):
      return step_fn(state, batch)

  return jax.jit(traced, in_shardings=(shardings, bsh), out_shardings=(shardings, replicated),
                 donate_argnums=(0,))
