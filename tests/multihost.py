"""Runs `moe-vlm` as a CPU "pod": several processes on localhost, each with its own
simulated devices, joined through the variables a TPU worker sets
(MOE_VLM_COORDINATOR / MOE_VLM_NUM_PROCESSES / MOE_VLM_PROCESS_ID)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Errors that mean this jax build has no CPU multi-process collectives.
NO_COLLECTIVES = ("cpu_collectives", "collectives are not supported",
                  "Multiprocess computations aren't implemented on the CPU backend")


@dataclasses.dataclass
class Run:
  returncodes: list[Optional[int]]
  logs: list[str]
  killed: bool = False

  def text(self, i: int = 0) -> str:
    with open(self.logs[i], errors="replace") as f:
      return f.read()

  def check(self) -> "Run":
    """Fails with the log of the first process that did not exit 0."""
    for i, rc in enumerate(self.returncodes):
      if rc != 0:
        tail = self.text(i)[-6000:]
        raise AssertionError(f"process {i} exited with {rc}:\n{tail}")
    return self


def moe_vlm(argv: Sequence[str], *, log_prefix: str, processes: int = 2,
            devices_per_process: int = 2, timeout: float = 300,
            kill_when: Optional[Callable[[], bool]] = None) -> Run:
  """`python -m moe_vlm ARGV` in `processes` processes (one process: no coordinator).

  kill_when: polled while the processes run; once true, all of them get SIGKILL (a
  preempted slice) and the returned Run has killed=True.
  """
  import portpicker

  port = portpicker.pick_unused_port()
  procs, logs = [], []
  flags = (f"--xla_force_host_platform_device_count={devices_per_process} "
           "--xla_backend_optimization_level=0")
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=flags)
    for var in ("MOE_VLM_COORDINATOR", "MOE_VLM_NUM_PROCESSES", "MOE_VLM_PROCESS_ID"):
      env.pop(var, None)
    if processes > 1:
      env.update(MOE_VLM_COORDINATOR=f"localhost:{port}",
                 MOE_VLM_NUM_PROCESSES=str(processes), MOE_VLM_PROCESS_ID=str(i))
    logs.append(f"{log_prefix}.{i}.log")
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen([sys.executable, "-m", "moe_vlm", *argv], cwd=ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.time() + timeout
  killed = False
  try:
    while any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs):
        break  # one failed: the others would wait for it forever
      if kill_when is not None and kill_when():
        for p in procs:
          p.send_signal(signal.SIGKILL)
        killed = True
        break
      if time.time() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=60)
  run = Run([p.returncode for p in procs], logs, killed)
  if not killed:
    for i, rc in enumerate(run.returncodes):
      text = run.text(i)
      if rc != 0 and any(m in text for m in NO_COLLECTIVES):
        import pytest
        pytest.skip("CPU multi-process collectives are unavailable in this jax")
      if rc is not None and rc < 0 and time.time() > deadline:
        raise AssertionError(f"process {i} timed out after {timeout} s:\n{text[-4000:]}")
  return run
