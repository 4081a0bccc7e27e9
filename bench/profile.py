"""Where one train step's time goes, by kind of XLA op (jax.profiler trace + compiled HLO).

    python -m bench.profile [--tiny] [--dispatch capacity] [--top N] [--trace-dir DIR]

The benchmark model's train step (`bench.config`, as in bench.mfu) is compiled, run
once to warm up, then traced for one step with `jax.profiler`. Every executed HLO op
(thunk) in the trace is matched to its instruction in the compiled HLO and put into
one of these kinds:

- `dot (YNNPACK)`: XLA:CPU's library dots (`ynn_fusion*`);
- `dot (XLA/Eigen)`: dots XLA runs itself;
- `copy / transpose`: layout changes, usually feeding a dot (`copy*`, `transpose*`);
- `fused loop`: XLA-generated element-wise / reduction fusions and everything else
  it emits (norms, softmax, activations and their gradients, the loss, the optimizer);
- `while loop`: the loop thunks themselves (the blocked gmm's loops; the ops inside
  them are counted under their own kinds too, so this row is the loops' overhead plus
  their bodies: it overlaps the others);
- `other`: gathers, scatters, custom calls, anything not above.

Op times overlap when XLA runs independent ops at once (two cores here), so the sum
exceeds the step's wall time; shares are of the sum. Keep `--trace-dir` to open the
trace in TensorBoard's profile plugin or Perfetto. On a GPU/TPU the trace has device
ops instead: the kinds fall back to the HLO opcode.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax

from bench import common, config, mfu
from bench.common import compile_all

# Executor spans that enclose the ops (counting them would count the ops twice).
_NOT_OPS = ("ThunkExecutor::", "SlinkyThreadPool::")


@dataclasses.dataclass(frozen=True)
class HloOp:
  opcode: str
  shape: str


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
  """Instruction name -> opcode and result shape, from `compiled.as_text()`."""
  ops = {}
  for line in hlo_text.splitlines():
    m = common.HLO_INSTRUCTION.match(line)
    if m:
      ops[m.group(1)] = HloOp(m.group(3), re.sub(r"\{[\d,]*\}$", "", m.group(2)))
  return ops


def kind_of(name: str, op: Optional[HloOp]) -> str:
  opcode = op.opcode if op else ""
  if name.startswith("ynn_fusion") or name.startswith("xnn_fusion"):
    return "dot (YNNPACK)"
  if opcode == "dot" or name.startswith("dot"):
    return "dot (XLA/Eigen)"
  if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
    return "copy / transpose"
  if opcode == "while" or name.startswith("while"):
    return "while loop"
  if opcode == "fusion" or "fusion" in name or name.startswith("wrapped_"):
    return "fused loop"
  return "other"


def op_events(trace_dir: str) -> list[dict[str, Any]]:
  """The complete ("X") events of the trace, less Python frames and executor spans."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"{trace_dir}: no *.trace.json.gz written by jax.profiler")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    events = json.load(f)["traceEvents"]
  return [e for e in events if e.get("ph") == "X" and not e["name"].startswith("$")
          and not e["name"].startswith(_NOT_OPS)]


def breakdown(events: list[dict[str, Any]], ops: dict[str, HloOp]
              ) -> tuple[dict[str, float], list[tuple[float, int, str]], float]:
  """Seconds per kind, (seconds, calls, name) per HLO op slowest first, and the seconds
  of events that are no HLO op of the program (the runtime's host-side spans)."""
  per_kind: dict[str, float] = collections.Counter()
  per_op: dict[str, float] = collections.Counter()
  calls: dict[str, int] = collections.Counter()
  host = 0.0
  for e in events:
    name = e["name"]
    if name not in ops:
      host += e["dur"] * 1e-6
      continue
    per_kind[kind_of(name, ops[name])] += e["dur"] * 1e-6
    per_op[name] += e["dur"] * 1e-6
    calls[name] += 1
  slowest = sorted(((t, calls[n], n) for n, t in per_op.items()), reverse=True)
  return dict(per_kind), slowest, host


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> dict:
  p = argparse.ArgumentParser(prog="python -m bench.profile",
                              description=__doc__.split("\n")[0])
  p.add_argument("--device-note", default="", help="free text describing the machine")
  p.add_argument("--tiny", action="store_true", help="tiny shapes: runs in seconds")
  p.add_argument("--dispatch", choices=("dropless", "capacity"), default="dropless")
  p.add_argument("--top", type=int, default=15, help="slowest ops to list")
  p.add_argument("--head-fraction", type=float, default=None,
                 help="StepConfig.head_fraction (default: the batch's targets per row / "
                 "seq, as bench.train_step; 0: the LM head on every position)")
  p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temp dir)")
  args = p.parse_args(argv)
  if args.top < 0:
    p.error(f"--top={args.top}: expected >= 0")
  s = config.TINY if args.tiny else config.FULL
  common.print_header(out, "bench.profile", args.tiny, args.device_note)
  head_fraction = args.head_fraction
  if head_fraction is None:
    head_fraction = config.batch_head_fraction(
        config.train_batch(config.vlm_config(s, args.dispatch), s.batch, s.seq))
  step = mfu.prepare(s, out, args.dispatch, head_fraction or None)
  step.set_compiled(compile_all([step.lowered])[0])
  ops = hlo_ops(step.compiled.as_text())
  common.block(step())  # warm-up: allocations and first-run costs stay out of the trace
  with tempfile.TemporaryDirectory(prefix="bench_profile_") as tmp:
    trace_dir = args.trace_dir or tmp
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    common.block(step())
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    events = op_events(trace_dir)
  per_kind, slowest, host = breakdown(events, ops)
  total = sum(per_kind.values())
  out(f"== one traced step: {wall * 1e3:.1f} ms wall; {sum(n for _, n, _ in slowest)} HLO "
      f"op executions, {total * 1e3:.1f} ms summed (ops overlap on {os.cpu_count()} cores); "
      f"runtime spans outside the ops (dispatch, buffers): {host * 1e3:.1f} ms")
  for kind, t in sorted(per_kind.items(), key=lambda kv: -kv[1]):
    out(f"kind {kind:18s} {t * 1e3:10.1f} ms {100 * t / total:5.1f}%")
  if args.top:
    out(f"== slowest {args.top} ops (summed over calls)")
  for t, n, name in slowest[:args.top]:
    op = ops.get(name)
    shape = op.shape if len(op.shape) <= 60 else op.shape[:57] + "..."
    out(f"{t * 1e3:9.1f} ms x{n:<5d} {kind_of(name, op):18s} {name} {shape}")
  if args.trace_dir:
    out(f"trace kept in {args.trace_dir} (TensorBoard profile plugin or Perfetto)")
  return {"wall_s": wall, "per_kind_s": per_kind, "total_s": total, "slowest": slowest,
          "host_s": host}


if __name__ == "__main__":
  common.reexec_with_malloc_tunables("bench.profile", sys.argv[1:])
  main(sys.argv[1:])
