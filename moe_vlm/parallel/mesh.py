"""Device mesh, logical-axis rules and shardings.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params and
optimizer state), `model` (tensor parallel) and `expert` (experts sharded; tokens
travel to them). Modules only name logical axes (`embed`, `mlp`, `heads`, `expert`,
...); the rules below, which a config may override, decide which mesh axes each one
uses. Change the rules, change the layout - no module is touched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model", "expert")
# The batch is split over every axis that does not split the weights it meets, as
# DeepSpeed and MaxText do: non-MoE layers see data x fsdp x expert ways of batch.
BATCH_AXES = ("data", "fsdp", "expert")

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("embed_out", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("expert", "expert"),
    ("norm", None),
    # activations
    ("batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_vocab", "model"),
    # tokens inside an expert's buffer: split over the batch axes the expert axis left
    ("expert_tokens", ("data", "fsdp")),
)


class MeshError(ValueError):
  """Mesh shape or layout incompatible with the devices or the model."""


def resolve_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills at most one -1 axis so the product equals the device count."""
  unknown = [k for k in shape if k not in MESH_AXES]
  if unknown:
    raise MeshError(f"mesh axes {unknown} unknown; expected a subset of {MESH_AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {free}")
  bad = [a for a, n in sizes.items() if n == 0 or n < -1]
  if bad:
    raise MeshError(f"mesh: axes {bad} must be positive (or one of them -1)")
  known = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % known:
      raise MeshError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} slots but there are "
                    f"{num_devices} devices; the product of the axes must equal it")
  return sizes


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None,
              dcn: Optional[Mapping[str, int]] = None) -> Mesh:
  """A (data, fsdp, model, expert) mesh; `jax.make_mesh` picks a topology-aware order.

  `dcn` (MaxText's dcn_*_parallelism) splits axes over groups of whole processes: axis
  `a` becomes dcn[a] process groups times shape[a] / dcn[a] devices within a process.
  Use it to say which axes cross hosts (multi-slice, or a test that needs an axis to
  span processes); all 1 (the default) leaves the order to `jax.make_mesh`.
  """
  devices = list(devices) if devices is not None else jax.devices()
  sizes = resolve_shape(shape, len(devices))
  dims = tuple(sizes[a] for a in MESH_AXES)
  auto = (AxisType.Auto,) * len(MESH_AXES)
  dcn = {a: int((dcn or {}).get(a, 1)) for a in MESH_AXES}
  if any(n != 1 for n in dcn.values()):
    return Mesh(_hybrid_devices(sizes, dcn, devices), MESH_AXES, axis_types=auto)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(dims, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=auto)


def _hybrid_devices(sizes: Mapping[str, int], dcn: Mapping[str, int],
                    devices: Sequence[jax.Device]) -> np.ndarray:
  from jax.experimental import mesh_utils

  bad = [a for a in MESH_AXES if dcn[a] < 1 or sizes[a] % dcn[a]]
  if bad:
    raise MeshError(f"mesh.dcn.{bad[0]}={dcn[bad[0]]} does not divide mesh.{bad[0]}="
                    f"{sizes[bad[0]]}")
  groups = math.prod(dcn.values())
  processes = len({d.process_index for d in devices})
  if groups != processes:
    raise MeshError(f"mesh.dcn {dict(dcn)} makes {groups} process groups but the devices "
                    f"belong to {processes} processes")
  ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
  return mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in MESH_AXES),
                                              devices=devices, process_is_granule=True)


def axes_across_processes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes along which devices of different processes (hosts) meet: an array split
  over one of these is never whole on any host."""
  owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
  out = []
  for i, name in enumerate(mesh.axis_names):
    lines = np.moveaxis(owner, i, -1).reshape(-1, owner.shape[i])
    if any(len(set(line)) > 1 for line in lines):
      out.append(name)
  return tuple(out)


def describe(mesh: Mesh) -> str:
  """`data=2 fsdp=2 model=1 expert=1 (across processes: fsdp)`, for the run log."""
  across = axes_across_processes(mesh)
  shape = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
  return f"{shape} (across processes: {', '.join(across) or 'none'})"


def logical_to_spec(axes: Sequence[Optional[str]], rules: Rules = DEFAULT_RULES) -> P:
  """Logical axis names -> PartitionSpec; a mesh axis is used at most once per array."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in axes:
    target = table.get(name) if name is not None else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    used.update(mesh_axes)
    out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*out)


def axis_size(mesh: Mesh, entry: Any) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def param_shardings(logical_axes: Mapping[str, tuple], shapes: Mapping[str, Any], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> dict[str, NamedSharding]:
  """NamedSharding per parameter; a dimension the mesh cannot split evenly is an error."""
  out = {}
  for name, axes in logical_axes.items():
    spec = logical_to_spec(axes, rules)
    shape = shapes[name].shape
    for dim, (size, entry) in enumerate(zip(shape, spec)):
      n = axis_size(mesh, entry)
      if size % n:
        raise MeshError(
            f"parameter {name} dim {dim} ({axes[dim]}={size}) is not divisible by mesh "
            f"axes {entry} of size {n}; change the mesh or the logical-axis rules")
    out[name] = NamedSharding(mesh, spec)
  return out


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def process_rows(mesh: Mesh, global_batch: int, rules: Rules = DEFAULT_RULES) -> tuple[int, ...]:
  """The rows of a batch-sharded [global_batch, ...] array that this process's devices
  hold: what its input pipeline must load (and nothing more)."""
  index = batch_sharding(mesh, 1, rules).addressable_devices_indices_map((global_batch,))
  return tuple(sorted({r for i in index.values() for r in range(*i[0].indices(global_batch))}))


def assemble_batch(local: np.ndarray, rows: Sequence[int], global_batch: int, mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> jax.Array:
  """The global batch array from this process's `rows` of it (`local[i]` is row
  `rows[i]`), split over the batch axes; processes never exchange the data."""
  position = {r: i for i, r in enumerate(rows)}
  sharding = batch_sharding(mesh, local.ndim, rules)

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    wanted = [position[r] for r in range(*index[0].indices(global_batch))]
    return local[wanted][(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback((global_batch,) + local.shape[1:], sharding, shard)


def place_batch(x: np.ndarray, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> jax.Array:
  """A host batch that every process holds whole (prompts, eval questions) as a global
  array: split over the batch axes when they divide it, else replicated. Each device
  takes its slice of the host copy, so processes never exchange the data."""
  x = np.asarray(x)
  ways = axis_size(mesh, BATCH_AXES)
  sharding = (batch_sharding(mesh, x.ndim, rules) if x.shape[0] % ways == 0 else
              NamedSharding(mesh, P()))
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def check_model_fits_mesh(cfg: Any, mesh: Mesh, global_batch: Optional[int] = None) -> None:
  """Named errors for the common mismatches, before any parameter is sharded."""
  text = getattr(cfg, "text", cfg)
  moe = getattr(text, "moe", None)
  if moe is not None and moe.num_experts % mesh.shape["expert"]:
    raise MeshError(f"moe.num_experts={moe.num_experts} is not divisible by the expert axis "
                    f"({mesh.shape['expert']})")
  m = mesh.shape["model"]
  for field in ("num_heads", "num_kv_heads"):
    value = getattr(text, field)
    if value % m:
      raise MeshError(f"text.{field}={value} is not divisible by the model axis ({m})")
  if global_batch is not None:
    ways = axis_size(mesh, BATCH_AXES)
    if global_batch % ways:
      raise MeshError(f"global batch {global_batch} is not divisible by data x fsdp x expert "
                      f"= {ways}")


# ------------------------------------------------------------ activation constraints

_ACTIVE: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """While tracing under this context, `constrain()` pins activations to the mesh."""
  _ACTIVE.append((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.pop()


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside `activation_sharding`."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def current_mesh() -> Optional[Mesh]:
  return _ACTIVE[-1][0] if _ACTIVE else None
