"""Models <-> flat dicts of arrays keyed by dotted parameter path.

Train steps, optimizers and checkpoints work on a flat `{"llm.layers.0.attn.query.kernel":
array}` dict: pure data with string keys that masks, shardings and Orbax all read the
same way. `ParamCodec` remembers the module structure to rebuild the NNX model (also
under jit, where merging is just pytree plumbing).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from flax import nnx

Params = dict[str, jax.Array]


def path_name(path: tuple[Any, ...]) -> str:
  return ".".join(str(p) for p in path)


class ParamCodec:
  """Flattens a model's parameters and rebuilds the model from a flat dict."""

  def __init__(self, model: nnx.Module):
    self.graphdef, state = nnx.split(model)
    self._template = list(nnx.to_flat_state(state))
    non_params = [path_name(p) for p, v in self._template if not isinstance(v, nnx.Param)]
    if non_params:
      raise TypeError(f"model holds non-parameter state {non_params[:3]}; ParamCodec "
                      "expects parameters only")
    self.names = [path_name(p) for p, _ in self._template]
    self.logical_axes = {path_name(p): tuple(v.get_metadata().get("out_sharding") or
                                             (None,) * len(v.shape))
                         for p, v in self._template}
    self.shapes = {path_name(p): jax.ShapeDtypeStruct(v.shape, v.dtype)
                   for p, v in self._template}

  @classmethod
  def abstract(cls, build: Callable[[], nnx.Module]) -> "ParamCodec":
    """Codec from a model constructor, without allocating parameters."""
    return cls(nnx.eval_shape(build))

  def flatten(self, model: nnx.Module) -> Params:
    return {path_name(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model))}

  def merge(self, params: Mapping[str, jax.Array]) -> nnx.Module:
    missing = [n for n in self.names if n not in params]
    if missing:
      raise KeyError(f"params lack {len(missing)} entries, e.g. {missing[:3]}")
    flat = [(p, v.replace(value=params[path_name(p)])) for p, v in self._template]
    return nnx.merge(self.graphdef, nnx.from_flat_state(flat))
