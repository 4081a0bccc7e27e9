"""The vision tower's pre-training (the stand-in for CLIP's) before stage 1: it learns,
is checkpointed like a stage, is reused on a rerun, and is refused beside real towers.
That stages 1-3 keep the tower bit-identical is checked in tests/test_stages.py."""

import json
import os

import numpy as np
import pytest

from configs import synthetic_tiny
from moe_vlm import schema
from moe_vlm.experiment import PRETRAIN, Experiment
from moe_vlm.models.config import ConfigError
from moe_vlm.train import loop, pretrain_vision


def tiny_config(steps=30):
  c = synthetic_tiny.get_config()
  c.model.vision.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
  c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1)
  c.data.update(num_eval_images=4, max_length=64)
  c.vision_pretrain.update(steps=steps, batch_size=16, learning_rate=3e-3, warmup_ratio=0.0)
  c.checkpoint.update(every_steps=10, async_save=False)
  c.log_every = 1
  return c


def _losses(workdir):
  return [json.loads(l)["loss"]
          for l in open(os.path.join(workdir, "vision_pretrain", "metrics.jsonl"))]


def _files(directory):
  return {os.path.join(root, f): os.path.getmtime(os.path.join(root, f))
          for root, _, files in os.walk(directory) for f in files}


def test_pretraining_lowers_its_loss_and_is_reused_on_rerun(tmp_path):
  workdir = str(tmp_path)
  exp = Experiment(tiny_config(), workdir)
  exp.prepare_data()
  mesh = exp.mesh()
  assert pretrain_vision.run(exp, mesh)
  losses = _losses(workdir)
  assert len(losses) == 30 and all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  # Checkpointed like a stage: periodic checkpoints and the final parameters (the whole
  # captioning model; stage 1 takes its tower).
  assert exp.has_final(PRETRAIN)
  assert {"20", "30"} <= set(os.listdir(exp.checkpoint_dir(PRETRAIN)))
  cfg = exp.model_config(PRETRAIN)
  assert cfg.text.num_layers == 1 and cfg.vision == exp.dense_config.vision
  params = exp.load_params(PRETRAIN)
  assert any(n.startswith("llm.") for n in params)
  tower = pretrain_vision.tower(exp, mesh)
  assert tower and sorted(tower) == sorted(n for n in params if n.startswith("vision."))
  for name, value in tower.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(params[name]))
  # A rerun (here through the trainer, as `moe-vlm train` would) reuses it: nothing in
  # vision_pretrain/ is written again, and stage 1 starts from that tower.
  before = _files(exp.stage_dir(PRETRAIN))
  loop.train(tiny_config(), workdir, stages=(1,), stop_after=1)
  assert _files(exp.stage_dir(PRETRAIN)) == before
  # ...also when the LLM changed since (the tower alone is read).
  changed = tiny_config()
  changed.model.text.intermediate_size = 96
  changed_exp = Experiment(changed, workdir)
  assert pretrain_vision.run(changed_exp, mesh)
  for name, value in pretrain_vision.tower(changed_exp, mesh).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(tower[name]))
  assert len(_losses(workdir)) == 30
  start = loop.initial_params(exp, mesh)
  for name, value in tower.items():
    np.testing.assert_array_equal(np.asarray(start[name]), np.asarray(value))


def test_a_killed_pretraining_resumes_with_the_same_losses(tmp_path):
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  c = tiny_config(steps=6)
  c.checkpoint.every_steps = 2
  c.stages.stage1.update(steps=1, batch_size=8)
  loop.train(c, full, stages=(1,))
  # `stop_after` ends the first phase that trains: here the pre-training, after step 3
  # (the step-2 checkpoint survives, step 3 is lost and redone).
  loop.train(c, cut, stages=(1,), stop_after=3)
  assert not os.path.exists(os.path.join(cut, "vision_pretrain", "final"))
  loop.train(c, cut, stages=(1,))
  by_step = {}
  for line in open(os.path.join(cut, "vision_pretrain", "metrics.jsonl")):
    m = json.loads(line)
    by_step[m["step"]] = m["loss"]
  np.testing.assert_allclose([by_step[s] for s in sorted(by_step)], _losses(full), rtol=1e-5)


@pytest.mark.parametrize("field", ["hf_vision", "hf_llava", "ckpt"])
def test_pretraining_is_refused_beside_a_pretrained_tower(field):
  c = tiny_config()
  c.init[field] = "/some/checkpoint"
  with pytest.raises(ConfigError, match="vision_pretrain.steps=30: the vision tower comes "
                     "from /some/checkpoint"):
    schema.parse(c)
  c.vision_pretrain.steps = 0
  assert schema.parse(c).init == schema.InitSettings(**{field: "/some/checkpoint"})


def test_bad_pretraining_settings_stop_the_run_before_it_trains(tmp_path):
  c = tiny_config()
  c.vision_pretrain.data = "stage1.json"
  with pytest.raises(loop.StageSettingsError, match="vision_pretrain.data='stage1.json'"):
    loop.train(c, str(tmp_path))
  c = tiny_config()
  c.vision_pretrain.batch_size = 3  # over 8 devices
  with pytest.raises(loop.StageSettingsError, match="vision_pretrain.batch_size=3"):
    loop.train(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "vision_pretrain")
  c = tiny_config()
  c.vision_pretrain.decoder_layers = 0
  with pytest.raises(ConfigError, match="vision_pretrain.decoder_layers=0"):
    schema.parse(c)
