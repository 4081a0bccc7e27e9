"""How per-device memory and collective traffic grow with devices and experts.

For each parallel layout of the real train step (pure data parallel, FSDP, tensor
(`model`) parallel, expert parallel through GSPMD or shard_map, and combinations) at
2/4/8 devices and for E = 4 and 8 experts, the step is lowered on abstract state
(`jax.ShapeDtypeStruct`s: no weight is ever allocated) and compiled, and two things are
read from the compiled program:

- per-device memory from `compiled.memory_analysis()` (arguments, outputs, temporaries,
  and the peak `preflight.MemoryReport.total`), next to the per-device bytes of the
  train state computed from its shardings;
- the collectives in the compiled (post-SPMD-partitioning) HLO text, per kind: count,
  operand and result bytes, and the bytes each device sends under ring algorithms
  (see `parse_collectives` for exactly what is counted).

  python -m bench.scaling                  # StableLM-2-1.6B x4 shapes, 2 decoder layers
  python -m bench.scaling --tiny           # 5 layouts of a tiny model (tests run this)
  python -m bench.scaling --paper-estimate # FLOPs / step time / MFU on TPU v5e and v5p

The default model has every dimension of MoE-LLaVA-StableLM-1.6Bx4 (config.json values
of its checkpoints, through the HF importer), but only 2 of its 24 decoder layers (one
MoE and one dense: the repeating pair of the "sparse" mode) and 2 of CLIP's 24 layers,
because each compile takes ~10 s of CPU; per-layer bytes scale linearly with depth, the
embeddings, lm_head and the rest do not. `--layers` / `--vision-layers` change that.
The collectives are also predicted by `moe_vlm.cost.ici_bytes`, the formula of the TPU
estimate, so the table checks the estimate's communication model against what XLA
really emits.

Run as a script it asks XLA for 8 simulated CPU devices (before jax is imported).
`--paper-estimate` compiles nothing: it is arithmetic on the real configs (see
`paper_estimate`), printed so that every figure in BENCHMARKS.md can be reproduced.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # Before jax is imported: 8 simulated devices; LLVM optimisation off because only the
  # HLO (partitioning, buffer assignment) is inspected, never run.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  for _flag in ("--xla_force_host_platform_device_count=8",
                "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import argparse
import dataclasses
import functools
import math
import re
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from configs import topologies
from moe_vlm import cost
from moe_vlm.models.config import MoEConfig, TextConfig, VisionConfig, VLMConfig
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train import preflight, stages as stages_lib

MiB, GiB = 1024 ** 2, cost.GiB

# ------------------------------------------------------------------ HLO collectives

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OPCODES = KINDS + ("ragged-all-to-all",)

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) +
                    r")\[([0-9,]*)\]")
# A computation's header, `%name (<params>) -> <shape> {` (instructions: common.HLO_INSTRUCTION).
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def array_bytes(shape: str) -> float:
  """Bytes of every array in an HLO shape string (a tuple counts all its elements)."""
  return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _ARRAY.findall(shape))


def _split_call(rest: str) -> tuple[str, str]:
  """`a, b), attrs` -> (`a, b`, `attrs`): the operand list up to its closing paren."""
  depth = 0
  for i, ch in enumerate(rest):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      if depth == 0:
        return rest[:i], rest[i + 1:]
      depth -= 1
  return rest, ""


def _operands(text: str) -> list[str]:
  out, depth, cur = [], 0, ""
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      out.append(cur.strip())
      cur = ""
    else:
      cur += ch
  if cur.strip():
    out.append(cur.strip())
  return out


def group_size(attrs: str, num_devices: int) -> int:
  """Devices per replica group, from any of XLA's `replica_groups` spellings:
  `{{0,1},{2,3}}`, iota `[2,4]<=[8]` (groups x size), and the mesh form
  `mesh['axis_0'=4,'axis_1'=2] {'axis_0'}` (the product of the named axes). An empty or
  missing list means all devices."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x.strip()])
  return num_devices


def _permute_fraction(attrs: str) -> float:
  """Share of `source_target_pairs` that really move data (source != target)."""
  pairs = re.findall(r"\{(\d+),(\d+)\}", attrs.split("source_target_pairs=", 1)[-1])
  return sum(a != b for a, b in pairs) / len(pairs) if pairs else 1.0


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
  """One collective instruction; bytes per device (SPMD: every device runs the same)."""
  kind: str             # one of KINDS
  opcode: str           # as printed (all-gather-start, ragged-all-to-all, ...)
  shape: str            # result shape
  operand_bytes: float
  result_bytes: float
  group: int            # devices per replica group
  wire_bytes: float     # what a device sends under ring algorithms
  in_loop: bool         # inside a while body: runs once per iteration
  op_name: str          # jax source op from the metadata, for reading the figures
  dtypes: tuple[tuple[str, float], ...]  # payload bytes per element type

  @property
  def payload(self) -> float:
    """The larger of operand and result: the full buffer of an all-gather (its result)
    or reduce-scatter (its operand); all-reduce, all-to-all and permute have equal ones."""
    return max(self.operand_bytes, self.result_bytes)


@dataclasses.dataclass
class CollectiveTotals:
  """One kind of collective in one program: sums over its `CollectiveOp`s."""
  count: int = 0
  operand_bytes: float = 0.0
  result_bytes: float = 0.0
  payload: float = 0.0
  wire_bytes: float = 0.0
  in_loops: int = 0  # instructions in a while body: counted once, may run more often
  by_dtype: dict[str, float] = dataclasses.field(default_factory=dict)  # payload per dtype


def wire_factor(kind: str, n: int) -> float:
  """Bytes a device sends per payload byte (ring algorithms over a group of n):
  all-reduce 2(n-1)/n of the buffer (reduce-scatter + all-gather), all-gather and
  reduce-scatter (n-1)/n of the full buffer, all-to-all (n-1)/n of its send buffer
  (the block addressed to itself stays), collective-permute 1 (scaled separately by the
  share of pairs that move)."""
  if n <= 1:
    return 0.0
  return {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
          "reduce-scatter": (n - 1) / n, "all-to-all": (n - 1) / n,
          "collective-permute": 1.0}[kind]


def collective_ops(hlo_text: str, num_devices: int) -> list[CollectiveOp]:
  """Every collective instruction of a compiled (SPMD-partitioned) HLO module.

  What is read, per instruction of opcode all-reduce, all-gather, reduce-scatter,
  all-to-all, collective-permute (their `-start` halves for async pairs; `-done` is
  skipped so each collective counts once; ragged-all-to-all counts as all-to-all):
  - operand bytes: the operands' shapes, looked up by name (compiled HLO prints
    operands without shapes) or read inline when printed;
  - result bytes: the instruction's shape; for an async `-start` whose tuple carries
    the operands (all-gather, collective-permute, all-to-all), the operands and u32/s32
    scalar context are taken out;
  - group size from `replica_groups` (`group_size`), wire bytes = payload x
    `wire_factor(kind, group)` (x the moving share of a permute's pairs);
  - instructions in a while body are flagged: listed once, they run once per iteration.
  Collectives wrapped in async computations (`async-start` calling a computation) are
  found inside the called computation, once.
  """
  shapes: dict[str, str] = {}
  parsed = []
  computation, loop_bodies = "", set()
  for line in hlo_text.splitlines():
    m = common.HLO_INSTRUCTION.match(line)
    if not m:
      c = _COMPUTATION.match(line)
      if c and " = " not in line:
        computation = c.group(1)
      continue
    name, shape, opcode, rest = m.groups()
    shapes[name] = shape
    if opcode == "while":
      body = re.search(r"body=%?([\w.\-]+)", rest)
      if body:
        loop_bodies.add(body.group(1))
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    if base in _OPCODES:
      parsed.append((computation, shape, opcode, base, rest))
  ops = []
  for computation, shape, opcode, base, rest in parsed:
    operand_text, attrs = _split_call(rest)
    operand_shapes = []
    for op in _operands(operand_text):
      ref = op.split()[-1].lstrip("%") if op.split() else op
      operand_shapes.append(op if _ARRAY.search(op) else shapes.get(ref, ""))
    operand_bytes = sum(map(array_bytes, operand_shapes))
    result_bytes = array_bytes(shape)
    if opcode.endswith("-start") and base != "all-reduce" and shape.startswith("("):
      scalars = sum(array_bytes(x) for x in re.findall(r"\b[su]32\[\]", shape))
      result_bytes = result_bytes - operand_bytes - scalars
    kind = "all-to-all" if base == "ragged-all-to-all" else base
    payload = max(operand_bytes, result_bytes)
    n = group_size(attrs, num_devices)
    wire = payload * wire_factor(kind, n)
    if kind == "collective-permute":
      wire *= _permute_fraction(attrs)
    side = shape if result_bytes >= operand_bytes else " ".join(operand_shapes)
    sizes = [(dt, array_bytes(f"{dt}[{dims}]")) for dt, dims in _ARRAY.findall(side)]
    whole = sum(b for _, b in sizes) or 1.0
    dtypes: dict[str, float] = {}
    for dt, b in sizes:
      dtypes[dt] = dtypes.get(dt, 0.0) + payload * b / whole
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    ops.append(CollectiveOp(kind, opcode, shape, operand_bytes, result_bytes, n, wire,
                            computation in loop_bodies, op_name.group(1) if op_name else "",
                            tuple(sorted(dtypes.items()))))
  return ops


def parse_collectives(hlo_text: str, num_devices: int) -> dict[str, CollectiveTotals]:
  """Per kind (all of KINDS, zero when absent): count, operand, result, payload and wire
  bytes per device, summed over `collective_ops` - each instruction once; collectives
  over one-device groups (no data moves) are left out."""
  totals = {k: CollectiveTotals() for k in KINDS}
  for op in collective_ops(hlo_text, num_devices):
    if op.group <= 1 and op.kind != "collective-permute":
      continue  # a group of one device moves nothing (XLA:CPU leaves some in)
    t = totals[op.kind]
    t.count += 1
    t.operand_bytes += op.operand_bytes
    t.result_bytes += op.result_bytes
    t.payload += op.payload
    t.wire_bytes += op.wire_bytes
    t.in_loops += op.in_loop
    for dt, b in op.dtypes:
      t.by_dtype[dt] = t.by_dtype.get(dt, 0.0) + b
  return totals


# --------------------------------------------------------------------- memory


def memory_summary(stats: Any) -> preflight.MemoryReport:
  """XLA's `CompiledMemoryStats` -> the pre-flight report (bytes per device; `.total` is
  the live peak: arguments + outputs not aliasing a donated input + temporaries + code)."""
  return preflight.MemoryReport(
      arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
      aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
      code=int(stats.generated_code_size_in_bytes))


def sharded_bytes(avals: Any, shardings: Any) -> int:
  """Per-device bytes of a pytree of arrays laid out by a matching pytree of shardings
  (the largest shard, i.e. what one device holds)."""
  leaves = jax.tree.leaves(avals)
  shards = jax.tree.leaves(shardings)
  if len(leaves) != len(shards):
    raise ValueError(f"{len(leaves)} arrays but {len(shards)} shardings")
  return int(sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                 for a, s in zip(leaves, shards)))


# ------------------------------------------------------------------- the models

# Active parameters of the LLM with top-2 of 4 experts, as the MoE-LLaVA model zoo
# lists them (billions); `moe_vlm.cost.real_config` is checked against these in the tests.
PAPER_ACTIVE_B = {"stablelm": 2.0, "qwen": 2.2, "phi2": 3.6}
VARIANT_NAMES = {"stablelm": "MoE-LLaVA-StableLM-1.6Bx4", "qwen": "MoE-LLaVA-Qwen-1.8Bx4",
                 "phi2": "MoE-LLaVA-Phi2-2.7Bx4"}


def tiny_config(moe: Optional[MoEConfig] = None) -> VLMConfig:
  """Seconds to compile; fp32 so gradient bytes are exactly parameter bytes."""
  vision = VisionConfig(variant="clip", image_size=28, patch_size=14, hidden_size=32,
                        intermediate_size=64, num_layers=2, num_heads=4)
  text = TextConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=8, num_kv_heads=8, moe=moe)
  return VLMConfig(vision=vision, text=text, image_token_id=255)


# ------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  mesh: Mapping[str, int]
  ep_impl: str = "gspmd"

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  def mesh_text(self) -> str:
    return "x".join(f"{a[0]}{n}" for a, n in self.mesh.items())


def default_layouts(devices: Sequence[int], num_experts: int,
                    first: bool = True) -> list[Layout]:
  """The layouts compiled for one expert count.

  For the first expert count: data, fsdp and model at every device count, expert
  parallelism (GSPMD and shard_map) wherever E is divisible, and two combinations at
  the largest count. For a further expert count only what E changes: expert
  parallelism (GSPMD) at every count, and data, fsdp, shard_map expert parallelism and
  fsdp x expert at the largest.
  """
  n = max(devices)
  out = []
  for k in devices:
    if first:
      out += [Layout("data", {"data": k}), Layout("fsdp", {"fsdp": k}),
              Layout("model (tensor)", {"model": k})]
    if num_experts % k == 0:
      out.append(Layout("expert gspmd", {"expert": k}))
      if first or k == n:
        out.append(Layout("expert shard_map", {"expert": k}, "shard_map"))
  if not first:
    out += [Layout("data", {"data": n}), Layout("fsdp", {"fsdp": n})]
  if n >= 8 and num_experts % 4 == 0:
    out.append(Layout("fsdp+expert", {"fsdp": n // 4, "expert": 4}))
  if first and n >= 8 and num_experts % 2 == 0:
    out.append(Layout("fsdp+model+expert", {"fsdp": n // 4, "model": 2, "expert": 2}))
  return out


TINY_LAYOUTS = (Layout("data", {"data": 4}), Layout("fsdp", {"fsdp": 4}),
                Layout("model (tensor)", {"model": 4}), Layout("expert gspmd", {"expert": 4}),
                Layout("expert shard_map", {"expert": 4}, "shard_map"))


# ------------------------------------------------------------------ measurement


@dataclasses.dataclass
class Row:
  layout: Layout
  num_experts: int
  memory: preflight.MemoryReport
  state: dict[str, int]          # per-device bytes: params, frozen, opt_state
  collectives: dict[str, CollectiveTotals]
  ops: list[CollectiveOp]
  predicted: dict[str, float]    # `cost.ici_bytes` for this layout: the estimate's formula

  @property
  def wire_bytes(self) -> float:
    return sum(t.wire_bytes for t in self.collectives.values())

  def as_dict(self) -> dict[str, Any]:
    return dict(layout=self.layout.name, mesh=dict(self.layout.mesh),
                ep_impl=self.layout.ep_impl, devices=self.layout.devices,
                experts=self.num_experts, memory=dataclasses.asdict(self.memory),
                peak=self.memory.total, state=self.state,
                collectives={k: dataclasses.asdict(v) for k, v in self.collectives.items()},
                wire_bytes=self.wire_bytes, predicted=self.predicted)


def _state_bytes(compiled: Any) -> dict[str, int]:
  """Per-device bytes of the TrainState argument's parts, from the compiled program's
  own input shardings."""
  state_avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                             compiled.args_info[0][0],
                             is_leaf=lambda x: hasattr(x, "donated"))
  state_shardings = compiled.input_shardings[0][0]
  return {part: sharded_bytes(getattr(state_avals, part), getattr(state_shardings, part))
          for part in ("params", "frozen", "opt_state")}


def measure(cfgs: Mapping[int, VLMConfig], layouts: Iterable[tuple[int, Layout]], *,
            batch: int, seq: int, train: str, out: Callable[[str], None],
            workers: Optional[int] = None) -> list[Row]:
  """Lower every (experts, layout) step serially, compile them in parallel, read them."""
  jobs = []
  t0 = time.perf_counter()
  for e, layout in layouts:
    cfg = cfgs[e]
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(
        cfg.text, moe=dataclasses.replace(cfg.text.moe, ep_impl=layout.ep_impl)))
    mesh = mesh_lib.make_mesh(dict(layout.mesh), jax.devices()[:layout.devices])
    jobs.append((e, layout, preflight.lower_train_step(cfg, mesh, batch_size=batch,
                                                       seq_len=seq, train=train)))
  on_cpu = jax.default_backend() == "cpu"
  t1 = time.perf_counter()
  compiled = common.compile_all([j[2] for j in jobs], workers)
  t2 = time.perf_counter()
  out(f"# lowered {len(jobs)} steps in {t1 - t0:.1f} s, compiled them in {t2 - t1:.1f} s")
  rows = []
  for (e, layout, _), c in zip(jobs, compiled):
    text = c.as_text()
    cfg = cfgs[e]
    ways = math.prod(layout.mesh.get(a, 1) for a in mesh_lib.BATCH_AXES)
    comm = cost.CommModel(act_bytes=4 if on_cpu else jnp.dtype(cfg.text.dtype).itemsize,
                     grad_reduce="all-reduce" if on_cpu else "reduce-scatter",
                     ep_impl=layout.ep_impl)
    rows.append(Row(layout, e, memory_summary(c.memory_analysis()), _state_bytes(c),
                    parse_collectives(text, layout.devices),
                    collective_ops(text, layout.devices),
                    cost.ici_bytes(cfg, train, layout.mesh, batch // ways, 1, seq, comm)))
  return rows


def _mib(x: float) -> str:
  return f"{x / MiB:9.1f}"


def format_table(rows: Sequence[Row]) -> list[str]:
  """One line per layout: memory per device, then each collective kind's payload per
  device (MiB) with its instruction count, then the bytes a device sends (ring
  algorithms) as read from the HLO and as `moe_vlm.cost.ici_bytes` predicts them."""
  head = (f"{'E':>2} {'layout':18s} {'dev':>3} {'mesh':12s} {'state':>9} {'args':>9} "
          f"{'temp':>9} {'peak':>9} | " +
          " ".join(f"{k:>14s}" for k in ("all-reduce", "all-gather", "reduce-scatter",
                                          "all-to-all", "permute")) +
          f" | {'sent':>9} {'formula':>9}")
  lines = ["memory per device and collective payload per device, MiB (count)", head,
           "-" * len(head)]
  for r in rows:
    state = sum(r.state.values())
    m = r.memory
    coll = " ".join(f"{r.collectives[k].payload / MiB:9.1f} ({r.collectives[k].count:2d})"
                    if r.collectives[k].count else f"{'-':>14s}" for k in KINDS)
    lines.append(f"{r.num_experts:2d} {r.layout.name:18s} {r.layout.devices:3d} "
                 f"{r.layout.mesh_text():12s} {_mib(state)} {_mib(m.arguments)} "
                 f"{_mib(m.temporaries)} {_mib(m.total)} | {coll} | {_mib(r.wire_bytes)} "
                 f"{_mib(r.predicted['total'])}")
  return lines


# ------------------------------------------------------------------------ CLI


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny config (seconds)")
  p.add_argument("--paper-estimate", action="store_true",
                 help="print the TPU v5e/v5p estimate for the real configs and exit")
  p.add_argument("--padded", action="store_true",
                 help="with --paper-estimate: every sequence padded to 2048, the einsum "
                 "attention and capacity 1.5 (the estimate before packing) instead of "
                 "packed rows, splash attention and dropless expert parallelism")
  p.add_argument("--variant", default="stablelm", choices=sorted(VARIANT_NAMES))
  p.add_argument("--layers", type=int, default=2,
                 help="decoder layers kept (MoE in every other one, from layer 0)")
  p.add_argument("--vision-layers", type=int, default=2, help="CLIP layers kept")
  p.add_argument("--experts", default="4,8", help="expert counts, comma separated")
  p.add_argument("--devices", default="2,4,8", help="device counts, comma separated")
  p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
  p.add_argument("--seq", type=int, default=2048, help="sequence length")
  p.add_argument("--train", default="moe_layers", choices=stages_lib.PRESETS,
                 help="trainable set (stage preset); default: stage 3")
  p.add_argument("--layouts", default="", help="only layouts whose name contains one of "
                 "these comma-separated words")
  p.add_argument("--workers", type=int, default=0, help="parallel compiles (0: cores)")
  p.add_argument("--top", type=int, default=0,
                 help="also list each layout's N largest collectives (what moves)")
  p.add_argument("--device-note", default="")
  a = p.parse_args(argv)
  if a.paper_estimate:
    return paper_estimate(out, packed=not a.padded)
  experts = [int(x) for x in a.experts.split(",")]
  devices = [int(x) for x in a.devices.split(",")]
  if a.tiny:
    devices, experts = [4], [4]
    a.batch, a.seq, a.train = 8, 32, "projector_llm"
  have = len(jax.devices())
  if max(devices) > have:
    out(f"# only {have} devices: dropping device counts above it (run as a script, or set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported)")
    devices = [n for n in devices if n <= have]
  if a.tiny:
    cfgs = {e: tiny_config(MoEConfig(num_experts=e, group_size=1)) for e in experts}
  else:
    cfgs = {e: cost.real_config(a.variant, cost.moe_llava_moe(e, group_size=1),
                                layers=a.layers, vision_layers=a.vision_layers)
            for e in experts}
  words = [w for w in a.layouts.split(",") if w]
  if a.tiny:
    jobs = [(experts[0], layout) for layout in TINY_LAYOUTS]
  else:
    jobs = [(e, layout) for i, e in enumerate(experts)
            for layout in default_layouts(devices, e, first=i == 0)]
  jobs = [(e, l) for e, l in jobs if not words or any(w in l.name for w in words)]
  cfg = cfgs[experts[0]]
  common.print_header(out, "bench.scaling", a.tiny, a.device_note)
  t = cfg.text
  out(f"# model: {'tiny' if a.tiny else VARIANT_NAMES[a.variant]}, decoder {t.num_layers} of "
      f"its layers (MoE in {list(t.moe_layers())}), vision {cfg.vision.num_layers} layers, "
      f"hidden {t.hidden_size}, FFN {t.intermediate_size}, vocab {t.vocab_size}, "
      f"{t.dtype} compute / {t.param_dtype} params, remat={t.remat}, top-{t.moe.top_k} "
      f"capacity {t.moe.capacity_factor} (one routing group per sequence)")
  out(f"# step: global batch {a.batch} x {a.seq} tokens ({cfg.num_image_tokens} image "
      f"tokens each), trainable set {a.train!r}, AdamW, grad_accum 1")
  rows = measure(cfgs, jobs, batch=a.batch, seq=a.seq, train=a.train, out=out,
                 workers=a.workers or None)
  for line in format_table(rows):
    out(line)
  for r in rows if a.top else ():
    out(f"## E={r.num_experts} {r.layout.name} {r.layout.mesh_text()}: largest collectives")
    for op in sorted(r.ops, key=lambda o: -o.payload)[:a.top]:
      out(f"  {op.kind:18s} {op.payload / MiB:8.1f} MiB  group {op.group}  {op.shape[:60]:60s} "
          f"{op.op_name[:70]}")
  return {"rows": [r.as_dict() for r in rows], "experts": experts, "devices": devices}


# ------------------------------------------------------------- paper estimate


ESTIMATE_TOPOLOGIES = ("v5e-16", "v5e-64", "v5e-256", "v5p-128")


# Packed rows of the real variants: which mix of bench.packing each stage's lengths
# follow (stage 2's mix is not in the paper; stage 3's, LLaVA-mix-665k, stands in).
PACKING_MIX = {1: 1, 2: 3, 3: 3}


@functools.lru_cache(maxsize=16)
def packed_rows(stage: int, image_tokens: int, seq: int = 2048, samples: int = 4000,
                seed: int = 0) -> dict[str, float]:
  """First-fit packing (`moe_vlm.data.packing.first_fit`, the trainer's settings) of
  `samples` lengths drawn from bench.packing's mix of the stage (image samples:
  `image_tokens` + text): `fill` = real tokens / row tokens, `pairs` = sum over a row's
  samples of len^2 / seq^2 (the attention the samples need, per row), samples and images
  per row, and the image slots a row has (all of them go through the tower)."""
  from bench import packing as bench_packing
  from moe_vlm.data import packing as packing_lib
  rng = np.random.default_rng([seed, stage])
  stage_mix = bench_packing.STAGES[PACKING_MIX[stage]]
  text, images, _ = bench_packing.text_lengths(stage_mix, samples, rng,
                                               seq - image_tokens - 1)
  lengths = np.minimum(text + images * image_tokens, seq)
  cfg = packing_lib.PackingConfig(
      "first_fit", max_length=seq,
      images_per_row=packing_lib.default_images_per_row(seq, image_tokens))
  rows = packing_lib.first_fit(rng.permutation(samples), lengths, images.astype(np.int8), cfg)
  return dict(fill=float(lengths.sum() / (len(rows) * seq)),
              pairs=float(sum((lengths[r].astype(np.float64) ** 2).sum() for r in rows)
                          / (len(rows) * seq * seq)),
              per_row=samples / len(rows), mean=float(lengths.mean()),
              images=float(images.sum() / len(rows)), slots=cfg.images_per_row)


def estimate_row(variant: str, topology: str, stage: int, seq: int = 2048,
                 packed: bool = False) -> dict[str, Any]:
  """Step time and MFU of one stage of one variant on one topology preset (every count
  from `moe_vlm.cost`).

  `packed`: the trainer as configs/moe_llava.py now runs it: rows of `seq` tokens packed
  first-fit with several samples (`packed_rows`), Pallas splash attention (no L x L
  matrix through HBM; it computes the causal blocks of the whole row, other samples'
  blocks included, as the einsum path's causal query blocks count them), and stage 3
  dropless (a grouped matmul on the routed rows, no capacity buffers) with expert
  parallelism by shard_map and the ragged all-to-all (only the routed rows travel).
  Model FLOPs then count the real tokens only: decoder weights x fill, attention on each
  sample's own length (sum len^2, not seq^2), the tower and projector on the row's real
  images; executed FLOPs are those of the whole rows, and of every image slot of a row
  (the tower encodes empty slots too). MFU = model FLOPs / (step x chips x peak);
  tokens/s/chip counts real tokens."""
  topo = topologies.get(topology)
  chip = cost.CHIPS[topo.generation]
  batch = topologies.MOE_LLAVA_BATCH[stage]
  accum = topologies.grad_accum(topo, batch)
  micro = topologies.per_chip_batch(topo, batch)
  if stage != 3:
    moe = None
  elif packed:
    moe = cost.moe_llava_moe(4, dispatch="dropless", group_size=None, ep_impl="shard_map")
  else:
    moe = cost.moe_llava_moe(4, group_size=4)
  cfg = cost.real_config(variant, moe)
  train = cost.STAGE_TRAIN[stage]
  fl = dict(cost.train_step_flops(cfg, train, batch, seq, backend="tpu"))
  comm_model = cost.CommModel(ep_impl="shard_map") if packed else cost.CommModel()
  comm = cost.ici_bytes(cfg, train, topo.mesh, micro, accum, seq, comm_model)
  rows = None
  if packed:
    rows = packed_rows(stage, cfg.num_image_tokens, seq)
    per_image = fl["vision"] + fl["projector"]  # train_step_flops: one image per row
    fl["hardware"] += (rows["slots"] - 1) * per_image
    for part in ("vision", "projector"):
      fl[part] *= rows["images"]
    for part in ("attention", "ffn", "lm_head"):
      fl[part] *= rows["fill"]
    fl["attention_scores"] *= rows["pairs"]
    fl["model"] = sum(fl[k] for k in cost.MODEL_PARTS)
    fl["tokens"] *= rows["fill"]
    attn_hbm = 0.0  # splash: the scores stay in VMEM
  else:
    attn_hbm = cost.attention_hbm_bytes(cfg, train, batch, seq) / topo.chips
  t_matmul = fl["hardware"] / (topo.chips * chip.peak_flops)
  t_softmax = attn_hbm / chip.hbm_bw
  t_ici = comm["total"] / chip.ici_send_bw
  overlap = max(t_matmul + t_softmax, t_ici)
  serial = t_matmul + t_softmax + t_ici
  mem = topologies.estimate_memory(variant, topo, stage, global_batch=batch, seq_len=seq)
  ideal = fl["model"] / (topo.chips * chip.peak_flops)
  return dict(variant=variant, topology=topology, stage=stage, chips=topo.chips,
              mesh=dict(topo.mesh), batch=batch, accum=accum, micro=micro,
              model_flops=fl["model"], hardware_flops=fl["hardware"],
              flops_per_token=fl["model"] / fl["tokens"], flops=fl,
              t_matmul=t_matmul, t_softmax=t_softmax, t_ici=t_ici, ici=comm,
              step_overlap=overlap, step_serial=serial, mfu_overlap=ideal / overlap,
              mfu_serial=ideal / serial, hbm_gib=mem["total"], hbm_cap_gib=topo.hbm_gib,
              tokens_per_s_chip=fl["tokens"] / overlap / topo.chips, packed=packed,
              packing=rows)



def paper_estimate(out: Callable[[str], None] = print,
                   variants: Sequence[str] = ("stablelm", "qwen", "phi2"),
                   topology_names: Sequence[str] = ESTIMATE_TOPOLOGIES,
                   stages: Sequence[int] = (1, 2, 3), packed: bool = False) -> dict:
  """The TPU estimate of BENCHMARKS.md: arithmetic only, every input printed. `packed`:
  on real tokens, with packing, splash attention and dropless expert parallelism
  (`estimate_row`)."""
  for gen in dict.fromkeys(topologies.get(t).generation for t in topology_names):
    c = cost.CHIPS[gen]
    out(f"# {c.name}: {c.peak_flops / 1e12:.0f} TFLOP/s bf16, HBM {c.hbm_bytes / GiB:.0f} GiB "
        f"at {c.hbm_bw / 1e9:.0f} GB/s, ICI {c.ici_bw / 1e9:.0f} GB/s bidirectional per chip "
        f"({c.ici_ports} ports): {c.ici_send_bw / 1e9:.0f} GB/s sent")
  if packed:
    out("# rows of 2048 tokens packed first-fit with several samples (bench.packing's "
        "length mixes with 576-token images; stage 2 takes stage 3's mix), splash "
        "attention (no softmax through HBM; the causal blocks of the whole row computed), "
        "stage 3: 4 experts top-2 dropless, expert parallelism by shard_map + ragged "
        "all-to-all; model FLOPs, MFU and tok/s on real tokens; bf16 compute, fp32 params "
        "and AdamW, remat full")
    for stage in stages:
      r = packed_rows(stage, 576)
      out(f"#   stage {stage}: {r['per_row']:.2f} samples ({r['images']:.2f} images, "
          f"{r['slots']} slots) per row, mean {r['mean']:.0f} tokens, fill {r['fill']:.3f}, "
          f"attention pairs sum(len^2)/L^2 {r['pairs']:.3f}")
  else:
    out("# sequences of 2048 tokens (padded), one 336 px image (576 tokens) each; stage 3: "
        "4 experts top-2, capacity 1.5, routing groups of 4 sequences; bf16 compute, fp32 "
        "params and AdamW, remat full")
  out("# columns: mesh data.fsdp.model.expert; st stage; acc gradient accumulation; "
      "b/chip sequences per chip per micro-batch; GFLOP/tok model FLOPs per token; hw/model "
      "executed / model FLOPs; matmul s = executed FLOPs at peak; softmax s = L x L "
      "attention traffic at HBM bandwidth; ICI GB sent per chip per step and its time; "
      "step s = max(matmul + softmax, ICI) (communication overlapped); MFU = model FLOPs / "
      "(step s x chips x peak); MFU ser = the same with nothing overlapped; HBM GiB = "
      "configs/topologies.py estimate_memory / capacity")
  rows = []
  for variant in variants:
    cfg = cost.real_config(variant, cost.moe_llava_moe(4))
    t = cfg.text
    w = cost.matmul_weights(cfg).active(t.moe.top_k)
    active = w["attention"] + w["ffn"] + w["lm_head"]
    out(f"## {VARIANT_NAMES[variant]}: decoder {t.num_layers} x {t.hidden_size}, FFN "
        f"{t.intermediate_size}, {t.num_heads} heads, vocab {t.vocab_size}; "
        f"{len(t.moe_layers())} MoE layers; active decoder + lm_head matmul weights "
        f"{active / 1e9:.2f} B")
    out(f"{'topology':9s} {'mesh d.f.m.e':12s} {'st':>2} {'acc':>3} {'b/chip':>6} "
        f"{'GFLOP/tok':>9} {'hw/model':>8} {'matmul s':>8} {'softmax s':>9} {'ICI GB':>7} "
        f"{'ICI s':>6} {'step s':>7} {'MFU':>6} {'MFU ser':>7} {'tok/s/chip':>10} "
        f"{'HBM GiB':>9}")
    for topo in topology_names:
      for stage in stages:
        r = estimate_row(variant, topo, stage, packed=packed)
        rows.append(r)
        mesh = ".".join(str(r["mesh"][a]) for a in ("data", "fsdp", "model", "expert"))
        out(f"{topo:9s} {mesh:12s} {stage:2d} {r['accum']:3d} {r['micro']:6d} "
            f"{r['flops_per_token'] / 1e9:9.2f} {r['hardware_flops'] / r['model_flops']:8.2f} "
            f"{r['t_matmul']:8.2f} {r['t_softmax']:9.2f} {r['ici']['total'] / 1e9:7.1f} "
            f"{r['t_ici']:6.2f} {r['step_overlap']:7.2f} {100 * r['mfu_overlap']:5.1f}% "
            f"{100 * r['mfu_serial']:6.1f}% {r['tokens_per_s_chip']:10.0f} "
            f"{r['hbm_gib']:5.1f}/{r['hbm_cap_gib']:g}")
    for stage in stages:  # the FLOP formula's parts do not depend on the topology
      f = next(r["flops"] for r in rows if r["variant"] == variant and r["stage"] == stage)
      shown = dict(vision=f["vision"], projector=f["projector"],
                   attention=f["attention"] + f["attention_scores"], ffn=f["ffn"],
                   lm_head=f["lm_head"], remat=f["remat"], capacity_padding=f["expert_extra"])
      parts = ", ".join(f"{k} {v / f['tokens'] / 1e9:.2f}" for k, v in shown.items())
      out(f"  stage {stage} GFLOP per token: {parts} (model {f['model'] / f['tokens'] / 1e9:.2f}"
          f", executed {f['hardware'] / f['tokens'] / 1e9:.2f})")
  return {"rows": rows}


if __name__ == "__main__":
  main(sys.argv[1:])
