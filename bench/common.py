"""Timing helpers shared by the benchmarks: interleaved medians, XLA FLOP counts, matmul peak.

Benchmarks here run on shared machines, so every comparison is made side by side:
the candidates are timed in rounds (A, B, C, then C, B, A, ...) and a ratio is the
median over rounds of the per-round ratio, so a burst of noise hits both sides.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# glibc's allocator serves XLA:CPU's per-step temporaries (about 2 GB for the train step
# benchmark) with fresh mmaps of 4 KiB pages, and the kernel spent 1.2-1.7 s of CPU per
# step faulting and zeroing them (half a million minor faults). Transparent huge pages
# for malloc cut that to 0.4 s and the step's wall time by 10-18% in alternating runs.
# The same process runs the PyTorch side, so both get it.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


def reexec_with_malloc_tunables(module: str, argv: Sequence[str]) -> None:
  """Restart `python -m module argv` with MALLOC_TUNABLES unless GLIBC_TUNABLES is set.

  Tunables are read when the process starts, so they cannot be set from inside it.
  Only for command-line entry points (never called by tests); GLIBC_TUNABLES= (empty)
  keeps the default allocator.
  """
  if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
    return
  env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
  os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


# One instruction of HLO text, `%name = <shape> <opcode>(<operands>)<attributes>`:
# groups name, shape (with its layout; a tuple shape may hold spaces), opcode, and the
# rest of the line after the opening paren.
HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def interleaved_times(fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1,
                      per_round: Optional[Mapping[str, int]] = None, settle: int = 0,
                      settle_times: Optional[dict[str, list[float]]] = None,
                      ) -> dict[str, list[float]]:
  """Seconds per call of each thunk, measured in `reps` interleaved rounds.

  The order alternates between rounds (forward, then reversed) so no candidate is
  always first after a pause. Each call is `block_until_ready`-ed before the clock
  stops. `per_round[name]` timed calls of `name` are made per round (default 1), for
  short thunks measured next to long ones.

  `settle` untimed calls open each candidate's turn in every round, so the timed calls
  measure back-to-back steady state, as in a training loop. Why it matters: on the VMs
  these figures come from, memory a process freed and left idle for a few seconds is
  reclaimed under it, and the next call that allocates it again pays for re-faulting
  it (the jax train step's first step after 5 s of PyTorch spent 3.2-3.9 s in the
  kernel instead of 0.3 s; the same after 15 s of sleep; see BENCHMARKS.md). With
  `settle_times`, those calls' seconds are appended there by name.
  """
  names = list(fns)
  per_round = per_round or {}
  for _ in range(warmup):
    for name in names:
      block(fns[name]())
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(reps):
    for name in (names if r % 2 == 0 else names[::-1]):
      for _ in range(settle):
        t0 = time.perf_counter()
        block(fns[name]())
        if settle_times is not None:
          settle_times.setdefault(name, []).append(time.perf_counter() - t0)
      for _ in range(per_round.get(name, 1)):
        t0 = time.perf_counter()
        block(fns[name]())
        times[name].append(time.perf_counter() - t0)
  return times


def median(xs) -> float:
  return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float], scale: float = 1.0) -> float:
  """Median over rounds of num[r] / (scale * den[r])."""
  return median([a / (scale * b) for a, b in zip(num, den)])


def compile_all(lowered: Sequence[Any], workers: Optional[int] = None) -> list[Any]:
  """`.compile()` every lowered program, several at a time (XLA releases the GIL).

  Tracing/lowering stays on the calling thread; only XLA compilation runs in the pool.
  """
  workers = workers or max(1, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda low: low.compile(), lowered))


def xla_flops(compiled: Any) -> Optional[float]:
  """`compiled.cost_analysis()["flops"]` (dict or list-of-dict form), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (backends without a cost model)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def matmul_peak(n: int, dtype=jnp.float32) -> tuple[Callable[[], Any], float]:
  """A thunk running one jit-compiled [n, n] @ [n, n] matmul, and its FLOPs (2 n^3)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
  return (lambda: f(a, b)), 2.0 * n ** 3


def fmt_time(s: float) -> str:
  return f"{s * 1e3:9.2f} ms"


def fmt_flops(f: Optional[float]) -> str:
  return "n/a" if f is None else f"{f / 1e9:.3f} GFLOP"


def print_header(out: Callable[[str], None], name: str, tiny: bool, device_note: str,
                 extra: str = "") -> None:
  """The environment banner every benchmark prints first, so figures carry their machine."""
  dev = jax.devices()[0]
  out(f"# {name}{' --tiny' if tiny else ''}: jax {jax.__version__}, "
      f"{dev.platform} ({dev.device_kind}), {len(jax.devices())} device(s){extra}, "
      f"{os.cpu_count()} host cores, python {platform.python_version()}")
  if device_note:
    out(f"# device note: {device_note}")
  if os.environ.get("GLIBC_TUNABLES"):
    out(f"# GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}")
  if os.environ.get("XLA_FLAGS"):
    out(f"# XLA_FLAGS={os.environ['XLA_FLAGS']}")
