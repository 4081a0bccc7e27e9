"""Multi-process training on CPU: two JAX processes (2 devices each) behave like one
process with 4 devices.

Each child process joins through `moe_vlm.distributed.maybe_initialize()` (the
MOE_VLM_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID variables that launch/worker_run.sh
sets on TPU VMs; jax 0.10 runs CPU collectives over gloo), assembles the global batch
from its own rows with `jax.make_array_from_process_local_data`, and runs
1. the sharded train step: same loss, grad norm and updated parameters as this (pytest)
   process computes on 4 of its local devices;
2. `moe_vlm.train.loop.train` for 2 steps: both processes train, only process 0 writes
   metrics (one metrics.jsonl line per step, MetricsWriter enabled on process 0 only).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {"data": 2, "fsdp": 2, "model": 1, "expert": 1}
BATCH, LENGTH = 8, 16
TIMEOUT_S = 240  # both children together; ~30 s on an idle 2-core machine


def _step_setup():
  """Tiny MoE VLM, its host parameters and a fixed global batch (same in every process)."""
  import dataclasses

  from flax import nnx

  from moe_vlm.models.config import MoEConfig
  from moe_vlm.models.params import ParamCodec
  from moe_vlm.models.vlm import VLM
  from tests.tiny import IMAGE_TOKEN, LLAMA, vlm_config

  cfg = vlm_config(dataclasses.replace(LLAMA, num_layers=1), MoEConfig(dispatch="dropless"))
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  params = {k: np.asarray(v) for k, v in codec.flatten(model).items()}
  rng = np.random.default_rng(0)
  ids = rng.integers(0, IMAGE_TOKEN, (BATCH, LENGTH))
  ids[::2, 2:2 + cfg.num_image_tokens] = IMAGE_TOKEN
  mask = np.ones((BATCH, LENGTH), np.int32)
  mask[1, -3:] = 0
  batch = dict(input_ids=ids.astype(np.int32), attention_mask=mask,
               loss_mask=(rng.integers(0, 2, (BATCH, LENGTH)) * mask).astype(np.int32),
               pixel_values=rng.normal(size=(BATCH, 28, 28, 3)).astype(np.float32))
  return codec, params, batch


def run_step(devices=None):
  """One train step on MESH; the batch enters as per-process shards. Returns the
  metrics and every updated trainable parameter (gathered to the host)."""
  import jax
  from jax.experimental import multihost_utils

  from moe_vlm.parallel import mesh as mesh_lib
  from moe_vlm.train import step as step_lib
  from moe_vlm.train.optim import OptimConfig

  codec, params, batch = _step_setup()
  mesh = mesh_lib.make_mesh(MESH, devices)
  cfg = step_lib.StepConfig(optim=OptimConfig(learning_rate=1e-3, warmup_ratio=0.0,
                                              total_steps=10))
  tx = step_lib.make_optimizer(cfg.optim)
  trainable = lambda name: not name.startswith("vision.")
  shardings = step_lib.state_shardings(codec, trainable, mesh, tx)
  state = step_lib.init_state(params, trainable, tx, shardings)
  fn = step_lib.jit_train_step(step_lib.make_train_step(codec, cfg, tx), mesh, shardings,
                               batch)
  bsh = step_lib.batch_shardings(mesh, batch)
  device_batch = {}
  for key in step_lib.MODEL_INPUTS:
    # This process's rows: what its devices hold of the batch-sharded global array.
    index = bsh[key].addressable_devices_indices_map(batch[key].shape).values()
    lo, hi = min(i[0].start or 0 for i in index), max(i[0].stop or BATCH for i in index)
    local = batch[key][lo:hi]
    assert hi - lo == BATCH // jax.process_count(), (key, lo, hi)
    device_batch[key] = jax.make_array_from_process_local_data(bsh[key], local,
                                                               batch[key].shape)
  state, metrics = fn(state, device_batch)
  out = {k: float(metrics[k]) for k in ("loss", "aux_loss", "grad_norm")}
  gathered = multihost_utils.process_allgather(state.params, tiled=True)
  return out, {k: np.asarray(v) for k, v in gathered.items()}


def tiny_loop_config(data_dir):
  from configs import synthetic_tiny

  c = synthetic_tiny.get_config()
  c.model.vision.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
  c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1)
  c.data.update(dir=data_dir, num_images=40, max_length=64)
  c.stages.stage1.update(steps=2, batch_size=4, warmup_ratio=0.0)
  c.mesh.update(data=-1)
  c.checkpoint.update(every_steps=1000, async_save=False)
  c.log_every = 1
  return c


def child_main(workdir, data_dir, out_path):
  """Runs in each child process (see CHILD below)."""
  t0 = time.time()
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  from moe_vlm.distributed import maybe_initialize

  maybe_initialize()
  timing = {"init": time.time() - t0}
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}
  metrics, params = run_step()
  timing["step"] = time.time() - t0 - sum(timing.values())
  result["step"] = metrics
  result["params_checksum"] = {k: float(np.abs(v).sum()) for k, v in params.items()}
  result["params_shape"] = {k: list(v.shape) for k, v in params.items()}

  from moe_vlm.train import loop

  enabled = []

  class RecordingWriter(loop.MetricsWriter):
    def __init__(self, directory):
      super().__init__(directory)
      enabled.append(self.enabled)

  loop.MetricsWriter = RecordingWriter
  loop.train(tiny_loop_config(data_dir), workdir, stages=(1,))
  result["writer_enabled"] = enabled
  timing["loop"] = time.time() - t0 - sum(timing.values())
  result["timing"] = timing
  with open(out_path, "w") as f:
    json.dump(result, f)


CHILD = """
import sys
sys.path.insert(0, {root!r})
from tests.test_multiprocess import child_main
child_main(*sys.argv[1:])
"""

# Errors that mean this jax build has no CPU multi-process collectives (then: skip).
_NO_COLLECTIVES = ("cpu_collectives", "collectives are not supported",
                   "Multiprocess computations aren't implemented on the CPU backend")


def _tail(path, n=4000):
  with open(path, errors="replace") as f:
    return f.read()[-n:]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  portpicker = pytest.importorskip("portpicker", reason="portpicker picks the coordinator port")
  from moe_vlm.data import synthetic, tokenizer as tokenizer_lib

  tmp = tmp_path_factory.mktemp("mp")
  data_dir, workdir = str(tmp / "data"), str(tmp / "run")
  # Generated once up front: both processes read the same local data set.
  synthetic.generate(data_dir, num_images=40, image_size=32, seed=0)
  tokenizer_lib.train_tokenizer(synthetic.corpus(data_dir), os.path.join(data_dir, "tokenizer"))
  script = tmp / "child.py"
  script.write_text(CHILD.format(root=ROOT))
  port = portpicker.pick_unused_port()
  procs, logs, outs = [], [], []
  try:
    for i in range(2):
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                 XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                           "--xla_backend_optimization_level=0",
                 MOE_VLM_COORDINATOR=f"localhost:{port}", MOE_VLM_NUM_PROCESSES="2",
                 MOE_VLM_PROCESS_ID=str(i))
      logs.append(str(tmp / f"child{i}.log"))
      outs.append(str(tmp / f"child{i}.json"))
      with open(logs[-1], "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, str(script), workdir, data_dir, outs[-1]], cwd=str(tmp), env=env,
            stdout=log, stderr=subprocess.STDOUT))
    # The single-process reference runs meanwhile, on 4 of this process's 8 devices.
    import jax
    reference = run_step(jax.devices()[:4])
    deadline = time.time() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed or time.time() > deadline:
        break
      time.sleep(0.5)
    for i, p in enumerate(procs):
      if p.poll() is None or p.returncode != 0:
        for q in procs:
          if q.poll() is None:
            q.kill()
        text = _tail(logs[i])
        for marker in _NO_COLLECTIVES:
          if marker in text:
            line = next(l for l in text.splitlines() if marker in l)
            pytest.skip(f"CPU multi-process collectives unavailable in this jax: {line}")
        why = "timed out" if p.returncode is None else f"exited with {p.returncode}"
        pytest.fail(f"child {i} {why} after {TIMEOUT_S}s limit:\n{text}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=30)
  results = [json.load(open(o)) for o in outs]
  return results, reference, workdir


def test_two_processes_see_four_devices(two_processes):
  results, _, _ = two_processes
  assert sorted(r["process_index"] for r in results) == [0, 1]
  for r in results:
    assert (r["process_count"], r["local_devices"], r["devices"]) == (2, 2, 4)


def test_same_step_as_one_process_with_four_devices(two_processes):
  results, (ref_metrics, ref_params), _ = two_processes
  for r in results:
    for k, v in ref_metrics.items():
      np.testing.assert_allclose(r["step"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert set(r["params_checksum"]) == set(ref_params)
    for k, v in ref_params.items():
      assert r["params_shape"][k] == list(v.shape), k
      np.testing.assert_allclose(r["params_checksum"][k], np.abs(v).sum(), rtol=1e-5,
                                 err_msg=k)


def test_loop_trains_in_both_and_only_process_0_writes_metrics(two_processes):
  results, _, workdir = two_processes
  by_index = {r["process_index"]: r for r in results}
  assert by_index[0]["writer_enabled"] == [True]
  assert by_index[1]["writer_enabled"] == [False]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "stage1", "metrics.jsonl"))]
  assert [l["step"] for l in lines] == [1, 2]  # one writer: two processes would give 4
  assert all(np.isfinite(l["loss"]) for l in lines)
  assert os.path.isdir(os.path.join(workdir, "stage1", "final"))
