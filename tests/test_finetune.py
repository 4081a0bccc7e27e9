"""Fine-tuning a converted checkpoint (`init.ckpt`): a released MoE-LLaVA model trains on
the user's data with a stage preset, starting exactly from its weights (MoE layers as
they are, nothing re-initialised or upcycled)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm import checkpoint as ckpt_lib
from moe_vlm import experiment, schema
from moe_vlm.models.config import TextConfig, VisionConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import loop
from moe_vlm.train import step as step_lib
from tests.test_stages import tiny_config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A converted MoE checkpoint (params/, moe_vlm_config.json, tokenizer/) with random
  weights, and the data set to fine-tune it on."""
  root = tmp_path_factory.mktemp("ft")
  c = tiny_config()
  c.data.dir = str(root / "data")
  exp = experiment.Experiment(c, str(root / "base"))
  exp.prepare_data()
  cfg = exp.model_config(3)
  assert cfg.text.moe is not None
  model = VLM(cfg, rngs=nnx.Rngs(7))
  ckpt = root / "ckpt"
  ckpt_lib.save_params(str(ckpt / experiment.CKPT_PARAMS), ParamCodec(model).flatten(model))
  from moe_vlm.convert import export
  export.save_config(cfg, str(ckpt / experiment.CKPT_CONFIG))
  shutil.copytree(exp.tokenizer_dir, ckpt / experiment.CKPT_TOKENIZER)
  return root, str(ckpt), cfg, {n: np.asarray(v) for n, v in ParamCodec(model).flatten(model).items()}


def finetune_config(root, ckpt):
  """The tiny run's settings, its model left to the checkpoint (schema defaults)."""
  c = tiny_config()
  c.model.text = schema.config_dict(TextConfig())
  c.model.vision = schema.config_dict(VisionConfig())
  c.data.dir = str(root / "data")
  c.init.ckpt = ckpt
  c.stages.stage3.update(steps=2, learning_rate=1e-2)
  return c


def test_the_first_step_starts_from_the_checkpoint_and_only_the_preset_moves(
    converted, tmp_path, monkeypatch):
  root, ckpt, cfg, weights = converted
  c = finetune_config(root, ckpt)
  fed = []  # the host batches the loop hands to the train step, key by key
  real = mesh_lib.assemble_batch
  monkeypatch.setattr(mesh_lib, "assemble_batch",
                      lambda local, *a, **kw: fed.append(np.asarray(local)) or real(local, *a,
                                                                                     **kw))
  exp = loop.train(c, str(tmp_path / "run"), stages=(3,))
  assert exp.model_config(3) == cfg  # the checkpoint's architecture, MoE layers included

  # The loss logged at step 1 is the checkpoint's own loss on the first batch.
  inputs = dict(zip(step_lib.MODEL_INPUTS, map(jnp.asarray, fed[:len(step_lib.MODEL_INPUTS)])))
  codec = ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
  step_cfg = loop.step_config(exp.settings.moe, exp.stage(3), exp.stage(3).steps)
  targets = jnp.sum(inputs["loss_mask"][:, 1:].astype(jnp.float32))
  rng = jax.random.fold_in(jax.random.key(exp.settings.seed + 3), 0)
  _, m = jax.jit(step_lib.make_loss_fn(codec, step_cfg))(weights, {}, inputs, targets, rng)
  logged = json.loads(open(os.path.join(exp.stage_dir(3), "metrics.jsonl")).readline())
  assert logged["step"] == 1
  np.testing.assert_allclose(logged["loss"], float(m["ce_sum"] / m["targets"]), rtol=1e-5)

  # Only the stage-3 preset (experts and routers) moved.
  final = {n: np.asarray(v) for n, v in exp.load_params(3).items()}
  moved = {n for n in weights if not np.array_equal(final[n], weights[n])}
  assert moved and all(".mlp.experts." in n or ".mlp.router." in n for n in moved)


def test_architecture_fields_beside_a_converted_checkpoint_are_refused(converted, tmp_path):
  root, ckpt, _, _ = converted
  c = finetune_config(root, ckpt)
  c.model.text.hidden_size = 48  # the checkpoint has 32: the setting would be ignored
  with pytest.raises(experiment.ConfigError, match="model.text.hidden_size"):
    loop.train(c, str(tmp_path / "run"), stages=(3,))
  assert not os.path.exists(tmp_path / "run" / "stage3")


def test_eval_answers_with_a_converted_checkpoint(converted, tmp_path):
  from moe_vlm.eval import tasks
  root, ckpt, _, _ = converted
  data = str(root / "data")
  out = str(tmp_path / "pope")
  results = tasks.evaluate_workdir(None, ckpt=ckpt, task="pope", template="phi",
                                   questions_path=os.path.join(data, "pope.json"),
                                   out_dir=out, image_root=data, max_examples=4,
                                   max_new_tokens=2)
  assert results["num_questions"] == 4 and results["ckpt"] == ckpt
  assert results["model_id"] == "ckpt" and "f1" in results["overall"]
  assert len(open(os.path.join(out, "answers.jsonl")).readlines()) == 4
