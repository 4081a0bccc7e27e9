"""MoE-Tuning end to end on a tiny config: stage hand-off, masks, upcycling, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import synthetic_tiny
from moe_vlm.train import loop
from moe_vlm.train.stages import StageConfigError, trainable_fn
from moe_vlm.train.upcycle import upcycle_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(pretrain_vision=False):
  c = synthetic_tiny.get_config()
  c.model.vision.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
  c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1)
  c.data.update(num_images=60, num_eval_images=12, max_length=128)
  # The tower's pre-training (before stage 1) only where a test asks for it.
  c.vision_pretrain.update(steps=4 if pretrain_vision else 0, batch_size=8, warmup_ratio=0.0)
  for k in (1, 2, 3):
    c.stages[f"stage{k}"].update(steps=4, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
  c.mesh.update(data=2, fsdp=2, expert=2)  # the loop runs sharded over the 8 test devices
  c.checkpoint.update(every_steps=2, async_save=False)
  c.log_every = 1
  c.eval.update(batch_size=8, max_examples=8, max_new_tokens=2)
  return c


def _finals(exp):
  """Every stage's final parameters, as host arrays (read from the saved `final/`s)."""
  return {k: {n: np.asarray(v) for n, v in exp.load_params(k).items()} for k in (1, 2, 3)}


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  c = tiny_config(pretrain_vision=True)
  exp = loop.train(c, workdir)
  return c, workdir, _finals(exp), exp


def test_each_stage_trains_only_its_parameters(three_stages):
  c, workdir, results, exp = three_stages
  init = loop.initial_params(exp, exp.mesh())
  s1, s2, s3 = results[1], results[2], results[3]
  # Stage 1 starts from the pretrained tower, and stages 1-3 leave it bit-identical.
  tower = {n: np.asarray(v) for n, v in exp.load_params(0).items() if n.startswith("vision.")}
  assert tower and all(n.startswith(("vision.", "projector.", "llm.")) for n in init)
  for name, value in tower.items():
    for k in (1, 2, 3):
      np.testing.assert_array_equal(results[k][name], value, err_msg=f"stage {k} {name}")
    np.testing.assert_array_equal(np.asarray(init[name]), value, err_msg=name)
  # Stage 1: projector only.
  for name, value in s1.items():
    changed = not np.array_equal(value, init[name])
    assert changed == name.startswith("projector."), name
  # Stage 2: projector + LLM; the vision tower stays bit-identical.
  for name, value in s2.items():
    changed = not np.array_equal(value, s1[name])
    if name.startswith("vision."):
      assert not changed, name
  assert all(not np.array_equal(s2[n], s1[n]) for n in s2
             if n.startswith("llm.") and n.endswith(".attn.query.kernel"))
  # Stage 3: experts + routers only; every other parameter equals stage 2's.
  for name, value in s3.items():
    if ".mlp.experts." in name or ".mlp.router." in name:
      continue
    assert np.array_equal(value, s2[name]), name
  assert any(".mlp.experts." in n for n in s3)


def test_stage3_experts_start_as_copies_of_the_stage2_ffn(three_stages):
  c, workdir, results, exp = three_stages
  moe = exp.settings.moe
  start = upcycle_params(results[2], exp.dense_config, moe, seed=c.seed, mesh=exp.mesh())
  start = {n: np.asarray(v) for n, v in start.items()}
  moe_layers = moe.layer_indices(c.model.text.num_layers)
  assert moe_layers == (0,)
  for e in range(c.moe.num_experts):
    for ours, dense in (("wi_gate", "wi_gate.kernel"), ("wi_up", "wi_up.kernel"),
                        ("wo", "wo.kernel")):
      np.testing.assert_array_equal(start[f"llm.layers.0.mlp.experts.{ours}"][e],
                                    results[2][f"llm.layers.0.mlp.{dense}"])
  # ...and stage 3 then moved them.
  assert not np.array_equal(results[3]["llm.layers.0.mlp.experts.wo"],
                            start["llm.layers.0.mlp.experts.wo"])


def test_metrics_bad_sample_counts_and_report(three_stages):
  c, workdir, _, _ = three_stages
  for k in (1, 2, 3):
    lines = [json.loads(l) for l in open(os.path.join(workdir, f"stage{k}", "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(l["loss"]) and l["tokens_per_s"] > 0 for l in lines)
    assert os.listdir(os.path.join(workdir, f"stage{k}", "tb"))
    bad = json.load(open(os.path.join(workdir, f"stage{k}", "bad_samples.json")))
    assert bad["samples"] == 32 and bad["bad"] == {}
  stage3 = [json.loads(l) for l in open(os.path.join(workdir, "stage3", "metrics.jsonl"))]
  assert "moe/tokens_per_expert_image/layer0/expert0" in stage3[-1]
  from moe_vlm.eval import report
  md = report.stage_report(c, workdir)
  assert "stage 3 MoE 4x top-2" in md and "POPE" in md
  rep = json.load(open(os.path.join(workdir, "report.json")))
  share = np.asarray(rep["stage3"]["routing"]["top1_per_expert_image"])
  np.testing.assert_allclose(share.sum(-1), 1.0, rtol=1e-6)


def test_killed_run_resumes_with_the_same_losses(tmp_path):
  c = tiny_config()
  c.stages.stage1.steps = 6
  full = str(tmp_path / "full")
  loop.train(c, full, stages=(1,))
  cut = str(tmp_path / "cut")
  # Dies after step 3: the step-2 checkpoint survives, step 3 is lost and redone.
  loop.train(c, cut, stages=(1,), stop_after=3)
  assert not os.path.exists(os.path.join(cut, "stage1", "final"))
  # ...and resumes on a different mesh: Orbax restores onto the new shardings.
  c.mesh.update(data=1, fsdp=4, expert=2)
  loop.train(c, cut, stages=(1,))

  def losses(workdir):
    by_step = {}
    for line in open(os.path.join(workdir, "stage1", "metrics.jsonl")):
      m = json.loads(line)
      by_step[m["step"]] = m["loss"]  # a redone step overwrites the lost one
    return [by_step[s] for s in sorted(by_step)]

  assert len(losses(full)) == 6
  np.testing.assert_allclose(losses(cut), losses(full), rtol=1e-5)
  # metrics.jsonl continues from the restored step: the lost step 3 is not repeated.
  steps = [json.loads(l)["step"] for l in open(os.path.join(cut, "stage1", "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4, 5, 6]
  # A rerun that asks for another length than the stage ran is refused, not relabelled.
  c.stages.stage1.steps = 3
  with pytest.raises(loop.StageSettingsError, match="finished at step 6"):
    loop.train(c, cut, stages=(1,))


def test_a_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
  c = tiny_config()
  c.stages.stage1.steps = 6
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  loop.train(c, full, stages=(1,))
  loop.train(c, cut, stages=(1,), stop_after=5)  # checkpoints at steps 2 and 4
  latest = os.path.join(cut, "stage1", "checkpoints", "4")
  damaged = 0
  for root, _, names in os.walk(os.path.join(latest, "state")):
    for name in names:
      if "/d" in root or name.startswith("manifest"):  # the array data of the state
        open(os.path.join(root, name), "wb").write(b"not a checkpoint")
        damaged += 1
  assert damaged
  c.stages.stage1.steps = 3
  with pytest.raises(loop.StageSettingsError, match="holds step 4 but the stage now has 3"):
    loop.train(c, cut, stages=(1,))
  c.stages.stage1.steps = 6
  with caplog.at_level("WARNING", logger="moe_vlm"):
    loop.train(c, cut, stages=(1,))
  assert any("checkpoints/4 cannot be restored" in r.getMessage() for r in caplog.records)
  assert os.path.isdir(os.path.join(cut, "stage1", "checkpoints", "corrupt-4"))
  full_losses = [json.loads(l)["loss"] for l in open(os.path.join(full, "stage1",
                                                                   "metrics.jsonl"))]
  cut_lines = [json.loads(l) for l in open(os.path.join(cut, "stage1", "metrics.jsonl"))]
  assert [l["step"] for l in cut_lines] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([l["loss"] for l in cut_lines], full_losses, rtol=1e-5)


def _bad_data(root, n=16, bad=5, two_images=1):
  """A LLaVA JSON data set whose first `bad` records name a missing image and whose last
  `two_images` records have two <image> placeholders in one turn."""
  from PIL import Image
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  Image.new("RGB", (32, 32), (200, 30, 30)).save(os.path.join(root, "images", "red.png"))
  records = []
  for i in range(n):
    image = f"images/missing{i}.png" if i < bad else "images/red.png"
    question = "<image>\n<image>\nWhat colour?" if i >= n - two_images else "<image>\nWhat colour?"
    records.append({"id": f"rec{i}", "image": image, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": "red"}]})
  with open(os.path.join(root, "train.json"), "w") as f:
    json.dump(records, f)


def test_a_short_run_with_many_bad_samples_stops_and_names_them(tmp_path):
  from moe_vlm.data import synthetic, tokenizer as tokenizer_lib
  data = str(tmp_path / "data")
  synthetic.generate(data, num_images=8, image_size=32, seed=0)  # for the tokenizer only
  tokenizer_lib.train_tokenizer(synthetic.corpus(data), os.path.join(data, "tokenizer"))
  _bad_data(data, n=17, bad=5, two_images=1)  # 5 of 16 usable records bad: 31%
  c = tiny_config()
  c.data.update(kind="llava_json", dir=data, tokenizer=os.path.join(data, "tokenizer"))
  c.stages.stage1.update(data="train.json", steps=2, batch_size=8)
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.DataQualityError) as e:
    loop.train(c, workdir, stages=(1,))
  assert "missing_image" in str(e.value) and "rec" in str(e.value)
  assert "bad_samples.json" in str(e.value)
  report = json.load(open(os.path.join(workdir, "stage1", "bad_samples.json")))
  named = {r["id"] for r in report["bad_records"]}
  assert named and named <= {f"rec{i}" for i in range(5)}
  assert all(r["reason"] == "missing_image" and "missing" in r["image"]
             for r in report["bad_records"])
  # The record with two placeholders in one turn is counted and named at load time.
  assert report["malformed_at_load"] == {"bad_conversations": 1}
  assert "2 <image> placeholders" in report["malformed_records"][0]["detail"]


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "moe_vlm", "train", "--config",
         os.path.join(ROOT, "configs", "synthetic_tiny.py"), "--workdir", workdir,
         "--stage", "1", "--config.data.num_images=40", "--config.log_every=1",
         "--config.vision_pretrain.steps=0", "--config.data.num_eval_images=4",
         "--config.checkpoint.every_steps=1000", "--config.stages.stage1.steps=100000",
         "--config.stages.stage1.batch_size=4", "--config.model.text.num_layers=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  metrics = os.path.join(workdir, "stage1", "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail(proc.stdout.read().decode()[-3000:])
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == 143, out[-3000:]
  assert "checkpoint saved" in out
  steps = os.listdir(os.path.join(workdir, "stage1", "checkpoints"))
  assert any(s.isdigit() and int(s) >= 1 for s in steps), steps


def test_stage_presets_and_empty_selection():
  names = ["vision.layers.0.mlp.wi.kernel", "projector.linear_1.kernel",
           "llm.layers.0.mlp.experts.wo", "llm.layers.0.mlp.router.kernel",
           "llm.layers.1.mlp.wo.kernel", "llm.layers.1.attn.query.kernel", "llm.embed"]
  pick = lambda preset, extra=(): [n for n in names if trainable_fn(preset, extra)(n)]
  assert pick("projector") == ["projector.linear_1.kernel"]
  assert pick("projector_llm") == names[1:]
  assert pick("moe_layers") == names[2:4]
  assert pick("moe_llava_code") == names[1:5]
  assert pick("projector", ("vision.",)) == ["projector.linear_1.kernel"]  # tower stays frozen
  with pytest.raises(StageConfigError, match="expected one of"):
    trainable_fn("experts_only")


def test_tfds_source_is_accepted_as_stage_data(monkeypatch, tmp_path):
  import tensorflow_datasets as tfds
  calls = {}
  examples = [{"image": b"", "conversations": json.dumps([
      {"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "4"}])}]

  def fake_data_source(name, split, data_dir):
    calls.update(name=name, split=split, data_dir=data_dir)
    return examples

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  c = tiny_config()
  c.data.update(kind="tfds", dir=str(tmp_path))
  source = loop.stage_source(c, "llava_synthetic:validation", str(tmp_path))
  assert calls == {"name": "llava_synthetic", "split": "validation", "data_dir": str(tmp_path)}
  assert len(source) == 1 and source[0]["conversations"][1]["value"] == "4"


@pytest.mark.parametrize("field, value, message", [
    ("top_k", 5, "stage 3: moe.top_k=5: expected 1 <= top_k <= num_experts (4)"),
    ("num_experts", 3, "stage 3: moe.num_experts=3 is not divisible by the expert axis (2)"),
])
def test_a_bad_stage3_setting_stops_the_run_before_stage1(tmp_path, field, value, message):
  c = tiny_config()
  c.moe[field] = value
  with pytest.raises(loop.StageSettingsError) as e:
    loop.train(c, str(tmp_path))
  assert message in str(e.value)
  assert not os.path.exists(tmp_path / "stage1")  # nothing trained, nothing written


def test_a_stage_without_its_predecessor_is_refused_before_training(tmp_path):
  with pytest.raises(loop.StageSettingsError, match="stage 3 starts from stage 2"):
    loop.train(tiny_config(), str(tmp_path), stages=(3,))
