"""Tests of the MoE FFN (moe_vlm.models.moe) against independent references.

References used here:
- a per-token float64 numpy loop (softmax, top-k, renormalise, sum of w_k * FFN_e(x));
- transformers' Qwen2MoeSparseMoeBlock (dropless, renormalised top-k, fused experts);
- a numpy re-implementation of DeepSpeed 0.9.5 top-2 capacity gating;
- the dense `moe_vlm.models.layers.MLP` (every expert a copy: upcycling).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.models.config import ConfigError, MoEConfig
from moe_vlm.models.layers import MLP
from moe_vlm.models.moe import IMAGE, PAD, TEXT, MoE

D, F, E = 16, 32, 4
B, L = 2, 24
S = B * L
EPS32 = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- helpers


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def make_weights(seed: int, kind: str, use_bias: bool, num_experts: int = E,
                 hidden: int = D, inter: int = F) -> dict[str, np.ndarray]:
  """Random float32 weights (scaled so activations stay O(1))."""
  rng = np.random.default_rng(seed)
  n = lambda *shape, scale: (rng.normal(size=shape) * scale).astype(np.float32)
  w = {"router": n(hidden, num_experts, scale=1.0 / math.sqrt(hidden)),
       "wo": n(num_experts, inter, hidden, scale=1.0 / math.sqrt(inter))}
  if kind == "gated":
    w["wi_gate"] = n(num_experts, hidden, inter, scale=1.0 / math.sqrt(hidden))
    w["wi_up"] = n(num_experts, hidden, inter, scale=1.0 / math.sqrt(hidden))
  else:
    w["wi"] = n(num_experts, hidden, inter, scale=1.0 / math.sqrt(hidden))
    if use_bias:
      w["wi_bias"] = n(num_experts, inter, scale=0.5)
  if use_bias:
    w["wo_bias"] = n(num_experts, hidden, scale=0.5)
  return w


def build(cfg: MoEConfig, kind: str, use_bias: bool, weights: dict[str, np.ndarray],
          hidden: int = D, inter: int = F) -> MoE:
  act = "silu" if kind == "gated" else "gelu_new"
  layer = MoE(hidden, inter, cfg, kind=kind, activation_name=act, use_bias=use_bias,
              rngs=nnx.Rngs(0))
  layer.router.kernel[...] = jnp.asarray(weights["router"])
  for name, value in weights.items():
    if name == "router":
      continue
    p = getattr(layer.experts, name)
    assert p is not None and p.shape == value.shape, name
    p[...] = jnp.asarray(value)
  # The layer must not own parameters the reference does not know about.
  expected = {"wi_gate", "wi_up", "wi", "wo", "wi_bias", "wo_bias"} & set(weights)
  present = {n for n in ("wi_gate", "wi_up", "wi", "wo", "wi_bias", "wo_bias")
             if getattr(layer.experts, n, None) is not None}
  assert present == expected
  return layer


def np_ffn(w: dict[str, np.ndarray], kind: str, e: int, x: np.ndarray) -> np.ndarray:
  """One expert's FFN in float64 on a single token (or a batch of tokens)."""
  g = lambda k: w[k][e].astype(np.float64)
  x = x.astype(np.float64)
  if kind == "gated":
    h = _silu(x @ g("wi_gate")) * (x @ g("wi_up"))
  else:
    h = x @ g("wi")
    if "wi_bias" in w:
      h = h + g("wi_bias")
    h = _gelu_tanh(h)
  y = h @ g("wo")
  if "wo_bias" in w:
    y = y + g("wo_bias")
  return y


def np_route(x: np.ndarray, router: np.ndarray, k: int):
  """float64 logits, softmax over all experts, top-k (top-1 first)."""
  logits = x.astype(np.float64) @ router.astype(np.float64)
  z = logits - logits.max(-1, keepdims=True)
  probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  gates = np.take_along_axis(probs, idx, axis=-1)
  if k < probs.shape[-1]:
    # Guard the test data: float32 vs float64 rounding must not be able to flip a choice.
    srt = -np.sort(-probs, axis=-1)
    assert np.min(srt[:, k - 1] - srt[:, k]) > 1e-5, "near-tie in the test data"
  return logits, probs, idx, gates


def np_dropless(x, w, kind, k, renormalize=True):
  """Per-token loop: sum over the top-k of renormalised gate * FFN_e(x)."""
  tokens = x.reshape(-1, x.shape[-1])
  _, _, idx, gates = np_route(tokens, w["router"], k)
  y = np.zeros(tokens.shape, np.float64)
  for s in range(tokens.shape[0]):
    wts = gates[s] / gates[s].sum() if renormalize else gates[s]
    for j in range(k):
      y[s] += wts[j] * np_ffn(w, kind, idx[s, j], tokens[s])
  return y.reshape(x.shape)


def np_capacity(x, w, kind, k, capacity, renormalize=True):
  """DeepSpeed 0.9.5 top-k capacity gating, written as loops.

  Slots are filled choice-major (all first choices, then all second choices), each
  in sequence order; an assignment finding its expert full is dropped. Kept gates are
  renormalised with an eps floor; a token that lost every choice outputs zero.
  """
  tokens = x.reshape(-1, x.shape[-1])
  n = tokens.shape[0]
  _, _, idx, gates = np_route(tokens, w["router"], k)
  num_experts = w["router"].shape[1]
  filled = np.zeros(num_experts, np.int64)
  keep = np.zeros((n, k), bool)
  for j in range(k):
    for s in range(n):
      e = idx[s, j]
      if filled[e] < capacity:
        keep[s, j] = True
        filled[e] += 1
  kept = gates * keep
  wts = kept / np.maximum(kept.sum(-1, keepdims=True), EPS32) if renormalize else kept
  y = np.zeros(tokens.shape, np.float64)
  for s in range(n):
    for j in range(k):
      if keep[s, j]:
        y[s] += wts[s, j] * np_ffn(w, kind, idx[s, j], tokens[s])
  return y.reshape(x.shape), keep, idx


def skewed_inputs(seed: int, router_bias: tuple[float, ...], noise: float = 0.3):
  """Inputs whose feature 0 is a constant 1, so router row 0 acts as a logit bias."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  x[..., 0] = 1.0
  router = (rng.normal(size=(D, E)) * noise).astype(np.float32)
  router[0] = np.asarray(router_bias, np.float32)
  return x, router


@functools.partial(nnx.jit, static_argnames=("train", "dispatch"))
def _apply(layer, x, modality, train, dispatch):
  return layer(x, modality, train=train, dispatch=dispatch)


def run(layer, x, modality=None, *, train=False, dispatch=None, jit=False):
  """Calls the layer (eager by default: op compiles are shared by all tests) -> numpy."""
  args = (jnp.asarray(x), None if modality is None else jnp.asarray(modality))
  if jit:
    y, stats = _apply(layer, *args, train=train, dispatch=dispatch)
  else:
    y, stats = layer(*args, train=train, dispatch=dispatch)
  return np.asarray(y), {k: np.asarray(v) for k, v in stats.items()}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def x_rand():
  return np.random.default_rng(1).normal(size=(B, L, D)).astype(np.float32)


@pytest.fixture(scope="module")
def modality():
  rng = np.random.default_rng(2)
  return rng.choice([PAD, TEXT, IMAGE], size=(B, L), p=[0.2, 0.4, 0.4]).astype(np.int32)


@pytest.fixture(scope="module")
def drop_case():
  """Capacity-dropping fixture: experts 0 and 1 oversubscribed, top-2."""
  x, router = skewed_inputs(3, (2.0, 1.5, 0.0, 0.0))
  w = make_weights(4, "gated", False)
  w["router"] = router
  return x, w


# ----------------------------------------------------------------------------- 1. dropless


@pytest.mark.parametrize("kind,use_bias", [("gated", False), ("gated", True), ("plain", True),
                                           ("plain", False)])
@pytest.mark.parametrize("k", [1, 2])
def test_dropless_matches_per_token_reference(x_rand, kind, use_bias, k):
  w = make_weights(10 + k, kind, use_bias)
  layer = build(MoEConfig(num_experts=E, top_k=k, dispatch="dropless"), kind, use_bias, w)
  y, stats = run(layer, x_rand)
  ref = np_dropless(x_rand, w, kind, k)
  assert y.shape == x_rand.shape and y.dtype == np.float32
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert np.abs(ref).max() > 0.1  # not a trivially small output
  assert stats["dropped_fraction"] == 0.0
  # The `dispatch` argument overrides a capacity config.
  layer_c = build(MoEConfig(num_experts=E, top_k=k, dispatch="capacity",
                            capacity_factor=0.25, eval_capacity_factor=0.25),
                  kind, use_bias, w)
  y2, _ = run(layer_c, x_rand, dispatch="dropless")
  np.testing.assert_allclose(y2, ref, rtol=1e-5, atol=1e-5)


def test_dropless_plain_matches_phi_style_torch_mlp(x_rand):
  """Plain-with-bias experts follow Phi's fc1 -> gelu_new -> fc2 (torch reference)."""
  torch = pytest.importorskip("torch")
  from transformers.activations import ACT2FN
  w = make_weights(21, "plain", True)
  layer = build(MoEConfig(num_experts=E, top_k=2, dispatch="dropless"), "plain", True, w)
  y, _ = run(layer, x_rand)
  tokens = torch.tensor(x_rand.reshape(S, D))
  _, _, idx, gates = np_route(x_rand.reshape(S, D), w["router"], 2)
  gates = gates / gates.sum(-1, keepdims=True)
  ref = torch.zeros(S, D, dtype=torch.float64)
  act = ACT2FN["gelu_new"]
  for e in range(E):
    fc1 = torch.nn.Linear(D, F).double()
    fc2 = torch.nn.Linear(F, D).double()
    with torch.no_grad():
      fc1.weight.copy_(torch.tensor(w["wi"][e].T))
      fc1.bias.copy_(torch.tensor(w["wi_bias"][e]))
      fc2.weight.copy_(torch.tensor(w["wo"][e].T))
      fc2.bias.copy_(torch.tensor(w["wo_bias"][e]))
      out = fc2(act(fc1(tokens.double())))
    for j in range(2):
      sel = torch.tensor(idx[:, j] == e)
      ref[sel] += torch.tensor(gates[:, j])[sel, None] * out[sel]
  np.testing.assert_allclose(y.reshape(S, D), ref.numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 2. Qwen2MoE


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_matches_transformers_qwen2_moe(x_rand, k):
  torch = pytest.importorskip("torch")
  from transformers import Qwen2MoeConfig
  from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
  torch.manual_seed(0)
  hf_cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                          num_experts_per_tok=k, norm_topk_prob=True,
                          shared_expert_intermediate_size=0, hidden_act="silu")
  block = Qwen2MoeSparseMoeBlock(hf_cfg).float().eval()
  w = make_weights(30 + k, "gated", False)
  with torch.no_grad():
    block.gate.weight.copy_(torch.tensor(w["router"].T))  # [E, D]
    assert tuple(block.experts.gate_up_proj.shape) == (E, 2 * F, D)
    assert tuple(block.experts.down_proj.shape) == (E, D, F)
    gate_up = np.concatenate([w["wi_gate"].transpose(0, 2, 1),
                              w["wi_up"].transpose(0, 2, 1)], axis=1)  # [E, 2F, D]
    block.experts.gate_up_proj.copy_(torch.tensor(gate_up))
    block.experts.down_proj.copy_(torch.tensor(w["wo"].transpose(0, 2, 1)))  # [E, D, F]
    out = block(torch.tensor(x_rand))
  if isinstance(out, tuple):
    out = out[0]
  ref = out.numpy()
  assert ref.shape == x_rand.shape
  # The zero-size shared expert contributes nothing: HF equals our float64 loop too.
  np.testing.assert_allclose(ref, np_dropless(x_rand, w, "gated", k), rtol=1e-5, atol=1e-5)
  layer = build(MoEConfig(num_experts=E, top_k=k), "gated", False, w)
  y, _ = run(layer, x_rand, dispatch="dropless")
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 3. capacity


def test_capacity_matches_deepspeed_reference_with_drops(drop_case, modality):
  x, w = drop_case
  cfg = MoEConfig(num_experts=E, top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0)
  cap = math.ceil(S / E * 1.0 * 2)  # 24
  assert cfg.capacity(S, True) == cap == 24
  layer = build(cfg, "gated", False, w)
  y, stats = run(layer, x, modality, train=True, dispatch="capacity")
  ref, keep, idx = np_capacity(x, w, "gated", 2, cap)
  # The case must exercise every branch: both kept, one kept (either one), none kept.
  kept = keep.sum(-1)
  assert (kept == 2).any() and (kept == 0).any()
  assert (keep[:, 0] & ~keep[:, 1]).any()
  assert (~keep[:, 0] & keep[:, 1]).any(), "want a token whose first choice was dropped"
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  flat_y = y.reshape(S, D)
  assert np.all(flat_y[kept == 0] == 0.0)
  # A token that kept only one choice gets weight 1 on it (pure expert output).
  s1 = np.flatnonzero(keep[:, 0] & ~keep[:, 1])[0]
  np.testing.assert_allclose(flat_y[s1], np_ffn(w, "gated", idx[s1, 0], x.reshape(S, D)[s1]),
                             rtol=1e-5, atol=1e-5)
  # Stats: drops over all S*k assignments, per-modality drop rates.
  np.testing.assert_allclose(stats["dropped_fraction"], 1.0 - keep.mean(), rtol=1e-6)
  mod = modality.reshape(S)
  for name, code in (("image", IMAGE), ("text", TEXT)):
    m = mod == code
    np.testing.assert_allclose(stats[f"dropped_fraction_{name}"],
                               (~keep[m]).sum() / (m.sum() * 2), rtol=1e-6)
  # Tokens per expert counts assignments before dropping.
  np.testing.assert_array_equal(stats["tokens_per_expert"], np.bincount(idx.ravel(), minlength=E))


def test_capacity_train_vs_eval_factor(drop_case):
  x, w = drop_case
  cfg = MoEConfig(num_experts=E, top_k=2, capacity_factor=0.75, eval_capacity_factor=1.25)
  cap_train = math.ceil(S / E * 0.75 * 2)  # 18
  cap_eval = math.ceil(S / E * 1.25 * 2)  # 30
  assert (cfg.capacity(S, True), cfg.capacity(S, False)) == (cap_train, cap_eval)
  layer = build(cfg, "gated", False, w)
  y_train, st_train = run(layer, x, train=True, dispatch="capacity")
  y_eval, st_eval = run(layer, x, train=False, dispatch="capacity")
  ref_train, keep_train, _ = np_capacity(x, w, "gated", 2, cap_train)
  ref_eval, keep_eval, _ = np_capacity(x, w, "gated", 2, cap_eval)
  assert keep_train.sum() < keep_eval.sum() < keep_eval.size  # both drop, differently
  np.testing.assert_allclose(y_train, ref_train, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-5, atol=1e-5)
  assert np.abs(y_train - y_eval).max() > 1e-2
  np.testing.assert_allclose(st_train["dropped_fraction"], 1 - keep_train.mean(), rtol=1e-6)
  np.testing.assert_allclose(st_eval["dropped_fraction"], 1 - keep_eval.mean(), rtol=1e-6)
  # The config's default dispatch is capacity.
  y_default, _ = run(layer, x, train=True)
  np.testing.assert_array_equal(y_default, y_train)
  # Jitted calls agree with the eager ones.
  y_jit, st_jit = run(layer, x, train=True, jit=True)
  np.testing.assert_allclose(y_jit, y_train, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(st_jit["dropped_fraction"], st_train["dropped_fraction"])


@pytest.mark.parametrize("kind,use_bias", [("gated", False), ("plain", True)])
def test_capacity_without_drops_equals_dropless(x_rand, kind, use_bias):
  w = make_weights(40, kind, use_bias)
  layer = build(MoEConfig(num_experts=E, top_k=2, capacity_factor=4.0), kind, use_bias, w)
  y_cap, st = run(layer, x_rand, train=True, dispatch="capacity")
  y_dl, _ = run(layer, x_rand, dispatch="dropless")
  assert st["dropped_fraction"] == 0.0
  np.testing.assert_allclose(y_cap, y_dl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y_cap, np_capacity(x_rand, w, kind, 2, 48)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_renormalize_false_keeps_raw_gates(drop_case, k):
  """renormalize=False (DeepSpeed's top-1 gating): kept choices weigh their raw
  probability, dropped ones zero."""
  x, w = drop_case
  cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=1.0, renormalize=False)
  layer = build(cfg, "gated", False, w)
  y_dl, _ = run(layer, x, dispatch="dropless")
  np.testing.assert_allclose(y_dl, np_dropless(x, w, "gated", k, renormalize=False),
                             rtol=1e-5, atol=1e-5)
  assert np.abs(y_dl - np_dropless(x, w, "gated", k)).max() > 1e-2
  cap = math.ceil(S / E * 1.0 * k)
  y_cap, _ = run(layer, x, train=True, dispatch="capacity")
  ref, keep, _ = np_capacity(x, w, "gated", k, cap, renormalize=False)
  assert (~keep).any()
  np.testing.assert_allclose(y_cap, ref, rtol=1e-5, atol=1e-5)


def np_aux(probs, top1, num_experts=E):
  me = probs.mean(0)
  ce = np.bincount(top1, minlength=num_experts) / len(top1)
  return np.mean(me * ce) * num_experts * num_experts


def test_capacity_group_size_routes_each_group_separately(drop_case):
  """group_size=1: each sequence is its own DeepSpeed group (own capacity, own aux)."""
  x, w = drop_case
  cfg = MoEConfig(num_experts=E, top_k=2, capacity_factor=1.0, group_size=1)
  cap = math.ceil(L / E * 1.0 * 2)  # 12 per sequence of 24 tokens
  layer = build(cfg, "gated", False, w)
  y, stats = run(layer, x, train=True, dispatch="capacity")
  refs, keeps, auxes = [], [], []
  for b in range(B):
    ref, keep, _ = np_capacity(x[b:b + 1], w, "gated", 2, cap)
    _, probs, idx, _ = np_route(x[b], w["router"], 2)
    refs.append(ref[0]), keeps.append(keep), auxes.append(np_aux(probs, idx[:, 0]))
  keep = np.concatenate(keeps)
  assert (~keeps[0]).any() and (~keeps[1]).any()  # both groups drop
  np.testing.assert_allclose(y, np.stack(refs), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["dropped_fraction"], 1 - keep.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats["aux_loss"], np.mean(auxes), rtol=1e-5)
  # One group over the whole batch differs (the first sequence has priority there) ...
  whole = build(MoEConfig(num_experts=E, top_k=2, capacity_factor=1.0), "gated", False, w)
  y_whole, _ = run(whole, x, train=True, dispatch="capacity")
  assert np.abs(y_whole - y).max() > 1e-2
  # ... and group_size=B is the same as None.
  full = build(MoEConfig(num_experts=E, top_k=2, capacity_factor=1.0, group_size=B),
               "gated", False, w)
  np.testing.assert_array_equal(run(full, x, train=True, dispatch="capacity")[0], y_whole)
  # Dropless has no groups: the group size changes nothing there.
  np.testing.assert_allclose(run(layer, x, dispatch="dropless")[0],
                             np_dropless(x, w, "gated", 2), rtol=1e-5, atol=1e-5)


def test_group_size_errors(x_rand):
  with pytest.raises(ConfigError, match="group_size"):
    MoEConfig(group_size=0).validate(4)
  layer = build(MoEConfig(num_experts=E, top_k=2, group_size=3), "gated", False,
                make_weights(0, "gated", False))
  with pytest.raises(ValueError, match="group_size"):
    layer(jnp.asarray(x_rand), train=True, dispatch="capacity")


def test_unknown_dispatch_raises(x_rand):
  layer = build(MoEConfig(num_experts=E, top_k=2), "gated", False,
                make_weights(0, "gated", False))
  with pytest.raises(ValueError, match="dispatch"):
    layer(jnp.asarray(x_rand), dispatch="bogus")


# ----------------------------------------------------------------------------- 4. upcycling


@pytest.mark.parametrize("kind,use_bias", [("gated", False), ("plain", True)])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_identical_experts_equal_dense_mlp(x_rand, kind, use_bias, k, dispatch):
  act = "silu" if kind == "gated" else "gelu_new"
  mlp = MLP(D, F, kind=kind, activation_name=act, use_bias=use_bias, rngs=nnx.Rngs(7))
  rng = np.random.default_rng(50)
  # Random (non-zero) dense biases so a lost bias would show.
  for dense in ([mlp.wi_gate, mlp.wi_up, mlp.wo] if kind == "gated" else [mlp.wi, mlp.wo]):
    dense.kernel[...] = jnp.asarray(rng.normal(size=dense.kernel.shape) /
                                    math.sqrt(dense.kernel.shape[0]), jnp.float32)
    if dense.bias is not None:
      dense.bias[...] = jnp.asarray(rng.normal(size=dense.bias.shape) * 0.5, jnp.float32)
  tile = lambda a: np.broadcast_to(np.asarray(a), (E,) + a.shape).copy()
  w = {"router": (rng.normal(size=(D, E)) / math.sqrt(D)).astype(np.float32)}
  if kind == "gated":
    w["wi_gate"], w["wi_up"] = tile(mlp.wi_gate.kernel[...]), tile(mlp.wi_up.kernel[...])
  else:
    w["wi"] = tile(mlp.wi.kernel[...])
    if use_bias:
      w["wi_bias"] = tile(mlp.wi.bias[...])
  w["wo"] = tile(mlp.wo.kernel[...])
  if use_bias:
    w["wo_bias"] = tile(mlp.wo.bias[...])
  cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=8.0, eval_capacity_factor=8.0)
  layer = build(cfg, kind, use_bias, w)
  y, stats = run(layer, x_rand, train=True, dispatch=dispatch)
  dense = np.asarray(mlp(jnp.asarray(x_rand)))
  assert stats["dropped_fraction"] == 0.0
  np.testing.assert_allclose(y, dense, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 5. dropping


def test_dropped_fraction_formula_and_min_capacity():
  x, router = skewed_inputs(60, (4.0, 0.0, 0.0, 0.0), noise=0.5)
  w = make_weights(61, "gated", False)
  w["router"] = router
  _, _, idx, _ = np_route(x.reshape(S, D), router, 1)
  counts = np.bincount(idx[:, 0], minlength=E)
  assert counts[0] > 0.75 * S and counts[0] < S  # skewed, but not entirely

  def expected_drop(capacity):
    return np.maximum(counts - capacity, 0).sum() / (S * 1)

  cap = math.ceil(S / E * 1.0 * 1)  # 12
  layer = build(MoEConfig(num_experts=E, top_k=1, capacity_factor=1.0), "gated", False, w)
  assert layer.cfg.capacity(S, True) == cap
  y, stats = run(layer, x, train=True, dispatch="capacity")
  np.testing.assert_array_equal(stats["tokens_per_expert"], counts)
  np.testing.assert_allclose(stats["dropped_fraction"], expected_drop(cap), rtol=1e-6)
  assert stats["dropped_fraction"] > 0.5
  np.testing.assert_allclose(y, np_capacity(x, w, "gated", 1, cap)[0], rtol=1e-5, atol=1e-5)
  # Exactly the tokens of expert 0 past its first `cap` are zero.
  flat = y.reshape(S, D)
  zero_rows = np.flatnonzero(np.all(flat == 0.0, axis=-1))
  np.testing.assert_array_equal(zero_rows, np.flatnonzero(idx[:, 0] == 0)[cap:])

  # min_capacity floors the capacity: larger than the formula -> used ...
  min_cap = 40
  cfg = MoEConfig(num_experts=E, top_k=1, capacity_factor=1.0, min_capacity=min_cap)
  assert cfg.capacity(S, True) == min_cap and cfg.capacity(S, False) == min_cap
  layer = build(cfg, "gated", False, w)
  y, stats = run(layer, x, train=True, dispatch="capacity")
  np.testing.assert_allclose(stats["dropped_fraction"], expected_drop(min_cap), rtol=1e-6)
  assert 0 < stats["dropped_fraction"] < expected_drop(cap)
  np.testing.assert_allclose(y, np_capacity(x, w, "gated", 1, min_cap)[0], rtol=1e-5, atol=1e-5)
  # ... and smaller than the formula -> ignored.
  cfg = MoEConfig(num_experts=E, top_k=1, capacity_factor=1.0, min_capacity=5)
  assert cfg.capacity(S, True) == cap
  _, stats = run(build(cfg, "gated", False, w), x, train=True, dispatch="capacity")
  np.testing.assert_allclose(stats["dropped_fraction"], expected_drop(cap), rtol=1e-6)


# ----------------------------------------------------------------------------- 6. losses


def test_aux_and_z_loss_hand_computed():
  x_rand, router = skewed_inputs(70, (2.0, 1.0, 0.0, 0.0), noise=0.4)  # unbalanced router
  w = make_weights(70, "gated", False)
  w["router"] = router
  layer = build(MoEConfig(num_experts=E, top_k=2), "gated", False, w)
  _, stats = run(layer, x_rand, dispatch="dropless")
  logits, probs, idx, _ = np_route(x_rand.reshape(S, D), w["router"], 2)
  me = probs.mean(0)
  ce = np.bincount(idx[:, 0], minlength=E) / S
  aux = np.mean(me * ce) * E * E
  assert abs(aux - 1.0) > 0.05  # a case where the value is informative
  np.testing.assert_allclose(stats["aux_loss"], aux, rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(stats["z_loss"], np.mean(lse ** 2), rtol=1e-5)
  # Same losses on the capacity path (measured before dropping).
  _, st_cap = run(layer, x_rand, train=True, dispatch="capacity")
  np.testing.assert_allclose(st_cap["aux_loss"], aux, rtol=1e-5)
  np.testing.assert_allclose(st_cap["z_loss"], np.mean(lse ** 2), rtol=1e-5)


def test_aux_loss_one_for_balanced_router():
  """Tokens c*e_i with router W = a*I: each expert is top-1 for a quarter of the tokens
  and by symmetry the mean probability is uniform, so the aux loss is exactly 1."""
  a, c = 2.0, 1.5
  router = np.zeros((D, E), np.float32)
  router[np.arange(E), np.arange(E)] = a
  x = np.zeros((B, L, D), np.float32)
  kinds = np.arange(S) % E
  x.reshape(S, D)[np.arange(S), kinds] = c
  w = make_weights(71, "gated", False)
  w["router"] = router
  layer = build(MoEConfig(num_experts=E, top_k=1), "gated", False, w)
  _, stats = run(layer, x, dispatch="dropless")
  np.testing.assert_allclose(stats["tokens_per_expert"], np.full(E, S / E))
  np.testing.assert_allclose(stats["aux_loss"], 1.0, rtol=1e-6)
  lse = np.log(np.exp(a * c) + (E - 1))
  np.testing.assert_allclose(stats["z_loss"], lse ** 2, rtol=1e-6)
  # Closed form, unbalanced: 3/4 of the tokens are c*e_0, 1/4 are c*e_1.
  x2 = np.zeros((B, L, D), np.float32)
  hot = np.where(np.arange(S) % 4 == 3, 1, 0)
  x2.reshape(S, D)[np.arange(S), hot] = c
  _, stats = run(layer, x2, dispatch="dropless")
  p_hot = math.exp(a * c) / (math.exp(a * c) + E - 1)
  p_cold = 1.0 / (math.exp(a * c) + E - 1)
  me = np.array([0.75 * p_hot + 0.25 * p_cold, 0.75 * p_cold + 0.25 * p_hot, p_cold, p_cold])
  ce = np.array([0.75, 0.25, 0.0, 0.0])
  np.testing.assert_allclose(stats["aux_loss"], np.mean(me * ce) * E * E, rtol=1e-6)
  assert stats["aux_loss"] > 1.5
  # Zero router: uniform probabilities; top-1 ties all go to expert 0, but since
  # me = 1/E everywhere, aux = sum(ce) * E / E = 1 whatever ce is.
  w["router"] = np.zeros((D, E), np.float32)
  layer = build(MoEConfig(num_experts=E, top_k=1), "gated", False, w)
  _, stats = run(layer, x, dispatch="dropless")
  np.testing.assert_array_equal(stats["tokens_per_expert"], [S, 0, 0, 0])
  np.testing.assert_allclose(stats["aux_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats["z_loss"], np.log(E) ** 2, rtol=1e-6)


# ----------------------------------------------------------------------------- 7. stats


@pytest.mark.parametrize("k", [1, 2])
def test_routing_stats_by_modality(x_rand, modality, k):
  w = make_weights(80 + k, "gated", False)
  layer = build(MoEConfig(num_experts=E, top_k=k), "gated", False, w)
  _, stats = run(layer, x_rand, modality, dispatch="dropless")
  _, _, idx, _ = np_route(x_rand.reshape(S, D), w["router"], k)
  mod = modality.reshape(S)
  assert {PAD, TEXT, IMAGE} <= set(mod.tolist())
  assert stats["tokens_per_expert"].sum() == S * k
  np.testing.assert_array_equal(stats["tokens_per_expert"], np.bincount(idx.ravel(), minlength=E))
  for name, code in (("image", IMAGE), ("text", TEXT)):
    m = mod == code
    np.testing.assert_array_equal(stats[f"tokens_per_expert_{name}"],
                                  np.bincount(idx[m].ravel(), minlength=E))
    np.testing.assert_array_equal(stats[f"top1_per_expert_{name}"],
                                  np.bincount(idx[m, 0], minlength=E))
    assert stats[f"dropped_fraction_{name}"] == 0.0
  # Padding is excluded from both modality counts.
  n_pad = (mod == PAD).sum()
  assert (stats["tokens_per_expert_image"].sum() + stats["tokens_per_expert_text"].sum()
          == (S - n_pad) * k)
  # No modality array: every token counts as text.
  _, st_none = run(layer, x_rand, None, dispatch="dropless")
  np.testing.assert_array_equal(st_none["tokens_per_expert_text"], st_none["tokens_per_expert"])
  np.testing.assert_array_equal(st_none["tokens_per_expert_image"], np.zeros(E))


# ----------------------------------------------------------------------------- 8. gradients


@pytest.mark.parametrize("kind,use_bias", [("gated", False), ("plain", True)])
def test_gradients_dropless_vs_large_capacity(x_rand, kind, use_bias):
  w = make_weights(90, kind, use_bias)
  layer = build(MoEConfig(num_experts=E, top_k=2, capacity_factor=8.0), kind, use_bias, w)
  target = jnp.asarray(np.random.default_rng(91).normal(size=x_rand.shape), jnp.float32)
  xj = jnp.asarray(x_rand)

  def loss_fn(model, dispatch):
    y, stats = model(xj, train=True, dispatch=dispatch)
    return jnp.sum(y * target) + stats["aux_loss"] + stats["z_loss"]

  grad_fn = nnx.jit(nnx.grad(loss_fn), static_argnums=1)
  g_dl = nnx.state(grad_fn(layer, "dropless"), nnx.Param)
  g_cap = nnx.state(grad_fn(layer, "capacity"), nnx.Param)
  flat_dl = dict(jax.tree_util.tree_leaves_with_path(g_dl))
  flat_cap = dict(jax.tree_util.tree_leaves_with_path(g_cap))
  assert flat_dl.keys() == flat_cap.keys()
  names = {jax.tree_util.keystr(p) for p in flat_dl}
  assert any("router" in n for n in names) and any("wo" in n for n in names)
  for path, gd in flat_dl.items():
    gd, gc = np.asarray(gd), np.asarray(flat_cap[path])
    assert np.all(np.isfinite(gd)) and np.all(np.isfinite(gc)), path
    np.testing.assert_allclose(gc, gd, rtol=1e-5, atol=1e-5, err_msg=str(path))
  # Every expert receives tokens here, so every expert's weights get a gradient.
  for path, gd in flat_dl.items():
    if "experts" in jax.tree_util.keystr(path):
      per_expert = np.abs(np.asarray(gd)).reshape(E, -1).sum(-1)
      assert np.all(per_expert > 0), path


def test_dropless_wo_gradient_matches_analytic(x_rand):
  """An independent check of the expert gradient (ragged_dot backward)."""
  w = make_weights(92, "gated", False)
  layer = build(MoEConfig(num_experts=E, top_k=2), "gated", False, w)
  target = np.random.default_rng(93).normal(size=x_rand.shape)
  xj, tj = jnp.asarray(x_rand), jnp.asarray(target, jnp.float32)

  def loss_fn(model):
    return jnp.sum(model(xj, dispatch="dropless")[0] * tj)

  grads = nnx.jit(nnx.grad(loss_fn))(layer)
  g = np.asarray(grads.experts.wo[...])
  # Analytic expectation in float64: d/dwo[e] = sum_s w_{s,e} h_e(x_s)^T target_s.
  tokens = x_rand.reshape(S, D).astype(np.float64)
  _, _, idx, gates = np_route(tokens, w["router"], 2)
  gates = gates / gates.sum(-1, keepdims=True)
  ref = np.zeros_like(w["wo"], np.float64)
  tgt = target.reshape(S, D)
  for s in range(S):
    for j in range(2):
      e = idx[s, j]
      h = _silu(tokens[s] @ w["wi_gate"][e]) * (tokens[s] @ w["wi_up"][e])
      ref[e] += gates[s, j] * np.outer(h, tgt[s])
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 9. config


def test_config_errors():
  with pytest.raises(ConfigError, match="top_k"):
    MoEConfig(top_k=5, num_experts=4).validate(4)
  with pytest.raises(ConfigError, match="top_k"):
    MoEConfig(top_k=0, num_experts=4).validate(4)
  with pytest.raises(ConfigError, match="out of range"):
    MoEConfig(moe_layers_idx=(0, 9)).validate(4)
  with pytest.raises(ConfigError, match="out of range"):
    MoEConfig(moe_layers_idx=(-1, 2)).validate(4)
  with pytest.raises(ConfigError, match="moe_mode"):
    MoEConfig(moe_mode="everywhere").validate(4)  # type: ignore[arg-type]
  with pytest.raises(ConfigError, match="moe_mode"):
    MoEConfig(moe_mode="everywhere").layer_indices(4)  # type: ignore[arg-type]
  with pytest.raises(ConfigError, match="duplicates"):
    MoEConfig(moe_layers_idx=(1, 1)).validate(4)
  with pytest.raises(ConfigError, match="dispatch"):
    MoEConfig(dispatch="sometimes").validate(4)  # type: ignore[arg-type]
  with pytest.raises(ConfigError, match="capacity_factor"):
    MoEConfig(capacity_factor=0.0).validate(4)
  with pytest.raises(ConfigError, match="num_experts"):
    MoEConfig(num_experts=0, top_k=0).validate(4)
  assert issubclass(ConfigError, ValueError)
  MoEConfig().validate(24)  # defaults are valid


def test_config_defaults_follow_moe_llava():
  cfg = MoEConfig()
  assert (cfg.num_experts, cfg.top_k, cfg.moe_mode) == (4, 2, "sparse")
  assert (cfg.capacity_factor, cfg.eval_capacity_factor, cfg.min_capacity) == (1.5, 2.0, 0)
  assert cfg.aux_loss_coef == 0.01 and cfg.renormalize
  # ceil(S / E * factor * k)
  assert cfg.capacity(100, True) == math.ceil(100 / 4 * 1.5 * 2) == 75
  assert cfg.capacity(101, False) == math.ceil(101 / 4 * 2.0 * 2) == 101
  assert MoEConfig(top_k=1).capacity(10, True) == math.ceil(10 / 4 * 1.5) == 4


@pytest.mark.parametrize("mode,n,expected", [
    ("sparse", 24, tuple(range(0, 24, 2))),
    ("sparse", 32, tuple(range(0, 32, 2))),
    ("dense", 24, tuple(range(24))),
    ("dense", 32, tuple(range(32))),
    ("first_half", 24, tuple(range(12))),
    ("first_half", 32, tuple(range(16))),
    ("second_half", 24, tuple(range(12, 24))),
    ("second_half", 32, tuple(range(16, 32))),
])
def test_layer_indices(mode, n, expected):
  got = MoEConfig(moe_mode=mode).layer_indices(n)
  assert got == expected
  if mode == "sparse":
    assert len(got) == n // 2 and got[:3] == (0, 2, 4)  # 24 -> 12 layers, 32 -> 16
  MoEConfig(moe_mode=mode).validate(n)


def test_explicit_layer_list_overrides_mode():
  cfg = MoEConfig(moe_mode="dense", moe_layers_idx=(5, 1, 3))
  assert cfg.layer_indices(8) == (1, 3, 5)
  cfg.validate(8)


def test_expert_intermediate_size_override():
  """Experts may be narrower than the dense FFN (shape check only: the forward pass is
  shape-generic and covered above)."""
  cfg = MoEConfig(num_experts=E, top_k=2, expert_intermediate_size=8)
  for kind in ("gated", "plain"):
    layer = nnx.eval_shape(lambda: MoE(D, F, cfg, kind=kind, activation_name="silu",
                                       use_bias=True, rngs=nnx.Rngs(0)))
    assert layer.experts.wo.shape == (E, 8, D)
    assert layer.router.kernel.shape == (D, E)
    if kind == "plain":
      assert layer.experts.wi.shape == (E, D, 8) and layer.experts.wi_bias.shape == (E, 8)
    else:
      assert layer.experts.wi_gate.shape == layer.experts.wi_up.shape == (E, D, 8)
  dense_size = nnx.eval_shape(lambda: MoE(D, F, MoEConfig(), kind="gated",
                                          activation_name="silu", use_bias=False,
                                          rngs=nnx.Rngs(0)))
  assert dense_size.experts.wo.shape == (E, F, D)


def test_gumbel_second_expert_sampling():
  """DeepSpeed 0.9.5 top-2: top-1 by probability, second sampled with Gumbel noise;
  gates are the noise-free probabilities; evaluation stays deterministic."""
  from moe_vlm.models.moe import gumbel_top2_gating, top_k_gating
  cfg = MoEConfig(num_experts=4, top_k=2, dispatch="dropless", second_expert_noise="gumbel")
  layer = MoE(16, 32, cfg, kind="gated", activation_name="silu", use_bias=False,
              rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 16)), jnp.float32)
  logits = layer.router(x.reshape(-1, 16))
  probs, gates, idx = gumbel_top2_gating(logits, jax.random.key(1))
  _, det_gates, det_idx = top_k_gating(logits, 2)
  np.testing.assert_array_equal(idx[:, 0], det_idx[:, 0])  # top-1 unchanged
  assert np.all(idx[:, 1] != idx[:, 0])
  assert np.any(idx[:, 1] != det_idx[:, 1])  # the noise really moves second choices
  np.testing.assert_allclose(gates, np.take_along_axis(np.asarray(probs), np.asarray(idx), 1))
  # Reproducible for a key; evaluation ignores the noise entirely.
  y1, _ = layer(x, train=True, rng=jax.random.key(1))
  y2, _ = layer(x, train=True, rng=jax.random.key(1))
  np.testing.assert_array_equal(y1, y2)
  y_eval, _ = layer(x, train=False)
  y_det, _ = MoE(16, 32, dataclasses.replace(cfg, second_expert_noise="none"), kind="gated",
                 activation_name="silu", use_bias=False, rngs=nnx.Rngs(0))(x, train=True)
  np.testing.assert_allclose(y_eval, y_det, atol=1e-6)
  with pytest.raises(ValueError, match="needs an rng"):
    layer(x, train=True)
  with pytest.raises(ConfigError, match="top_k=2"):
    MoEConfig(top_k=1, second_expert_noise="gumbel").validate(4)
