"""Where a model's parameters live, and how they get there without a whole copy.

The scale rules of this project, for every caller (init, import, upcycling, hand-off,
export):
- a parameter is created directly on its sharding (its logical axes through the mesh
  rules): random init runs under `jit` with `out_shardings`, host data enters through
  `jax.make_array_from_callback`, where each process supplies only the slices its own
  devices hold;
- a host copy is made one tensor at a time (`host_value`), for export only;
- nothing calls `device_get` / `np.asarray` on a global array: on a pod slice, a
  process can only read the shards its own devices hold.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from moe_vlm.models.config import VLMConfig
from moe_vlm.models.params import ParamCodec, Params
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib


@functools.lru_cache(maxsize=16)
def abstract_codec(cfg: VLMConfig) -> ParamCodec:
  """The VLM's parameter names, shapes and logical axes, without allocating any."""
  return ParamCodec.abstract(lambda: VLM(cfg, rngs=nnx.Rngs(0)))


def shardings(cfg: VLMConfig, mesh: Mesh,
              rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES) -> dict[str, NamedSharding]:
  """Every parameter's NamedSharding on `mesh`, from the logical axes it declares."""
  codec = abstract_codec(cfg)
  return mesh_lib.param_shardings(codec.logical_axes, codec.shapes, mesh, rules)


def init_params(cfg: VLMConfig, mesh: Mesh, seed: int, names: Optional[Iterable[str]] = None,
                rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES) -> Params:
  """Random initial parameters (all, or only `names`), each created on its sharding.

  The model is built inside `jit`, so no device ever holds more than its shards; the
  parameters not asked for are dead code XLA removes. Values do not depend on the mesh
  (JAX's partitionable threefry), so every mesh starts from the same model.
  """
  codec = abstract_codec(cfg)
  wanted = list(codec.names) if names is None else [n for n in codec.names if n in set(names)]
  sh = shardings(cfg, mesh, rules)

  def build() -> Params:
    model = VLM(cfg, rngs=nnx.Rngs(seed))
    flat = codec.flatten(model)
    return {n: flat[n] for n in wanted}

  return jax.jit(build, out_shardings={n: sh[n] for n in wanted})()


def from_host(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding,
              read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
  """A global array whose shards are read from the host: `read(index)` is called only
  for the slices this process's devices hold (a lazily read source, e.g. a memory-mapped
  safetensors file, then reads only those bytes)."""
  dtype = np.dtype(dtype)
  return jax.make_array_from_callback(
      tuple(shape), sharding, lambda index: np.asarray(read(index), dtype=dtype))


def place(params: Mapping[str, Any], target: Mapping[str, NamedSharding]) -> Params:
  """Host (numpy) or device arrays onto their target shardings, one tensor at a time.
  Host arrays must hold the same values in every process (as a file read by each)."""
  out = {}
  for name, value in params.items():
    if isinstance(value, jax.Array):
      out[name] = jax.device_put(value, target[name])
    else:
      value = np.asarray(value)
      out[name] = from_host(value.shape, value.dtype, target[name],
                            lambda index, v=value: v[index])
  return out


def host_value(x: jax.Array) -> np.ndarray:
  """One tensor as a host numpy array. A global array spanning other processes is
  all-gathered, so every process must call this for the same tensors in the same order
  (export streams the model through it one tensor at a time)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_shards[0].data)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_process_local(x: Any) -> bool:
  return not isinstance(x, jax.Array) or x.is_fully_addressable
