"""A three-stage run on a CPU "pod" whose FSDP or expert axis spans hosts.

Two processes x 2 simulated devices on localhost run the real CLI, as a TPU slice's
workers would (`moe-vlm train` through all stages, the report, `eval`, `generate`,
`convert to-hf`), in three layouts where an axis that splits the weights crosses the
processes: (a) fsdp=4, (b) 4 experts on expert=4, (c) data=2 x fsdp=2 with the FSDP
axis across the processes (`mesh.dcn.fsdp=2`). Every layout ends with the same stage-3
parameters as one process with 4 devices; a run killed in stage 2 (SIGKILL on both
processes) resumes with the same later losses; only process 0 writes files.
"""

import json
import os

import numpy as np
import pytest

from tests import multihost

pytestmark = pytest.mark.slow

TINY = {
    "model.vision.hidden_size": 32, "model.vision.intermediate_size": 64,
    "model.vision.num_layers": 1, "model.vision.num_heads": 2,
    "model.text.hidden_size": 32, "model.text.intermediate_size": 64,
    "model.text.num_layers": 2, "model.text.num_heads": 2, "model.text.num_kv_heads": 1,
    "data.num_images": 40, "data.max_length": 64, "vision_pretrain.steps": 0,
    "checkpoint.every_steps": 2, "checkpoint.async_save": False, "log_every": 1,
    "eval.max_examples": 8, "eval.batch_size": 8, "eval.max_new_tokens": 2,
    **{f"stages.stage{k}.{f}": v for k in (1, 2, 3)
       for f, v in (("steps", 4), ("batch_size", 8), ("warmup_ratio", 0.0))},
}
LAYOUTS = {
    "fsdp": {"mesh.data": 1, "mesh.fsdp": 4},
    "expert": {"mesh.data": 1, "mesh.expert": 4},
    "data_x_fsdp": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.dcn.fsdp": 2},
}


def train_argv(workdir, data_dir, layout, *extra):
  overrides = {**TINY, "data.dir": data_dir, **LAYOUTS[layout]}
  return ["train", "--config", os.path.join(multihost.ROOT, "configs", "synthetic_tiny.py"),
          "--workdir", workdir, *[f"--config.{k}={v}" for k, v in overrides.items()], *extra]


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
  """Shared synthetic data, and the one-process reference (4 devices, fsdp=4)."""
  pytest.importorskip("portpicker")
  from moe_vlm.data import synthetic, tokenizer as tokenizer_lib

  root = tmp_path_factory.mktemp("pod")
  data = str(root / "data")
  synthetic.generate(data, num_images=40, image_size=32, seed=0)
  tokenizer_lib.train_tokenizer(synthetic.corpus(data), os.path.join(data, "tokenizer"))
  ref = str(root / "reference")
  multihost.moe_vlm(train_argv(ref, data, "fsdp", "--report=false"), log_prefix=ref,
                    processes=1, devices_per_process=4).check()
  return root, data, ref


@pytest.fixture(scope="module")
def fsdp_run(pod):
  """Layout (a) through the three stages and the report, on two processes."""
  root, data, _ = pod
  workdir = str(root / "fsdp")
  run = multihost.moe_vlm(train_argv(workdir, data, "fsdp"), log_prefix=workdir).check()
  return workdir, run


def final_params(workdir, k=3):
  from moe_vlm.experiment import Experiment
  return {n: np.asarray(v) for n, v in Experiment.from_workdir(workdir).load_params(k).items()}


def losses(workdir, k):
  by_step = {}
  for line in open(os.path.join(workdir, f"stage{k}", "metrics.jsonl")):
    m = json.loads(line)
    by_step[m["step"]] = m["loss"]
  return [by_step[s] for s in sorted(by_step)]


def assert_same_params(got, want, atol=1e-5):
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, atol=atol, rtol=0, err_msg=name)


def test_fsdp_across_hosts_matches_one_process(pod, fsdp_run):
  _, _, ref = pod
  workdir, run = fsdp_run
  assert "process 1 of 2; mesh data=1 fsdp=4 model=1 expert=1 (across processes: fsdp)" in \
      run.text(1)
  assert_same_params(final_params(workdir), final_params(ref))
  for k in (1, 2, 3):
    np.testing.assert_allclose(losses(workdir, k), losses(ref, k), rtol=1e-5)
  # The report: process 0 printed and wrote it, once.
  assert "stage 3 MoE 4x top-2" in run.text(0) and "stage 3 MoE" not in run.text(1)
  report = json.load(open(os.path.join(workdir, "report.json")))
  np.testing.assert_allclose(
      np.sum(report["stage3"]["routing"]["top1_per_expert_image"], -1), 1.0, rtol=1e-6)
  lines = open(os.path.join(workdir, "stage1", "metrics.jsonl")).read().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]  # one writer


@pytest.mark.parametrize("layout", ["expert", "data_x_fsdp"])
def test_other_layouts_across_hosts_match_one_process(pod, layout):
  root, data, ref = pod
  workdir = str(root / layout)
  run = multihost.moe_vlm(train_argv(workdir, data, layout, "--report=false"),
                          log_prefix=workdir).check()
  across = {"expert": "expert", "data_x_fsdp": "fsdp"}[layout]
  assert f"(across processes: {across})" in run.text(0)
  assert_same_params(final_params(workdir), final_params(ref))


def test_killed_in_stage2_resumes_with_the_same_losses(pod, fsdp_run):
  root, data, _ = pod
  full, _ = fsdp_run
  workdir = str(root / "killed")
  metrics = os.path.join(workdir, "stage2", "metrics.jsonl")

  def after_step_3():  # the step-2 checkpoint is on disk, step 3 will be lost
    return os.path.exists(metrics) and '"step": 3' in open(metrics).read()

  argv = train_argv(workdir, data, "fsdp", "--report=false")
  run = multihost.moe_vlm(argv, log_prefix=workdir + ".killed", kill_when=after_step_3)
  assert run.killed, run.text(0)[-3000:]
  assert not os.path.exists(os.path.join(workdir, "stage2", "final"))
  multihost.moe_vlm(argv, log_prefix=workdir + ".resumed").check()
  for k in (2, 3):
    np.testing.assert_allclose(losses(workdir, k), losses(full, k), rtol=1e-5)
  assert_same_params(final_params(workdir), final_params(full), atol=1e-6)


def test_eval_generate_and_export_on_the_training_mesh(pod, fsdp_run, tmp_path):
  _, data, _ = pod
  workdir, _ = fsdp_run
  questions = tmp_path / "questions.jsonl"
  pope = json.load(open(os.path.join(data, "pope.json")))[:6]
  with open(questions, "w") as f:
    for i, r in enumerate(pope):
      f.write(json.dumps({"question_id": i, "image": r["image"], "label": r["label"],
                          "category": r["category"],
                          "text": r["conversations"][0]["value"].replace("<image>\n", "")})
              + "\n")
  out = str(tmp_path / "eval")
  run = multihost.moe_vlm(["eval", "--workdir", workdir, "--task", "pope", "--questions",
                           str(questions), "--out", out, "--image_root", data],
                          log_prefix=out).check()
  results = json.load(open(os.path.join(out, "results.json")))
  assert results["num_questions"] == 6 and "f1" in results["overall"]
  assert len(open(os.path.join(out, "answers.jsonl")).read().splitlines()) == 6
  assert "POPE" in run.text(0) or "accuracy" in run.text(0)

  answers = str(tmp_path / "answers.jsonl")
  multihost.moe_vlm(["generate", "--workdir", workdir, "--questions", str(questions),
                     "--answers", answers, "--image_folder", data, "--max_new_tokens", "2"],
                    log_prefix=answers).check()
  rows = [json.loads(l) for l in open(answers)]
  assert [r["question_id"] for r in rows] == list(range(6))

  # Export gathers one tensor at a time; the files equal a one-process export.
  from safetensors.numpy import load_file
  two, one = str(tmp_path / "hf2"), str(tmp_path / "hf1")
  multihost.moe_vlm(["convert", "to-hf", "--workdir", workdir, "--out", two],
                    log_prefix=two).check()
  multihost.moe_vlm(["convert", "to-hf", "--workdir", workdir, "--out", one],
                    log_prefix=one, processes=1, devices_per_process=1).check()
  a, b = load_file(os.path.join(two, "model.safetensors")), \
      load_file(os.path.join(one, "model.safetensors"))
  assert set(a) == set(b) and len(a) > 20
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert not os.path.exists(two + ".partial")
