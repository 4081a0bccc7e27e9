"""The LM head run only on the target positions: same loss and gradients as the full head."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from moe_vlm.train import step as step_lib
from tests.test_train_step import STEP, _batch, _run, _setup

B, L, D, V = 4, 24, 8, 11


def _inputs(seed, counts):
  """Hidden states, ids, and a loss mask with `counts[r]` targets in row r (at random
  positions, never position 0: a target is the NEXT token)."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, L, D)).astype(np.float32)
  ids = rng.integers(0, V, (B, L)).astype(np.int32)
  mask = np.zeros((B, L), np.int32)
  for r, c in enumerate(counts):
    mask[r, rng.choice(np.arange(1, L), c, replace=False)] = 1
  w = rng.normal(size=(D, V)).astype(np.float32)
  return jnp.asarray(hidden), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(w)


def _numpy_loss(hidden, ids, mask, w):
  logits = np.tanh(np.asarray(hidden, np.float64)) @ np.asarray(w, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                          keepdims=True)) \
      - logits.max(-1, keepdims=True)
  total = 0.0
  for b in range(B):
    for t in range(L - 1):
      if mask[b, t + 1]:
        total -= logp[b, t, ids[b, t + 1]]
  return total, float(np.asarray(mask)[:, 1:].sum())


@pytest.mark.parametrize("counts,capacity,full", [
    ((3, 8, 0, 5), 8, 0.0),     # every row fits: the compact head
    ((3, 9, 0, 5), 8, 1.0),     # one row over: the full head
    ((3, 9, 0, 5), None, 1.0),  # no capacity: the full head
])
def test_answer_loss_matches_numpy_and_full_head_gradients(counts, capacity, full):
  hidden, ids, mask, w = _inputs(0, counts)
  head = lambda h, w: jnp.tanh(h) @ w  # per-token, like the norm + LM head

  def loss(h, w, cap):
    ce, n, head_full = step_lib.answer_loss(lambda p, x: head(x, p), w, h, ids, mask, cap)
    return ce, (n, head_full)

  (ce, (n, head_full)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      hidden, w, capacity)
  ref_ce, ref_n = _numpy_loss(hidden, ids, mask, w)
  np.testing.assert_allclose(float(ce), ref_ce, rtol=1e-5)
  assert float(n) == ref_n and float(head_full) == full
  # Gradients match the full head's (token_loss on every position's logits).
  full_grads = jax.grad(lambda h, w: step_lib.token_loss(head(h, w), ids, mask)[0],
                        argnums=(0, 1))(hidden, w)
  for g, ref in zip(grads, full_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-6)
  # Positions without a target get no gradient at all.
  no_target = np.concatenate([np.asarray(mask)[:, 1:], np.zeros((B, 1))], axis=1) == 0
  assert np.all(np.asarray(grads[0])[no_target] == 0)


def test_target_positions_lists_each_rows_targets_then_the_last_position():
  w = jnp.asarray([[0, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]], jnp.float32)
  idx, fits = step_lib.target_positions(w, 3)
  np.testing.assert_array_equal(np.asarray(idx), [[1, 3, 5], [0, 1, 2]])
  assert bool(fits)
  _, fits = step_lib.target_positions(w, 2)
  assert not bool(fits)


def test_head_capacity_rounds_up_to_8_and_checks_the_fraction():
  assert step_lib.StepConfig(head_fraction=0.625).head_capacity(256) == 160
  assert step_lib.StepConfig(head_fraction=0.3).head_capacity(100) == 32
  assert step_lib.StepConfig(head_fraction=0.99).head_capacity(100) is None  # 104 >= 100
  assert step_lib.StepConfig().head_capacity(256) is None
  with pytest.raises(ValueError, match="head_fraction=1.5"):
    step_lib.StepConfig(head_fraction=1.5).head_capacity(256)


def test_sharded_step_with_compact_head_matches_the_full_head():
  cfg, codec, params = _setup("dropless")
  batch = _batch(cfg)  # 16 positions; keep at most 8 targets per row, some at the end
  loss_mask = np.asarray(batch["loss_mask"]).copy()
  loss_mask[:, :8] = 0
  loss_mask[0, 8:] = 1
  batch["loss_mask"] = jnp.asarray(loss_mask * np.asarray(batch["attention_mask"]))
  ref_state, ref = _run(codec, params, batch, (1, 1, 1, 1))
  compact = step_lib.StepConfig(optim=STEP.optim, head_fraction=0.5)  # 8 positions a row
  state, m = _run(codec, params, batch, (2, 2, 2, 1), cfg=compact)
  assert m["head_full"] == 0.0 and ref["head_full"] == 1.0
  np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-6)
  for k in ref_state.params:
    np.testing.assert_allclose(state.params[k], ref_state.params[k], atol=1e-5, err_msg=k)


def test_compact_head_keeps_no_full_size_logits_for_the_backward():
  """Differentiating a plain lax.cond would make the compact branch write the full
  branch's [B, L, V] residuals (zeros); the gradient-in-forward cond outputs only the
  loss and the gradients."""
  hidden, ids, mask, w = _inputs(1, (3, 5, 0, 2))
  head = lambda p, h: jnp.tanh(h) @ p
  grad = jax.grad(lambda h, p: step_lib.answer_loss(head, p, h, ids, mask, 8)[0],
                  argnums=(0, 1))
  jaxpr = jax.make_jaxpr(grad)(hidden, w)
  conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
  conds += [e for e in _subjaxpr_eqns(jaxpr.jaxpr) if e.primitive.name == "cond"]
  assert conds
  for eqn in conds:
    shapes = {tuple(v.aval.shape) for v in eqn.outvars}
    assert shapes <= {(), (B, L, D), (D, V)}, shapes


def _subjaxpr_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from sub.eqns
      yield from _subjaxpr_eqns(sub)
