"""Packed rows: several samples per row give what the samples give one per row.

Model side: a packed row's per-sample losses and the gradients equal those of the same
samples run one per row (fp32, 1e-5), with images, MoE experts and the per-sample guides
of the other seed designs (HyperLLaVA's language expert, Awaker's instance-routed LoRA
experts); changing one sample changes no other sample's logits; positions restart per
segment. Data side: the first-fit plan (every sample once, row limits kept), packed
rows laid out as the model expects, each process loading only its rows, and an exact
resume; length buckets.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.data import packing, pipeline
from moe_vlm.models import attention
from moe_vlm.models.config import HyperExpertConfig, LoRAMoEConfig, MoEConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.train import step as step_lib
from tests.tiny import IMAGE_TOKEN, LLAMA, vlm_config

P = 4  # image tokens of the tiny tower (28 px / 14 px patches, CLS dropped)
# (image?, text tokens) of the samples packed into one row.
SAMPLES = [(True, 6), (False, 7), (True, 5)]


def _sample(rng, image, n):
  ids = rng.integers(3, IMAGE_TOKEN, n + 1)
  loss = np.zeros(n + 1, np.int32)
  loss[-(n // 2):] = 1  # the second half is the "answer"
  if image:
    ids = np.concatenate([ids[:1], np.full(P, IMAGE_TOKEN), ids[1:]])
    loss = np.concatenate([loss[:1], np.zeros(P, np.int32), loss[1:]])
  pixels = rng.normal(size=(28, 28, 3)).astype(np.float32) if image else None
  return ids.astype(np.int32), loss, pixels


def _batches(seed=0, length=32):
  """The samples one per row (right-padded) and packed into one row."""
  rng = np.random.default_rng(seed)
  samples = [_sample(rng, im, n) for im, n in SAMPLES]
  lu = max(len(ids) for ids, _, _ in samples)
  b = len(samples)
  rows = dict(input_ids=np.zeros((b, lu), np.int32), attention_mask=np.zeros((b, lu), np.int32),
              loss_mask=np.zeros((b, lu), np.int32),
              pixel_values=np.zeros((b, 28, 28, 3), np.float32))
  packed = dict(input_ids=np.zeros((1, length), np.int32),
                attention_mask=np.zeros((1, length), np.int32),
                loss_mask=np.zeros((1, length), np.int32),
                segment_ids=np.zeros((1, length), np.int32),
                pixel_values=np.zeros((1, 2, 28, 28, 3), np.float32))
  spans, pos, slot = [], 0, 0
  for i, (ids, loss, pixels) in enumerate(samples):
    n = len(ids)
    rows["input_ids"][i, :n], rows["attention_mask"][i, :n] = ids, 1
    rows["loss_mask"][i, :n] = loss
    packed["input_ids"][0, pos:pos + n], packed["attention_mask"][0, pos:pos + n] = ids, 1
    packed["loss_mask"][0, pos:pos + n] = loss
    packed["segment_ids"][0, pos:pos + n] = i + 1
    if pixels is not None:
      rows["pixel_values"][i] = pixels
      packed["pixel_values"][0, slot] = pixels
      slot += 1
    spans.append((pos, n))
    pos += n
  assert pos < length  # some padding at the end of the packed row
  return ({k: jnp.asarray(v) for k, v in rows.items()},
          {k: jnp.asarray(v) for k, v in packed.items()}, spans)


def _perturbed(cfg, seed=1):
  """A VLM whose every parameter is perturbed, so zero-initialised adapter outputs
  (LoRA B, HyperLLaVA's W_u generator) are not zero."""
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(np.asarray(v) + 0.05 * rng.normal(size=v.shape), v.dtype)
            for k, v in codec.flatten(model).items()}
  return codec, params


# No training noise of any kind (router noise, LoRA dropout where the config has it):
# random draws are laid out per row, so they differ between the two layouts.
NO_NOISE = {f.name: 0.0 for f in dataclasses.fields(LoRAMoEConfig)
            if f.name in ("noise_std", "dropout")}

CONFIGS = {
    "moe": lambda impl: vlm_config(dataclasses.replace(LLAMA, num_layers=2,
                                                       attention_impl=impl),
                                   MoEConfig(dispatch="dropless")),
    "guides": lambda impl: vlm_config(dataclasses.replace(
        LLAMA, num_layers=2, attention_impl=impl,
        language_expert=HyperExpertConfig(expert_dim=8, bottleneck=4),
        # top_k = all experts: the router's output is continuous, so float rounding
        # (the two layouts sum in different orders) cannot flip a top-1 choice.
        lora_moe=LoRAMoEConfig(num_experts=3, top_k=3, rank=4, routing="instance",
                               layers=(0, 1), **NO_NOISE))),
}


def _per_sample_ce(logits, batch, spans=None):
  """Next-token CE summed per sample: [samples] (rows, or the spans of a packed row)."""
  targets, w = step_lib.next_token_targets(batch["input_ids"], batch["loss_mask"],
                                           batch.get("segment_ids"))
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  ce = np.asarray(ce * w)
  if spans is None:
    return ce.sum(-1)
  return np.asarray([ce[0, s:s + n].sum() for s, n in spans])


@pytest.mark.parametrize("name,impl", [("moe", "einsum"), ("moe", "blocked"),
                                       ("guides", "blocked")])
def test_packed_row_gives_the_per_sample_losses_and_gradients_of_one_row_each(name, impl):
  cfg = CONFIGS[name](impl)
  codec, params = _perturbed(cfg)
  rows, packed, spans = _batches()

  @jax.jit
  def logits(params, b):
    guide = step_lib.prompt_mask(b["attention_mask"], b["loss_mask"], b.get("segment_ids"))
    return codec.merge(params)(b["input_ids"], b["pixel_values"], b["attention_mask"],
                               segment_ids=b.get("segment_ids"), guide_mask=guide,
                               train=True, rng=jax.random.key(0))[0]

  want = _per_sample_ce(logits(params, rows), rows)
  got = _per_sample_ce(logits(params, packed), packed, spans)
  assert (want > 0).all()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The train step's loss (aux losses off: they average over each batch's tokens,
  # padding included, so they are per batch by definition) and its gradients.
  loss_fn = step_lib.make_loss_fn(codec, step_lib.StepConfig(aux_loss_coef=0.0))
  trainable = {k: v for k, v in params.items() if not k.startswith("vision.")}
  frozen = {k: v for k, v in params.items() if k.startswith("vision.")}

  @jax.jit
  def grads(batch):
    n = jnp.sum(step_lib.next_token_targets(batch["input_ids"], batch["loss_mask"],
                                            batch.get("segment_ids"))[1])
    return jax.grad(loss_fn, has_aux=True)(trainable, frozen, batch, n, jax.random.key(0))

  (g_rows, m_rows), (g_packed, m_packed) = grads(rows), grads(packed)
  assert float(m_rows["targets"]) == float(m_packed["targets"]) > 0
  np.testing.assert_allclose(float(m_packed["ce_sum"]), float(m_rows["ce_sum"]), rtol=1e-5)
  for k in g_rows:
    scale = float(jnp.max(jnp.abs(g_rows[k]))) + 1e-3
    np.testing.assert_allclose(np.asarray(g_packed[k]) / scale, np.asarray(g_rows[k]) / scale,
                               atol=1e-5, err_msg=k)
  if name == "guides":  # the adapters are live: their weights get gradients
    assert any(float(jnp.max(jnp.abs(g_rows[k]))) > 1e-4 for k in g_rows
               if "language_expert.gen_up" in k)
    assert any(float(jnp.max(jnp.abs(g_rows[k]))) > 1e-4 for k in g_rows if "lora_mlp" in k)


def test_changing_one_sample_changes_no_other_sample():
  cfg = CONFIGS["guides"]("blocked")
  codec, params = _perturbed(cfg)
  _, packed, spans = _batches()
  run = jax.jit(lambda p, b: codec.merge(p)(b["input_ids"], b["pixel_values"],
                                            b["attention_mask"],
                                            segment_ids=b["segment_ids"])[0])
  logits = lambda b: np.asarray(run(params, b))
  before = logits(packed)
  for changed in range(len(spans)):
    s, n = spans[changed]
    ids = np.asarray(packed["input_ids"]).copy()
    ids[0, s + n - 1] = (ids[0, s + n - 1] + 1) % (IMAGE_TOKEN - 3) + 3  # its last token
    pixels = np.asarray(packed["pixel_values"]).copy()
    pixels[0, 1] += 1.0  # the image of the third sample
    other = dict(packed, input_ids=jnp.asarray(ids),
                 pixel_values=jnp.asarray(pixels if changed == 2 else packed["pixel_values"]))
    after = logits(other)
    for i, (s2, n2) in enumerate(spans):
      diff = np.abs(after[0, s2:s2 + n2] - before[0, s2:s2 + n2]).max()
      if i == changed:
        assert diff > 1e-4, (changed, i)
      else:
        assert diff == 0.0, (changed, i, diff)


def test_positions_restart_per_segment_and_guides_stay_per_segment():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(attention.positions_from_segments(seg)),
                                [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])
  x = jnp.arange(16, dtype=jnp.float32).reshape(2, 8, 1)
  mean = np.asarray(attention.segment_mean(x, jnp.ones((2, 8)), seg))[..., 0]
  np.testing.assert_allclose(mean[0], [1, 1, 1, 3.5, 3.5, 5, 6.5, 6.5])
  loss = jnp.asarray([[0, 0, 1, 0, 1, 0, 0, 0]] * 2, jnp.int32)
  prompt = step_lib.prompt_mask(jnp.ones((2, 8), jnp.int32), loss, seg)
  np.testing.assert_array_equal(np.asarray(prompt)[0], [1, 1, 0, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(prompt)[1], [1, 1, 0, 0, 0, 0, 0, 0])
  # The last token of a sample predicts nothing: the next one is another sample's.
  _, w = step_lib.next_token_targets(jnp.zeros((1, 8), jnp.int32),
                                     jnp.ones((1, 8), jnp.int32), seg[:1])
  np.testing.assert_array_equal(np.asarray(w)[0], [1, 1, 0, 1, 0, 0, 1, 0])


# ------------------------------------------------------------------------ data side


class CharTokenizer:
  """A character-level stand-in for a HF tokenizer (slow path of the templates)."""
  is_fast = False
  pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [3 + ord(c) % 90 for c in text]}


IMAGE_ID = 120


def _records(n, seed=0, bad_every=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    q = "q" * int(rng.integers(1, 12))
    a = "a" * int(rng.integers(1, 30))
    image = rng.random() < 0.6
    rec = {"id": f"r{i}", "image": np.full((8, 8, 3), i % 255, np.uint8) if image else None,
           "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + q},
                             {"from": "gpt", "value": a}]}
    if bad_every and i % bad_every == bad_every - 1:
      rec = {"id": f"r{i}", "image": None, "conversations": "not a list"}
    out.append(rec)
  return out


def _preprocess(max_length=64):
  cfg = pipeline.PreprocessConfig(template="plain", max_length=max_length,
                                  num_image_tokens=P, image_token_id=IMAGE_ID, image_size=8,
                                  pad_to_square=False)
  return pipeline.Preprocess(CharTokenizer(), cfg)


def test_text_length_is_the_preprocessed_length():
  transform = _preprocess()
  for rec in _records(30, bad_every=7):
    ex = transform(rec)
    n, image = transform.length(rec)
    assert n == int(ex["attention_mask"].sum()) and image == bool(ex["has_image"]), rec["id"]


def test_first_fit_places_every_sample_once_within_the_row_limits():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 40, 500)
  images = (rng.random(500) < 0.5).astype(np.int8)
  cfg = packing.PackingConfig("first_fit", max_length=64, images_per_row=2, max_segments=5,
                              open_rows=8)
  rows = packing.first_fit(rng.permutation(500), lengths, images, cfg)
  assert sorted(np.concatenate(rows).tolist()) == list(range(500))
  assert all(lengths[r].sum() <= 64 and images[r].sum() <= 2 and len(r) <= 5 for r in rows)
  fill = lengths.sum() / (64 * len(rows))
  assert fill > 0.9, fill


def _pipeline(source, plan, rows=None, **kw):
  return pipeline.make_pipeline(source, _preprocess(), batch_size=4, seed=5, rows=rows,
                                plan=plan, read_threads=1, **kw)


def test_packed_rows_hold_their_samples_and_processes_load_their_rows():
  source = _records(60, bad_every=9)
  cfg = packing.PackingConfig("first_fit", max_length=64, images_per_row=3, max_segments=8)
  plan = pipeline.make_plan(source, _preprocess(), cfg, batch_size=4, seed=5, num_epochs=1)
  assert plan.pad_fraction() < 0.15
  batches = list(_pipeline(source, plan))
  assert len(batches) == plan.rows_in_epoch(0) // 4
  b = batches[0]
  assert b["segment_ids"].shape == (4, 64) and b["pixel_values"].shape == (4, 3, 8, 8, 3)
  ids = [x for batch in batches for x in batch["sample_id"].reshape(-1) if x]
  assert len(ids) == len(set(ids))
  for batch in batches:
    for r in range(4):
      seg, mask = batch["segment_ids"][r], batch["attention_mask"][r]
      np.testing.assert_array_equal(mask, seg > 0)
      n_seg = int(seg.max())
      assert n_seg == int(batch["ok"][r].sum())  # one segment per good sample
      starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
      assert not batch["loss_mask"][r][starts].any()  # no target at a segment start
      images = np.sum(batch["input_ids"][r] == IMAGE_ID) // P
      assert images == int(batch["has_image"][r].sum())
  counts = pipeline.summarize_bad({k: np.concatenate([x[k] for x in batches])
                                   for k in ("bad_reason",)})
  assert counts["malformed_conversation"] > 0
  # Two processes of 2 rows each load exactly the rows of the whole batches.
  for rows in ((0, 2), (1, 3)):
    part = list(_pipeline(source, plan, rows=rows))
    for t, batch in enumerate(batches):
      for i, r in enumerate(rows):
        np.testing.assert_array_equal(part[t]["input_ids"][i], batch["input_ids"][r])


def test_packed_pipeline_resumes_exactly_across_epochs():
  source = _records(40)
  cfg = packing.PackingConfig("first_fit", max_length=64, images_per_row=3, max_segments=8)
  plan = pipeline.make_plan(source, _preprocess(), cfg, batch_size=4, seed=5)
  per_epoch = plan.rows_in_epoch(0) // 4
  ds = _pipeline(source, plan)
  it = iter(ds)
  for _ in range(per_epoch - 1):
    next(it)
  state = it.get_state()
  json.dumps(state)
  expected = [next(it) for _ in range(3)]  # crosses into the second epoch
  fresh_plan = pipeline.make_plan(source, _preprocess(), cfg, batch_size=4, seed=5)
  resumed = iter(_pipeline(source, fresh_plan))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  first = [next(iter(ds))]
  assert not np.array_equal(first[0]["input_ids"], expected[0]["input_ids"])


def test_length_buckets_pad_each_batch_to_its_bucket():
  source = _records(64)
  cfg = packing.PackingConfig("length_buckets", max_length=64, num_buckets=4)
  assert cfg.buckets() == (16, 32, 48, 64)
  plan = pipeline.make_plan(source, _preprocess(), cfg, batch_size=4, seed=5, num_epochs=1)
  batches = list(_pipeline(source, plan))
  assert len(batches) == 16
  widths = {b["input_ids"].shape[1] for b in batches}
  assert widths <= set(cfg.buckets()) and len(widths) > 1
  for b in batches:
    n = b["attention_mask"].sum(1)
    assert n.max() <= b["input_ids"].shape[1] and "segment_ids" not in b
  total = sum(b["input_ids"].size for b in batches)
  real = sum(int(b["attention_mask"].sum()) for b in batches)
  assert 1 - real / total < 1 - plan.lengths.sum() / (64 * 64)  # less padding than max_length
