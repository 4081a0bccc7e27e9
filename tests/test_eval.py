"""Evaluation: POPE / VQA scoring, answer files, routing analysis, `moe-vlm eval`."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import synthetic_tiny
from moe_vlm.eval import metrics, questions as questions_lib, routing, tasks
from moe_vlm.models.config import MoEConfig
from moe_vlm.models.layers import rope_tables
from moe_vlm.models.llm import causal_mask, positions_from_mask
from moe_vlm.models.moe import IMAGE, PAD, TEXT
from moe_vlm.models.vlm import VLM, splice_image_features
from tests.tiny import IMAGE_TOKEN, LLAMA, vlm_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ POPE


def test_pope_metrics_match_a_hand_computed_confusion_matrix():
  # (free-form answer, label, how POPE reads the answer)
  cases = [
      ("Yes", "yes", "yes"),                          # TP
      ("Yes, there is a cat in the image.", "yes", "yes"),  # TP
      ("There is a cat.", "yes", "yes"),              # TP: no "no"/"not" -> yes
      ("No, there is not.", "yes", "no"),             # FN
      ("no", "yes", "no"),                            # FN
      ("Yes", "no", "yes"),                           # FP
      ("No, there is not.", "no", "no"),              # TN
      ("There is not a dog in the image.", "no", "no"),  # TN: "not"
      ("NO", "no", "no"),                             # TN: read case-insensitively
      ("Yes. But no dog is visible.", "no", "yes"),   # FP: only the first sentence counts
  ]
  preds = [c[0] for c in cases]
  labels = [c[1] for c in cases]
  assert [metrics.yes_no(p) for p in preds] == [c[2] for c in cases]
  tp, fn, fp, tn = 3, 2, 2, 3
  conf = metrics.pope_confusion(preds, labels)
  assert (conf.tp, conf.fp, conf.fn, conf.tn) == (tp, fp, fn, tn)
  precision, recall = tp / (tp + fp), tp / (tp + fn)
  want = {"accuracy": 100 * (tp + tn) / 10, "precision": 100 * precision,
          "recall": 100 * recall, "f1": 100 * 2 * precision * recall / (precision + recall),
          "yes_ratio": 100 * (tp + fp) / 10}
  got = metrics.pope_metrics(preds, labels)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k]), k
  assert got["accuracy"] == pytest.approx(60.0) and got["yes_ratio"] == pytest.approx(50.0)
  # Degenerate: no "yes" predicted -> precision, recall, F1 reported as 0.
  none = metrics.pope_metrics(["No"] * 3, ["yes", "no", "no"])
  assert none["precision"] == none["recall"] == none["f1"] == 0.0
  assert none["accuracy"] == pytest.approx(200 / 3) and none["yes_ratio"] == 0.0
  with pytest.raises(ValueError, match="POPE labels"):
    metrics.pope_metrics(["yes"], ["maybe"])


def test_score_pope_splits_by_category():
  qs = [questions_lib.Question(question_id=i, text="Is there a cat?", label=l, category=c)
        for i, (l, c) in enumerate([("yes", "random"), ("no", "random"), ("yes", "popular"),
                                    ("no", "popular")])]
  out = tasks.score_pope(qs, ["Yes", "Yes", "No", "No"])
  assert out["overall"]["accuracy"] == 50.0 and out["overall"]["n"] == 4
  r, p = out["categories"]["random"], out["categories"]["popular"]
  assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 0, 0) and r["yes_ratio"] == 100.0
  assert (p["tp"], p["fp"], p["fn"], p["tn"]) == (0, 0, 1, 1) and p["accuracy"] == 50.0


# ------------------------------------------------------------------ VQA


@pytest.mark.parametrize("text, want", [
    ("The dog.", "dog"),                   # article and final period
    ("an apple", "apple"),
    ("Two", "2"), ("none", "0"), ("ten cats", "10 cats"),  # number words
    ("Yes!", "yes"), ("yes, it is", "yes it is"),           # mark next to a space: deleted
    ("t-shirt", "t shirt"), ("black/white", "black white"),  # inside a word: a space
    ("1,000", "1000"),                     # 1,000-style number: marks deleted
    ("2.5", "2.5"), ("10.", "10"),         # decimal point kept, final period dropped
    ("dont", "don't"), ("isnt", "isn't"),  # contractions restored
    ("  Red\tand\nBLUE ", "red and blue"),
])
def test_vqa_normalisation(text, want):
  assert metrics.normalize_answer(text) == want


def test_vqa_accuracy_formula():
  refs = ["cat"] * 3 + ["dog"] * 7
  # min(#matches / 3, 1): three matching annotators is full credit.
  assert metrics.vqa_accuracy("Cat.", refs, leave_one_out=False) == 1.0
  assert metrics.vqa_accuracy("a cat", ["cat", "cat"] + ["dog"] * 8,
                              leave_one_out=False) == pytest.approx(2 / 3)
  assert metrics.vqa_accuracy("bird", refs, leave_one_out=False) == 0.0
  # Official: averaged over the 10 subsets of 9 annotators; computed here by brute force.
  def official(pred, refs):
    return np.mean([min(sum(r == pred for r in refs[:i] + refs[i + 1:]) / 3, 1)
                    for i in range(len(refs))])
  for n in range(0, 11):
    refs = ["cat"] * n + ["dog"] * (10 - n)
    assert metrics.vqa_accuracy("cat", refs) == pytest.approx(official("cat", refs)), n
  assert metrics.vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
  assert metrics.vqa_accuracy("Two", ["2"]) == 1.0  # one reference: exact match
  qs = [questions_lib.Question(question_id=0, text="q", answers=("2",), category="count"),
        questions_lib.Question(question_id=1, text="q", answers=("cat",) * 2 + ("dog",) * 8,
                               category="what")]
  out = tasks.score_vqa(qs, ["two", "The cat"], leave_one_out=False)
  assert out["overall"]["accuracy"] == pytest.approx(100 * (1 + 2 / 3) / 2)
  assert out["categories"]["count"]["accuracy"] == 100.0


# ------------------------------------------------------------------ files


def test_question_files_and_answer_layout(tmp_path):
  jsonl = tmp_path / "pope.jsonl"
  jsonl.write_text(
      json.dumps({"question_id": 7, "image": "a.jpg", "text": "Is there a dog in the image?",
                  "label": "no", "category": "adversarial"}) + "\n\n" +
      json.dumps({"question_id": "v1", "image": "b.jpg", "text": "<image>\nWhat colour?",
                  "answers": [{"answer": "red"}, "red", "blue"]}) + "\n")
  synthetic = tmp_path / "pope.json"
  synthetic.write_text(json.dumps([{
      "id": "pope-0-random-0", "image": "images/00000.png", "question": "Is there a red circle?",
      "label": "yes", "category": "random", "conversations": [
          {"from": "human", "value": "<image>\nIs there a red circle?\nAnswer with a single word."},
          {"from": "gpt", "value": "yes"}]}]))
  a, b = questions_lib.load_questions(str(jsonl))
  assert a == questions_lib.Question(question_id=7, text="Is there a dog in the image?",
                                     image="a.jpg", label="no", category="adversarial")
  assert b.text == "What colour?" and b.answers == ("red", "red", "blue") and b.label is None
  (s,) = questions_lib.load_questions(str(synthetic))
  assert s.question_id == "pope-0-random-0" and s.label == "yes" and s.category == "random"
  assert s.text == "Is there a red circle?\nAnswer with a single word."
  assert len(questions_lib.load_questions(str(jsonl), limit=1)) == 1
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question_id": 1, "text": "q"}\nnot json\n')
  with pytest.raises(questions_lib.QuestionFileError, match="bad.jsonl:2"):
    questions_lib.load_questions(str(bad))

  records = questions_lib.answer_records([a, b], ["No, there is not.", "red"], "run/stage3")
  out = tmp_path / "answers.jsonl"
  questions_lib.write_jsonl(str(out), records)
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [list(l) for l in lines] == [
      ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]] * 2
  assert lines[0]["question_id"] == 7 and lines[0]["prompt"] == "Is there a dog in the image?"
  assert lines[0]["text"] == "No, there is not." and lines[0]["metadata"] == {}
  assert lines[0]["answer_id"] != lines[1]["answer_id"]
  # eval_pope.py reads exactly this file: question_id -> text.
  assert metrics.pope_metrics([l["text"] for l in lines[:1]], ["no"])["accuracy"] == 100.0


# ------------------------------------------------------------------ routing


@pytest.fixture(scope="module")
def moe_model():
  """Tiny MoE VLM with random weights, built from its abstract shapes: initialising it op
  by op costs ~10x more on CPU."""
  cfg = vlm_config(LLAMA, MoEConfig(num_experts=4, top_k=2, dispatch="dropless"))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(3)

  def init(path, x):
    if len(x.shape) == 1:  # norm scales 1, biases 0
      return jnp.full(x.shape, "scale" in jax.tree_util.keystr(path), x.dtype)
    return jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def _routing_batch(model, seed=0):
  """Rows: image at 2, image at 5 after left padding, text-only, and a copy of row 0
  (the shape filler of a last batch). One shape throughout: one compilation."""
  p = model.cfg.num_image_tokens
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, IMAGE_TOKEN, size=(4, 16)).astype(np.int32)
  ids[0, 2:2 + p] = IMAGE_TOKEN
  ids[1, 5:5 + p] = IMAGE_TOKEN
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  pixels = rng.normal(size=(4, 28, 28, 3)).astype(np.float32)
  ids[3], pixels[3] = ids[0], pixels[0]
  return ids, pixels, mask


@nnx.jit
def _moe_inputs(model, ids, pixels, mask):
  """The input of every MoE layer, from running the decoder blocks by hand, and the
  routing statistics the MoE layers themselves report."""
  llm, cfg = model.llm, model.llm.cfg
  is_image = ids == IMAGE_TOKEN
  x = splice_image_features(llm.embed_tokens(ids), model.image_features(pixels), is_image)
  modality = jnp.where(mask == 1, jnp.where(is_image, IMAGE, TEXT), PAD)
  causal = causal_mask(mask)
  rope = rope_tables(positions_from_mask(mask), cfg.rotary_dim, cfg.rope_theta)
  inputs, stats = [], []
  for block in llm.layers:
    if block.is_moe:  # sequential residual (Llama): the FFN reads post_attn_norm(x + attn)
      inputs.append(block.post_attn_norm(x + block.attn(block.input_norm(x), causal, rope)))
    x, layer_stats = block(x, causal, rope, modality, dispatch="dropless")
    if layer_stats is not None:
      stats.append(layer_stats)
  return inputs, stats


def _numpy_router_choices(model, ids, pixels, mask):
  """Each MoE layer's top-k: the routing matmul and the sort done in numpy."""
  inputs, _ = _moe_inputs(model, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
  choices = []
  for x, block in zip(inputs, [b for b in model.llm.layers if b.is_moe]):
    logits = np.asarray(x, np.float64) @ np.asarray(block.mlp.router.kernel[...], np.float64)
    choices.append(np.argsort(-logits, axis=-1)[..., :model.cfg.text.moe.top_k])
  return np.stack(choices)  # [n_moe, B, L, k]


def test_routing_counts_equal_numpy_top1_from_router_logits(moe_model):
  ids, pixels, mask = _routing_batch(moe_model)
  want = _numpy_router_choices(moe_model, ids, pixels, mask)
  logits, idx = routing.router_choices(moe_model, ids, pixels, mask)
  assert logits.shape == (2, 4, 16, 4) and idx.shape == (2, 4, 16, 2)
  np.testing.assert_array_equal(idx[:, mask == 1], want[:, mask == 1])

  counter = routing.RoutingCounter(moe_model, image_token_id=IMAGE_TOKEN, num_examples=3)
  counter.add(ids, pixels, mask, rows=3)  # the filler row must not count
  stats = counter.stats
  assert stats.layers == (0, 2) and stats.num_experts == 4 and stats.top_k == 2
  p = moe_model.cfg.num_image_tokens
  valid = mask.astype(bool)
  valid[3] = False
  modality = np.where(ids == IMAGE_TOKEN, 0, 1)
  for m, name in ((0, "image"), (1, "text")):
    sel = valid & (modality == m)
    for layer in range(2):
      np.testing.assert_array_equal(stats.top1[layer, m],
                                    np.bincount(want[layer][sel][:, 0], minlength=4))
      np.testing.assert_array_equal(stats.topk[layer, m],
                                    np.bincount(want[layer][sel].ravel(), minlength=4))
    assert stats.tokens[name] == sel.sum()
  assert stats.tokens["image"] == 2 * p
  shares = stats.shares()
  for kind in ("top1", "topk"):
    for name in ("image", "text"):
      assert shares[kind][name].shape == (2, 4)
      np.testing.assert_allclose(shares[kind][name].sum(-1), 1.0)
  # ...and they are the statistics the MoE layers themselves report (aux).
  _, moe_stats = _moe_inputs(moe_model, jnp.asarray(ids), jnp.asarray(pixels),
                             jnp.asarray(np.where(valid, mask, 0)))
  for layer, st in enumerate(moe_stats):
    np.testing.assert_array_equal(stats.top1[layer, 0], st["top1_per_expert_image"])
    np.testing.assert_array_equal(stats.top1[layer, 1], st["top1_per_expert_text"])
    np.testing.assert_array_equal(stats.topk[layer, 0], st["tokens_per_expert_image"])
    np.testing.assert_array_equal(stats.topk[layer, 1], st["tokens_per_expert_text"])
  # Token paths: the top-1 expert of that token in every MoE layer.
  assert {e["modality"] for e in stats.examples} == {"image", "text"}
  for e in stats.examples:
    row = e["sample"]
    pos = e["position"] + int(np.argmax(mask[row]))
    assert e["path"] == [int(want[layer, row, pos, 0]) for layer in range(2)]
  common = stats.common_paths()
  assert sum(c["share"] for c in common["image"]) <= 1.0 + 1e-9
  # Rescaled image part of each expert's load: image share / (image + text share).
  frac = routing.image_fraction(shares["top1"])
  s_img, s_txt = shares["top1"]["image"], shares["top1"]["text"]
  ok = (s_img + s_txt) > 0
  np.testing.assert_allclose(frac[ok], (s_img / (s_img + s_txt))[ok])


def test_hand_set_router_sends_image_and_text_to_known_experts(moe_model):
  """A router that reads one hidden unit: its sign decides the expert, so the shares
  are known exactly from the MoE inputs."""
  model = nnx.clone(moe_model)
  ids, pixels, mask = _routing_batch(model, seed=1)
  kernel = np.zeros((32, 4), np.float32)
  kernel[0] = [100.0, -100.0, 0.0, 0.0]  # hidden unit 0 > 0 -> expert 0, < 0 -> expert 1
  kernel[1] = [0.0, 0.0, 0.01, 0.0]  # a small logit for expert 2: never first
  for block in model.llm.layers:
    if block.is_moe:
      block.mlp.router.kernel[...] = jnp.asarray(kernel)
  want = _numpy_router_choices(model, ids, pixels, mask)
  assert set(np.unique(want[..., 0])) <= {0, 1}
  counter = routing.RoutingCounter(model, image_token_id=IMAGE_TOKEN)
  counter.add(ids, pixels, mask)
  top1 = counter.stats.top1
  assert top1[..., 2:].sum() == 0  # never a first choice
  valid = mask.astype(bool)
  for m, code in ((0, True), (1, False)):
    sel = valid & ((ids == IMAGE_TOKEN) == code)
    np.testing.assert_array_equal(top1[:, m, 0], (want[:, sel, 0] == 0).sum(-1))


def test_routing_outputs_and_plots(moe_model, tmp_path):
  ids, pixels, mask = _routing_batch(moe_model)
  counter = routing.RoutingCounter(moe_model, image_token_id=IMAGE_TOKEN)
  counter.add(ids, pixels, mask)
  files = routing.write(counter.stats, str(tmp_path))
  data = json.load(open(files["json"]))
  assert data["moe_layers"] == [0, 2] and len(data["top1_share"]["image"]) == 2
  np.testing.assert_allclose(np.sum(data["topk_share"]["text"], -1), 1.0)
  md = open(files["markdown"]).read()
  assert "| MoE layer | e0 img" in md and "Most common top-1 paths" in md
  for name in ("routing_image_text.png", "routing_top1_heatmap.png",
               "routing_modality_mix.png", "routing_paths.png"):
    path = tmp_path / name
    assert os.path.getsize(path) > 5000, name
    with Image.open(path) as im:
      im.verify()
    with Image.open(path) as im:
      assert im.format == "PNG" and min(im.size) >= 200, (name, im.size)
  # stage_report's input (aux shares, no paths) draws the same figures.
  shares = counter.stats.shares()
  report_routing = {f"{key}_per_expert_{m}": shares[kind][m].tolist() for m in ("image", "text")
                    for kind, key in (("top1", "top1"), ("topk", "tokens"))}
  out = routing.write_plots(routing.shares_from_report(report_routing), (0, 2),
                            str(tmp_path / "r"))
  assert set(out) == {"image_text", "top1_heatmap", "modality_mix"}


def test_dense_model_has_no_routing():
  dense = nnx.eval_shape(lambda: VLM(vlm_config(LLAMA), rngs=nnx.Rngs(0)))
  with pytest.raises(routing.NoMoEError, match="stage-3"):
    routing.RoutingCounter(dense, image_token_id=IMAGE_TOKEN)


# ------------------------------------------------------------------ end to end


def _tiny_config():
  c = synthetic_tiny.get_config()
  c.model.vision.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
  c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1)
  c.data.update(num_images=16, num_eval_images=8, max_length=96)
  c.vision_pretrain.steps = 0  # tests/test_stages.py runs the tower's pre-training
  for k in (1, 2, 3):
    c.stages[f"stage{k}"].update(steps=1, batch_size=8, warmup_ratio=0.0)
  c.checkpoint.update(every_steps=100, async_save=False)
  c.eval.update(batch_size=4, max_examples=4, max_new_tokens=2)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir after one training step per stage, and question files in both layouts."""
  from moe_vlm.train import loop
  workdir = str(tmp_path_factory.mktemp("evalrun"))
  c = _tiny_config()
  loop.train(c, workdir)
  data = os.path.join(workdir, "data")
  pope = json.load(open(os.path.join(data, "pope.json")))
  pope = [r for r in pope if r["label"] == "yes"][:3] + [r for r in pope if r["label"] == "no"][:3]
  # LLaVA's POPE layout: int ids, the question text (+ answer instruction), label, category.
  with open(os.path.join(workdir, "pope.jsonl"), "w") as f:
    for i, r in enumerate(pope):
      f.write(json.dumps({"question_id": i, "image": r["image"],
                          "text": r["conversations"][0]["value"].replace("<image>\n", ""),
                          "label": r["label"], "category": r["category"]}) + "\n")
  qa = json.load(open(os.path.join(data, "eval.json")))[:5]
  with open(os.path.join(workdir, "vqa.jsonl"), "w") as f:
    for i, r in enumerate(qa):
      f.write(json.dumps({"question_id": f"v{i}", "image": r["image"], "text": r["question"],
                          "answers": [r["answer"]] * 3 + ["zzz"] * 7,
                          "category": r["type"]}) + "\n")
  return c, workdir


_TINY_OVERRIDES = (
    "model.vision.hidden_size=32", "model.vision.intermediate_size=64",
    "model.vision.num_layers=1", "model.vision.num_heads=2", "model.text.hidden_size=32",
    "model.text.intermediate_size=64", "model.text.num_layers=2", "model.text.num_heads=2",
    "model.text.num_kv_heads=1", "data.num_images=16")


def test_eval_command_pope_with_routing(trained):
  _, workdir = trained
  out = os.path.join(workdir, "pope_out")
  cmd = [sys.executable, "-m", "moe_vlm", "eval", "--workdir", workdir,
         "--config", os.path.join(ROOT, "configs", "synthetic_tiny.py"),
         *[f"--config.{o}" for o in _TINY_OVERRIDES],
         "--task", "pope", "--questions", os.path.join(workdir, "pope.jsonl"), "--out", out,
         "--routing", "--noplots",  # the figures are checked above, without a subprocess
         "--batch_size", "4"]  # 6 questions: the last batch is filled up
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in open(os.path.join(out, "answers.jsonl"))]
  assert [l["question_id"] for l in lines] == list(range(6))
  for l in lines:
    assert list(l) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert l["model_id"] == os.path.basename(workdir) + "/stage3"
  results = json.load(open(os.path.join(out, "results.json")))
  labels = [json.loads(l)["label"] for l in open(os.path.join(workdir, "pope.jsonl"))]
  want = metrics.pope_metrics([l["text"] for l in lines], labels)
  for k, v in want.items():
    assert results["overall"][k] == pytest.approx(v)
  assert results["overall"]["n"] == 6 and results["stage"] == 3
  assert set(results["categories"]) <= {"random", "popular", "adversarial"}
  md = open(os.path.join(out, "results.md")).read()
  assert "| all | 6 |" in md and "yes-ratio" in md and "### Routing" in md
  assert "| all | 6 |" in proc.stdout
  r = json.load(open(os.path.join(out, "routing.json")))
  # Routed: every prompt plus its answer; the image tokens are exactly 6 images' worth.
  assert r["tokens"]["image"] == 6 * (32 // 8) ** 2 and r["tokens"]["text"] > 0
  for kind in ("top1_share", "topk_share"):
    for m in ("image", "text"):
      np.testing.assert_allclose(np.sum(r[kind][m], -1), 1.0)
  assert len(r["token_paths"]) == 8 and not any(f.endswith(".png") for f in os.listdir(out))


def test_eval_vqa_on_a_workdir(trained):
  """`moe-vlm eval --task vqa` minus the flag parsing (the test above covers that)."""
  _, workdir = trained
  out = os.path.join(workdir, "vqa_out")
  questions = os.path.join(workdir, "vqa.jsonl")
  results = tasks.evaluate_workdir(workdir, task="vqa", questions_path=questions,
                                   out_dir=out, stage=2, leave_one_out=False,
                                   max_new_tokens=3)  # config: the workdir's config.json
  lines = [json.loads(l) for l in open(os.path.join(out, "answers.jsonl"))]
  qs = [json.loads(l) for l in open(questions)]
  assert [l["question_id"] for l in lines] == [q["question_id"] for q in qs]
  assert all(l["model_id"] == os.path.basename(workdir) + "/stage2" for l in lines)
  want = np.mean([metrics.vqa_accuracy(l["text"], q["answers"], leave_one_out=False)
                  for l, q in zip(lines, qs)])
  assert results["overall"]["accuracy"] == pytest.approx(100 * want)
  assert json.load(open(os.path.join(out, "results.json")))["overall"] == results["overall"]
  assert results["metric"] == "min(#matches/3, 1)" and results["stage"] == 2
  assert set(results["categories"]) == {q["category"] for q in qs}
  assert "| all | 5 |" in open(os.path.join(out, "results.md")).read()
  assert not os.path.exists(os.path.join(out, "routing.json"))
  # The filled output directory is a user's now: a second run needs overwrite=True.
  from moe_vlm.files import OutputExistsError
  with pytest.raises(OutputExistsError, match="--overwrite"):
    tasks.evaluate_workdir(workdir, task="vqa", questions_path=questions, out_dir=out)
  tasks.evaluate_workdir(workdir, task="vqa", questions_path=questions, out_dir=out,
                         stage=2, max_new_tokens=3, overwrite=True)


def test_routing_task_on_the_synthetic_list_format(trained):
  """--task routing needs no labels; the synthetic pope.json (a JSON list) is read as is."""
  _, workdir = trained
  out = os.path.join(workdir, "routing_out")
  results = tasks.evaluate_workdir(
      workdir, task="routing", questions_path=os.path.join(workdir, "data", "pope.json"),
      out_dir=out, max_examples=3, path_tokens=2)
  assert results["num_questions"] == 3 and "overall" not in results
  assert len(open(os.path.join(out, "answers.jsonl")).readlines()) == 3
  r = json.load(open(os.path.join(out, "routing.json")))
  assert r["tokens"]["image"] == 3 * 16 and len(r["token_paths"]) == 4
  assert open(os.path.join(out, "results.md")).read().startswith("### Routing")
  for name in ("routing_image_text.png", "routing_top1_heatmap.png", "routing_paths.png"):
    with Image.open(os.path.join(out, name)) as im:
      assert im.format == "PNG" and min(im.size) >= 200


def test_stage_report_writes_routing_plots(trained, monkeypatch):
  c, workdir = trained
  from moe_vlm.eval import report
  # evaluate() itself runs in test_stages; here only what stage_report does with it.
  share = [[0.4, 0.3, 0.2, 0.1]]
  fake = {"accuracy": 50.0, "accuracy_by_type": {"count": 50.0}, "examples": [],
          "pope": {"all": metrics.pope_metrics(["yes", "no"], ["yes", "yes"]),
                   "random": metrics.pope_metrics(["yes", "no"], ["yes", "yes"])}}
  moe = dict(fake, routing={f"{k}_per_expert_{m}": share for k in ("top1", "tokens")
                            for m in ("image", "text")})
  monkeypatch.setattr(report, "evaluate",
                      lambda model, cfg, *a: moe if cfg.text.moe is not None else fake)
  md = report.stage_report(c, workdir)
  assert "stage 3 MoE 4x top-2" in md and "| 0 | 0.40 |" in md
  for name in ("routing_image_text.png", "routing_top1_heatmap.png", "routing_modality_mix.png"):
    with Image.open(os.path.join(workdir, name)) as im:
      assert im.format == "PNG" and min(im.size) >= 200
  os.remove(os.path.join(workdir, "routing_image_text.png"))
  report.stage_report(c, workdir, routing_plots=False)
  assert not os.path.exists(os.path.join(workdir, "routing_image_text.png"))


def test_a_paper_benchmark_through_eval_score_file_and_the_paper_row(trained, tmp_path):
  """ScienceQA from its released problems.json: answered by a workdir's stage, written
  in LLaVA's submission layout, scored; the same answers scored again as a file made
  elsewhere; the paper's row assembled from the results folder."""
  from tests.test_benchmarks import SQA_PROBLEMS
  _, workdir = trained
  images = tmp_path / "images"
  problems = {k: v for k, v in SQA_PROBLEMS.items() if k in ("1", "2", "3")}
  for pid, p in problems.items():
    if p["image"]:
      (images / pid).mkdir(parents=True)
      Image.new("RGB", (40, 30), (200, 40, 40)).save(images / pid / p["image"])
  path = str(tmp_path / "problems.json")
  with open(path, "w") as f:
    json.dump(problems, f)
  root = tmp_path / "results"
  out = str(root / "sqa")
  results = tasks.evaluate_workdir(workdir, task="sqa", questions_path=path, out_dir=out,
                                   image_root=str(images), max_new_tokens=2)
  assert results["num_questions"] == 3 and results["headline_metric"]
  assert results["headline"] == pytest.approx(results["img"]["accuracy"])
  assert all(os.path.exists(p) for p in results["submission"])
  assert open(os.path.join(out, "results.md")).read().startswith("## SQA-IMG")
  # The answers file it wrote, scored as if it came from elsewhere: the same numbers.
  again = tasks.score_file("sqa", path, os.path.join(out, "answers.jsonl"),
                           str(tmp_path / "rescored"))
  assert again["headline"] == pytest.approx(results["headline"])
  assert again["missing_answers"] == 0
  md = tasks.paper_row(str(root), "tiny")
  assert "SQA-IMG" in md.splitlines()[0]
  ours = md.strip().splitlines()[-1]
  assert ours.startswith("| tiny |") and f"{results['headline']:.1f}" in ours
  assert "MoE-LLaVA-2.7B" in md and os.path.exists(root / "paper_row.md")
  with pytest.raises(ValueError, match="paper benchmarks"):
    tasks.score_file("vqa", path, os.path.join(out, "answers.jsonl"), str(tmp_path / "x"))
