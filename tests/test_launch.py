"""TPU launch tooling: the scripts' exact gcloud commands (--dry-run), the worker-side
runner, the topology presets, shellcheck, and the Colab notebook end to end on CPU."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from configs import topologies
from moe_vlm import cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["common.sh", "create_tpu.sh", "delete_tpu.sh", "setup.sh", "train.sh",
           "worker_run.sh"]
LOC = ["--project", "my-proj", "--zone", "us-west4-a", "--name", "tpu1"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu1", "--project=my-proj",
       "--zone=us-west4-a"]


@pytest.fixture(scope="module", autouse=True)
def no_real_gcloud(tmp_path_factory):
  """`gcloud` on PATH fails loudly: a test must never reach the real one."""
  guard = tmp_path_factory.mktemp("guard")
  (guard / "gcloud").write_text("#!/bin/sh\necho 'real gcloud called' >&2\nexit 97\n")
  (guard / "gcloud").chmod(0o755)
  old = os.environ["PATH"]
  os.environ["PATH"] = f"{guard}{os.pathsep}{old}"
  yield
  os.environ["PATH"] = old


def script(name, *args, env=None, check=True):
  e = {k: v for k, v in os.environ.items() if not k.startswith("MOE_VLM_")}
  e.pop("GCLOUD", None)
  e.update(PYTHON=sys.executable, **(env or {}))
  out = subprocess.run(["bash", os.path.join(LAUNCH, name), *args], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=60)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def dry(name, *args, env=None):
  """The commands a script would run, each as its argv."""
  out = script(name, "--dry-run", *args, env=env)
  return [shlex.split(line) for line in out.stdout.splitlines()]


def steps_of(command):
  """A `a; b; c` shell line as the argv of each command (quotes respected)."""
  lex = shlex.shlex(command, posix=True, punctuation_chars=";")
  lex.whitespace_split = True
  steps, current = [], []
  for token in lex:
    if token == ";":
      steps.append(current)
      current = []
    else:
      current.append(token)
  return steps + [current]


def remote(cmd):
  """The command a `tpu-vm ssh` runs on the workers, and the worker flag."""
  (command,) = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  (worker,) = [a[len("--worker="):] for a in cmd if a.startswith("--worker=")]
  return command, worker


# ------------------------------------------------------------------ create / delete


@pytest.mark.parametrize("accelerator,runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v4-8", "tpu-ubuntu2204-base")])
def test_create_tpu_vm(accelerator, runtime):
  assert dry("create_tpu.sh", *LOC, "--accelerator-type", accelerator) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "tpu1", "--project=my-proj",
      "--zone=us-west4-a", f"--accelerator-type={accelerator}", f"--version={runtime}"]]


def test_create_queued_resource_spot_wait_and_bucket():
  cmds = dry("create_tpu.sh", *LOC, "--accelerator-type=v5litepod-64", "--queued", "--spot",
             "--wait", "--valid-until", "6h", "--runtime-version", "my-image",
             "--bucket=gs://my-bucket", "--create-bucket")
  assert cmds == [
      ["gcloud", "storage", "buckets", "create", "gs://my-bucket", "--project=my-proj",
       "--location=us-west4", "--uniform-bucket-level-access"],
      ["gcloud", "compute", "tpus", "queued-resources", "create", "tpu1", "--project=my-proj",
       "--zone=us-west4-a", "--node-id=tpu1", "--accelerator-type=v5litepod-64",
       "--runtime-version=my-image", "--spot", "--valid-until-duration=6h"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "tpu1",
       "--project=my-proj", "--zone=us-west4-a", "--format=value(state.state)"]]


def test_delete():
  assert dry("delete_tpu.sh", *LOC) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "tpu1", "--project=my-proj",
      "--zone=us-west4-a", "--quiet"]]
  assert dry("delete_tpu.sh", *LOC, "--queued", "--async") == [[
      "gcloud", "compute", "tpus", "queued-resources", "delete", "tpu1", "--project=my-proj",
      "--zone=us-west4-a", "--force", "--quiet", "--async"]]


def test_flag_errors_and_env_defaults():
  out = script("create_tpu.sh", "--name", "x", "--dry-run", check=False)
  assert out.returncode == 2 and "--project is required" in out.stderr
  out = script("delete_tpu.sh", *LOC, "--bogus", "--dry-run", check=False)
  assert out.returncode == 2 and "unknown flag --bogus" in out.stderr
  out = script("create_tpu.sh", *LOC, "--accelerator-type", "v5litepod-16", "--wait",
               "--dry-run", check=False)
  assert out.returncode == 2 and "--wait needs --queued" in out.stderr
  out = script("create_tpu.sh", *LOC, "--accelerator-type", "v9-8", "--dry-run", check=False)
  assert out.returncode != 0 and "v9-8" in out.stderr
  env = dict(MOE_VLM_PROJECT="p2", MOE_VLM_ZONE="europe-west4-b",
             MOE_VLM_ACCELERATOR_TYPE="v5litepod-16", MOE_VLM_TPU_NAME="n2")
  assert dry("create_tpu.sh", env=env)[0][5:8] == ["n2", "--project=p2",
                                                   "--zone=europe-west4-b"]
  assert "Creates a Cloud TPU VM" in script("create_tpu.sh", "--help").stdout


def test_dry_run_prints_what_runs(tmp_path):
  """Without --dry-run the same argv reaches gcloud (a recording stand-in here)."""
  log = tmp_path / "calls.jsonl"
  fake = tmp_path / "gcloud"
  fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                  f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
  fake.chmod(0o755)
  args = [*LOC, "--accelerator-type", "v5p-128", "--queued", "--reserved"]
  expected = dry("create_tpu.sh", *args)
  script("create_tpu.sh", *args, env={"GCLOUD": str(fake)})
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [["gcloud", *c] for c in calls] == expected


# -------------------------------------------------------------------------- setup


def test_setup_copies_the_checkout_and_installs_on_every_worker():
  cmds = dry("setup.sh", *LOC, "--jax-version", "0.10.2", "--sync",
             "gs://b/moe-llava=/data/moe-llava", "--sync=gs://b/ckpt=/ckpt")
  assert [c[0] for c in cmds] == ["tar", "gcloud", "gcloud"]
  assert cmds[0][:3] == ["tar", "-czf", "/tmp/moe_vlm_src_tpu1.tgz"] or cmds[0][2].endswith(
      "moe_vlm_src_tpu1.tgz")
  assert ["-C", ROOT] == cmds[0][3:5] and "--exclude=.git" in cmds[0]
  assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert cmds[1][6:] == ["tpu1:/tmp/moe_vlm_src.tgz", "--project=my-proj",
                         "--zone=us-west4-a", "--worker=all"]
  assert cmds[2][:8] == SSH
  command, worker = remote(cmds[2])
  assert worker == "all"
  steps = steps_of(command)
  assert steps[0] == ["set", "-euo", "pipefail"]
  assert ["tar", "-xzf", "/tmp/moe_vlm_src.tgz", "-C", "~/moe_vlm"] in steps
  assert ["[", "-x", "~/moe_vlm/.venv/bin/python", "]", "||", "uv", "venv", "--quiet",
          "--python", "3.12", "~/moe_vlm/.venv"] in steps
  assert ["uv", "pip", "install", "--quiet", "--python", "~/moe_vlm/.venv/bin/python", "-e",
          "~/moe_vlm[gcs]", "jax[tpu]==0.10.2"] in steps
  assert ["gcloud", "storage", "rsync", "--recursive", "gs://b/moe-llava",
          "/data/moe-llava"] in steps
  assert ["gcloud", "storage", "rsync", "--recursive", "gs://b/ckpt", "/ckpt"] in steps
  assert "import jax" in steps[-1][-1]


def test_setup_from_a_git_repository():
  cmds = dry("setup.sh", *LOC, "--repo", "https://example.com/org/moe_vlm.git", "--ref",
             "v0.1", "--no-check", "--remote-dir", "src/mv")
  assert len(cmds) == 1  # nothing copied from here
  command, worker = remote(cmds[0])
  steps = steps_of(command)
  assert worker == "all"
  assert steps[1] == ["[", "-d", "~/src/mv/.git", "]", "||", "git", "clone", "--quiet",
                      "https://example.com/org/moe_vlm.git", "~/src/mv"]
  assert steps[2] == ["git", "-C", "~/src/mv", "fetch", "--quiet", "origin", "v0.1"]
  assert steps[-1][:3] == ["uv", "pip", "install"] and steps[-1][-1] == "jax[tpu]"


# -------------------------------------------------------------------------- train


def _train_words(command):
  prefix = "cd ~/moe_vlm && "
  assert command.startswith(prefix), command
  return shlex.split(command[len(prefix):])


@pytest.mark.parametrize("name", list(topologies.TOPOLOGIES))
def test_train_runs_on_all_workers_with_the_topology_mesh(name):
  t = topologies.TOPOLOGIES[name]
  cmds = dry("train.sh", *LOC, "--accelerator-type", t.accelerator_type, "--bucket",
             "my-bucket", "--run-name", "r1", "--", "--config.init.hf_llm=/ckpt/phi-2")
  assert len(cmds) == 2
  start, stream = cmds
  command, worker = remote(start)
  assert start[:8] == SSH and worker == "all"
  words = _train_words(command)
  sep = words.index("--")
  assert words[:sep] == [
      "env", f"MOE_VLM_NUM_PROCESSES={t.hosts}", "MOE_VLM_COORDINATOR_PORT=8476",
      "PYTHONUNBUFFERED=1", "TF_CPP_MIN_LOG_LEVEL=1", "bash", "launch/worker_run.sh",
      "start", "r1"]
  assert words[sep + 1:] == [
      ".venv/bin/moe-vlm", "train", "--config=configs/moe_llava.py:phi2",
      "--workdir=gs://my-bucket/r1", "--stage=all",
      *topologies.config_overrides(t), "--config.init.hf_llm=/ckpt/phi-2"]
  mesh = {w.split("=")[0].rsplit(".", 1)[1]: int(w.split("=")[1])
          for w in words if w.startswith("--config.mesh.")}
  assert mesh == t.mesh
  command, worker = remote(stream)
  assert worker == "0"
  assert _train_words(command) == ["bash", "launch/worker_run.sh", "tail", "r1"]


def test_train_preflight_stage_and_config_choices():
  cmds = dry("train.sh", *LOC, "--accelerator-type=v5litepod-16", "--bucket", "b",
             "--config", "configs/synthetic_tiny.py", "--stage", "3", "--preflight",
             "--detach", "--batch-sizes", "32,32,32")
  assert len(cmds) == 2  # pre-flight, start; --detach: no log stream
  pre = _train_words(remote(cmds[0])[0])
  assert remote(cmds[0])[1] == "all"
  assert pre[pre.index("--") + 1:] == [
      ".venv/bin/python", "-m", "moe_vlm.train.preflight",
      "--config=configs/synthetic_tiny.py", "--stage=3", "--hbm_gib=16",
      "--config.mesh.data=1", "--config.mesh.fsdp=16", "--config.mesh.model=1",
      "--config.mesh.expert=1", "--config.stages.stage1.grad_accum=1",
      "--config.stages.stage2.grad_accum=1", "--config.stages.stage3.grad_accum=1"]
  start = _train_words(remote(cmds[1])[0])
  assert "start" in start and "synthetic_tiny" in start  # run name from the config
  assert "--workdir=gs://b/synthetic_tiny" in start and "--stage=3" in start


def test_train_stop_attach_and_errors():
  stop = dry("train.sh", *LOC, "--stop", "--run-name", "r1", "--stop-timeout", "120")
  assert len(stop) == 1 and remote(stop[0])[1] == "all"
  assert _train_words(remote(stop[0])[0]) == ["bash", "launch/worker_run.sh", "stop", "r1",
                                              "--timeout", "120"]
  attach = dry("train.sh", *LOC, "--attach", "--run-name", "r1")
  assert len(attach) == 1 and remote(attach[0])[1] == "0"
  out = script("train.sh", *LOC, "--accelerator-type", "v5litepod-16", "--dry-run",
               check=False)
  assert out.returncode == 2 and "--bucket is required" in out.stderr
  out = script("train.sh", *LOC, "--accelerator-type", "v5litepod-32", "--bucket", "b",
               "--dry-run", check=False)
  assert out.returncode == 2 and "no mesh preset for 'v5litepod-32'" in out.stderr
  out = script("train.sh", *LOC, "--accelerator-type", "v4-8", "--bucket", "b", "--stage",
               "4", "--dry-run", check=False)
  assert out.returncode == 2 and "--stage=4" in out.stderr


# ------------------------------------------------------------ worker_run.sh (local)


def test_worker_run_env_start_tail_stop(tmp_path):
  meta = tmp_path / "meta"
  meta.mkdir()
  (meta / "agent-worker-number").write_text("1")
  (meta / "worker-network-endpoints").write_text("w-0:0:10.1.0.5,w-1:1:10.1.0.6")
  env = dict(MOE_VLM_RUNS_DIR=str(tmp_path / "runs"),
             MOE_VLM_METADATA_URL=f"file://{meta}", MOE_VLM_NUM_PROCESSES="2")
  out = script("worker_run.sh", "env", env=env).stdout.splitlines()
  assert {"MOE_VLM_COORDINATOR=10.1.0.5:8476", "MOE_VLM_PROCESS_ID=1",
          "MOE_VLM_NUM_PROCESSES=2"} <= set(out)
  bad = script("worker_run.sh", "env", env={**env, "MOE_VLM_NUM_PROCESSES": "4"}, check=False)
  assert bad.returncode == 2 and "2 workers but MOE_VLM_NUM_PROCESSES=4" in bad.stderr

  prog = tmp_path / "prog.py"
  prog.write_text(
      "import os, signal, sys, time\n"
      "signal.signal(signal.SIGTERM, lambda *a: (print('checkpoint saved', flush=True),"
      " sys.exit(143)))\n"
      "print('worker', os.environ['MOE_VLM_PROCESS_ID'], os.environ['MOE_VLM_COORDINATOR'],"
      " flush=True)\n"
      "for i in range(int(sys.argv[1])):\n  print('step', i, flush=True); time.sleep(0.05)\n"
      "sys.exit(int(sys.argv[2]))\n")
  script("worker_run.sh", "start", "r1", "--", sys.executable, str(prog), "3", "5", env=env)
  tail = script("worker_run.sh", "tail", "r1", env=env, check=False)
  assert tail.returncode == 5  # the run's exit status comes back through ssh
  assert "worker 1 10.1.0.5:8476" in tail.stdout and "step 2" in tail.stdout
  assert script("worker_run.sh", "status", "r1", env=env).stdout.strip() == "exited 5"

  script("worker_run.sh", "start", "r2", "--", sys.executable, str(prog), "100000", "0",
         env=env)
  dup = script("worker_run.sh", "start", "r2", "--", "true", env=env, check=False)
  assert dup.returncode == 2 and "already running" in dup.stderr
  log = tmp_path / "runs" / "r2" / "log"
  deadline = time.time() + 30
  while "step 0" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
    time.sleep(0.1)
  stop = script("worker_run.sh", "stop", "r2", "--timeout", "20", env=env)
  assert "stopped with status 143" in stop.stderr
  assert "checkpoint saved" in log.read_text()
  assert script("worker_run.sh", "status", "r2", env=env).stdout.strip() == "exited 143"


# --------------------------------------------------------------------- topologies


def test_topology_presets_fit_the_moe_llava_models():
  assert topologies.get("v5litepod-16") is topologies.TOPOLOGIES["v5e-16"]
  with pytest.raises(KeyError, match="presets: v4-8, v4-32"):
    topologies.get("v5litepod-32")
  expected = {"v4-8": (4, 1), "v4-32": (16, 4), "v5e-16": (16, 4), "v5e-64": (64, 16),
              "v5e-256": (256, 64), "v5p-128": (64, 16)}
  assert {n: (t.chips, t.hosts) for n, t in topologies.TOPOLOGIES.items()} == expected
  for t in topologies.TOPOLOGIES.values():
    m = t.mesh
    assert m["data"] * m["fsdp"] * m["model"] * m["expert"] == t.chips, t.name
    assert 4 % m["expert"] == 0, t.name  # MoE-LLaVA's 4 experts
    for stage, batch in topologies.MOE_LLAVA_BATCH.items():
      micro = topologies.per_chip_batch(t, batch)
      assert 1 <= micro <= t.per_chip_batch
      assert micro * t.batch_ways * topologies.grad_accum(t, batch) == batch
      for name in cost.VARIANTS:
        cfg = cost.real_config(name)
        text, vision = cfg.text, cfg.vision
        for size in (text.hidden_size, vision.hidden_size):
          assert size % m["fsdp"] == 0, (t.name, name, size)
        for size in (text.num_heads, text.vocab_size, text.intermediate_size,
                     vision.intermediate_size):
          assert size % m["model"] == 0, (t.name, name, size)
        est = topologies.estimate_memory(name, t, stage)
        assert est["total"] < 0.8 * t.hbm_gib, (t.name, name, stage, est)
  # fsdp 4 -> 16 divides weights and optimizer state by 4; activations follow the
  # per-chip micro-batch (4 -> 2 sequences).
  v4, v5e = (topologies.estimate_memory("phi2", t, 2) for t in ("v4-8", "v5e-16"))
  assert v4["optimizer"] == pytest.approx(4 * v5e["optimizer"])
  assert v4["params"] == pytest.approx(4 * v5e["params"])
  assert v4["activations"] == pytest.approx(2 * v5e["activations"])


def test_parameter_counts_match_the_released_models():
  n = cost.param_counts(cost.real_config("phi2"))
  assert 2.7e9 < n["llm"] < 2.85e9  # Phi-2: 2.7B
  moe_llm = cost.param_counts(cost.real_config("phi2", cost.moe_llava_moe(4)))["llm"]
  assert 5.2e9 < moe_llm < 5.4e9  # MoE-LLaVA-Phi2 (4 experts, every other layer): 5.3B
  assert 0.28e9 < n["vision"] < 0.32e9  # CLIP ViT-L/14: 0.3B
  assert 1.8e9 < cost.param_counts(cost.real_config("qwen"))["llm"] < 1.9e9


def test_topologies_command_line():
  run = lambda *a: subprocess.run([sys.executable, "configs/topologies.py", *a], cwd=ROOT,
                                  capture_output=True, text=True, timeout=30)
  out = run("flags", "v5litepod-64")
  assert out.stdout.split() == topologies.config_overrides(topologies.get("v5e-64"))
  assert "--config.stages.stage1.grad_accum=2" in out.stdout
  out = run("shell", "v5p-128")
  assert "HOSTS=16" in out.stdout and "RUNTIME=v2-alpha-tpuv5" in out.stdout
  out = run("memory", "v5e-16", "--model", "qwen")
  assert out.stdout.count("GiB of 16") == 3
  out = run("flags", "v5litepod-8")
  assert out.returncode == 2 and "no mesh preset" in out.stderr


# ---------------------------------------------------------------------- shellcheck


def test_scripts_are_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
  paths = [os.path.join("launch", s) for s in SCRIPTS]
  out = subprocess.run(["shellcheck", "-x", *paths], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  for s in SCRIPTS:
    text = open(os.path.join(LAUNCH, s)).read()
    assert "set -euo pipefail" in text or s == "common.sh", s


# ------------------------------------------------------------------------ notebook


def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  nbformat = pytest.importorskip(
      "nbformat", reason="the notebook test needs nbformat, nbclient and ipykernel")
  nbclient = pytest.importorskip(
      "nbclient", reason="the notebook test needs nbformat, nbclient and ipykernel")
  pytest.importorskip("ipykernel", reason="the notebook test needs nbformat, nbclient and "
                      "ipykernel")
  # A kernel spec for this interpreter, so the kernel sees this environment.
  spec = tmp_path / "jupyter" / "kernels" / "moe_vlm_test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "moe_vlm test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("MOE_VLM_SRC", ROOT)  # use this checkout instead of cloning
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # one CPU device
  nb = nbformat.read(os.path.join(LAUNCH, "colab_demo.ipynb"), as_version=4)
  run_dir = tmp_path / "nb"
  run_dir.mkdir()
  nbclient.NotebookClient(nb, kernel_name="moe_vlm_test", timeout=600,
                          resources={"metadata": {"path": str(run_dir)}}).execute()
  text = ""
  kinds = set()
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.output_type != "error", out
      text += out.get("text", "") if out.output_type == "stream" else ""
      kinds.update(out.get("data", {}))
  assert "three stages in" in text
  assert "stage 3: loss" in text
  assert "Held-out synthetic evaluation: stage 2 (dense) vs stage 3 (MoE)" in text
  assert "share of routed tokens per expert" in text and "dropped by capacity" in text
  assert {"text/markdown", "image/png"} <= kinds
  assert (run_dir / "moe_vlm_demo" / "report.md").exists()
