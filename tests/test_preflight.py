"""Pre-flight memory check: the real train step compiled on abstract inputs (CPU here)."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from moe_vlm.models.config import MoEConfig
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import preflight
from tests.tiny import LLAMA, vlm_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = vlm_config(dataclasses.replace(LLAMA, num_layers=2), MoEConfig(dispatch="dropless"))


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh({"data": 1, "fsdp": 2, "expert": 2}, jax.devices()[:4])


def test_huge_budget_passes_and_reports_xla_numbers(mesh):
  printed = []
  report = preflight.preflight_step(CFG, mesh, batch_size=8, seq_len=16, train="moe_layers",
                                    hbm_budget_bytes=1 << 40, print_fn=printed.append)
  assert report.arguments > 0 and report.temporaries > 0 and report.total > 0
  # The state is donated: its outputs reuse the argument buffers.
  assert 0 < report.aliased <= report.outputs
  assert report.total == (report.arguments + report.outputs - report.aliased +
                          report.temporaries + report.code)
  assert len(printed) == 1 and "per device" in printed[0] and "budget 1024.00 GiB" in printed[0]


def test_tiny_budget_raises_a_clear_error(mesh):
  with pytest.raises(preflight.HBMBudgetError, match=r"over the budget of 1.00 KiB per "
                     r"device\. Shard more \(mesh\.fsdp"):
    preflight.preflight_step(CFG, mesh, batch_size=8, seq_len=16, train="moe_layers",
                             hbm_budget_bytes=1024, print_fn=lambda _: None)


def test_bad_layouts_fail_before_compiling(mesh):
  with pytest.raises(mesh_lib.MeshError, match="global batch 6"):
    preflight.compile_train_step(CFG, mesh, batch_size=6, seq_len=16)
  with pytest.raises(ValueError, match="grad_accum 3"):
    preflight.compile_train_step(
        CFG, mesh, batch_size=8, seq_len=16,
        step_cfg=preflight.step_lib.StepConfig(grad_accum=3))


def test_command_line_checks_every_stage_of_a_config(tmp_path):
  """`python -m moe_vlm.train.preflight` on the synthetic config: a budget the stage
  cannot meet exits 3 with the numbers."""
  cmd = [sys.executable, "-m", "moe_vlm.train.preflight", "--config",
         os.path.join(ROOT, "configs", "synthetic_tiny.py"), "--stage", "1,3",
         "--hbm_gib", "0.0001", "--workdir", str(tmp_path),
         "--config.data.num_images=40", "--config.data.max_length=64",
         "--config.model.text.num_layers=2", "--config.model.vision.num_layers=1",
         "--config.stages.stage1.batch_size=4", "--config.stages.stage3.batch_size=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                       "--xla_backend_optimization_level=0")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-3000:]
  assert "PREFLIGHT FAILED: stage 1 (projector, batch 4, grad_accum 1" in out.stderr
  assert "over the budget of 104.86 KiB per device" in out.stderr
  assert "[process 0] stage 1 (projector" in out.stdout
