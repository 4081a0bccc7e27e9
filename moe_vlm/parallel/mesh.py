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


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, model, expert) mesh; `jax.make_mesh` picks a topology-aware order."""
  devices = list(devices) if devices is not None else jax.devices()
  sizes = resolve_shape(shape, len(devices))
  dims = tuple(sizes[a] for a in MESH_AXES)
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(dims, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=auto)


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
