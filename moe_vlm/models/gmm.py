"""Grouped matmul whose cost is proportional to the rows, in plain jax.lax.

`gmm(lhs [N, K], rhs [E, K, M], group_sizes [E]) -> [N, M]` multiplies each row of
`lhs` by the weights of its group; rows are sorted by group, group e holding
`group_sizes[e]` consecutive rows, as for `jax.lax.ragged_dot`. Rows past
sum(group_sizes) give zeros.

Why: XLA:CPU has no ragged-dot kernel, and jax lowers `ragged_dot` there by masking the
[N, K] operand into [E, N, K] and contracting with all E experts, E times the useful
FLOPs in the forward pass and in both transposes. TPU and GPU lower it natively, so
`resolve_impl("auto")` keeps `ragged_dot` there and picks this one on CPU.

How (the design of MaxText's megablox gmm/tgmm, without Pallas): a loop over groups,
and inside it a loop over row blocks of `block_size` rows starting at the group's
first row. Each block is one [b, K] @ [K, M] matmul with that group's weights; rows of
the block outside the group (the tail of the last block runs into the next group) are
masked out of the result. So the rows computed are sum_e ceil(g_e / b) * b
<= N + E * (b - 1), and no padded copy of the operands is made. The loop bounds are
data-dependent (`fori_loop` with traced bounds, i.e. a while loop), which is why the
gradient is a `custom_vjp`: its backward is again grouped,

  dlhs = gmm(dout, rhs^T)                    (same kernel, rhs contracted on M)
  drhs[e] = lhs_e^T @ dout_e = tgmm(lhs, dout)  (per-group accumulation over blocks).

Scratch measurements on the 2-core CPU (N=4096, 512 x 1408, 4 experts) preferred this
group-major loop to a padded layout (rows scattered to block-aligned group starts, then
a scan over blocks indexing the weights dynamically, or one batched einsum with the
weights gathered per block): the padded variants copy and scatter the operands, the
scan always runs the worst-case block count, and the gathered weights are
[blocks, K, M]. Block sizes 64-512 measured alike; 128 keeps the padding waste small
(E * 64 rows on average).

XLA's `cost_analysis()` counts a while loop's body once, so it under-reports this
kernel's FLOPs; count them as 2 * rows * K * M.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

IMPLS = ("auto", "ragged_dot", "blocked")
DEFAULT_BLOCK_SIZE = 128


def resolve_impl(impl: str, backend: Optional[str] = None) -> str:
  """"auto" -> "blocked" on CPU (ragged_dot is lowered densely there), else "ragged_dot"."""
  if impl not in IMPLS:
    raise ValueError(f"moe.gmm_impl={impl!r}: expected one of {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  return "blocked" if (backend or jax.default_backend()) == "cpu" else "ragged_dot"


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array, *, impl: str = "auto",
                   block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """`ragged_dot(lhs, rhs, group_sizes)` by the implementation `impl` names."""
  if resolve_impl(impl) == "ragged_dot":
    return lax.ragged_dot(lhs, rhs, group_sizes)
  return gmm(lhs, rhs, group_sizes, block_size=block_size)


def _check(lhs: Array, rhs: Array, group_sizes: Array, block_size: int) -> None:
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
    raise ValueError(f"gmm: expected lhs [N, K], rhs [E, K, M], group_sizes [E]; got "
                     f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
  if lhs.shape[1] != rhs.shape[1] or group_sizes.shape[0] != rhs.shape[0]:
    raise ValueError(f"gmm: lhs {lhs.shape}, rhs {rhs.shape} and group_sizes "
                     f"{group_sizes.shape} disagree on K or E")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"gmm: group_sizes must be integers, got {group_sizes.dtype}")
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"gmm: block_size={block_size!r}: expected a positive int")


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *,
        block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """lhs [N, K] (rows sorted by group), rhs [E, K, M], group_sizes [E] -> [N, M].

  Same result as `jax.lax.ragged_dot`, at a cost proportional to N; differentiable
  w.r.t. lhs and rhs (reverse mode).
  """
  _check(lhs, rhs, group_sizes, block_size)
  lhs, rhs, group_sizes = _vary_together(lhs, rhs, group_sizes.astype(jnp.int32))
  return _gmm(lhs, rhs, group_sizes, block_size, False)


def tgmm(lhs: Array, dout: Array, group_sizes: Array, *,
         block_size: int = DEFAULT_BLOCK_SIZE) -> Array:
  """The "transposed" grouped matmul: out[e] = lhs_e^T @ dout_e.

  lhs [N, K], dout [N, M] (rows sorted by group), group_sizes [E] -> [E, K, M]; rows
  past sum(group_sizes) are ignored, an empty group gives zeros. This is the weight
  gradient of `gmm`. Not differentiable itself.
  """
  if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
    raise ValueError(f"tgmm: expected lhs [N, K] and dout [N, M]; got {lhs.shape}, "
                     f"{dout.shape}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"tgmm: group_sizes must be an integer vector [E], got "
                     f"{group_sizes.shape} {group_sizes.dtype}")
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"tgmm: block_size={block_size!r}: expected a positive int")
  return _tgmm(lhs, dout, group_sizes.astype(jnp.int32), block_size)


# ------------------------------------------------------------------------- kernels


def _group_bounds(group_sizes: Array, n: int) -> tuple[Array, Array]:
  """[start, end) row range of each group, clipped to the N rows that exist."""
  ends = jnp.minimum(jnp.cumsum(group_sizes), n)
  starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
  return starts, jnp.maximum(ends, starts)


def _vary_together(*xs: Array) -> tuple[Array, ...]:
  """Each of `xs` made to vary over the manual mesh axes of all of them (shard_map).

  A custom_vjp's backward must return each cotangent with its input's type: under
  shard_map the weight gradient computed from the rows varies over the batch axes,
  while the weights vary over `expert` only. Widening the inputs here, outside the
  custom_vjp, lets autodiff transpose the widening into the psum the weight gradient
  needs. Adding a zero is the widening (`zeros_like` keeps the axes of its argument);
  XLA drops the addition. Outside shard_map nothing varies and nothing changes.
  """
  out = []
  for x in xs:
    zero = sum(jnp.zeros_like(o, shape=(), dtype=x.dtype) for o in xs)
    out.append(x + zero)
  return tuple(out)


def _zeros(shape: tuple[int, ...], dtype, *like: Array) -> Array:
  """Zeros that vary over the same manual mesh axes as `like` together.

  Inside shard_map a loop carry must keep its type, and what the loop body writes
  into it varies over the axes its operands do (the rows over the batch axes, the
  weights over `expert`); `zeros_like` carries that over, `jnp.zeros` would not.
  """
  seed = sum(jnp.zeros_like(x, shape=()) for x in like)
  return jnp.zeros_like(seed, shape=shape, dtype=dtype)


def _num_blocks(start: Array, end: Array, block: int) -> Array:
  return (end - start + block - 1) // block


def _block(start: Array, end: Array, j: Array, n: int, block: int) -> tuple[Array, Array]:
  """First row and row mask of block j of the group [start, end).

  The block starts at start + j*b, moved back to n - b if it would run past the last
  row (`dynamic_slice` would clamp it anyway; doing it here keeps the mask right).
  The mask keeps the block's rows that belong to the group and were not covered by an
  earlier block of it, so every row of the group is used exactly once.
  """
  first = start + j * block
  r0 = jnp.minimum(first, n - block)
  rows = r0 + jnp.arange(block)
  return r0, (rows >= first) & (rows < end)


def _gmm_impl(lhs: Array, rhs: Array, group_sizes: Array, block_size: int,
              transpose_rhs: bool) -> Array:
  """lhs [N, K] x rhs [E, K, M] (or [E, M, K] with `transpose_rhs`) -> [N, M]."""
  n = lhs.shape[0]
  m = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.result_type(lhs, rhs)
  out = _zeros((n, m), out_dtype, lhs, rhs, group_sizes)
  if n == 0:
    return out
  b = min(block_size, n)
  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
  starts, ends = _group_bounds(group_sizes, n)

  def group(e, out):
    w = lax.dynamic_index_in_dim(rhs, e, keepdims=False)  # once per group, not per block

    def block(j, out):
      r0, keep = _block(starts[e], ends[e], j, n, b)
      x = lax.dynamic_slice_in_dim(lhs, r0, b)
      y = lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)
      old = lax.dynamic_slice_in_dim(out, r0, b)
      new = jnp.where(keep[:, None], y.astype(out_dtype), old)
      return lax.dynamic_update_slice_in_dim(out, new, r0, 0)

    return lax.fori_loop(0, _num_blocks(starts[e], ends[e], b), block, out)

  return lax.fori_loop(0, group_sizes.shape[0], group, out)


def _tgmm(lhs: Array, dout: Array, group_sizes: Array, block_size: int) -> Array:
  """out[e] = lhs_e^T @ dout_e, accumulated in fp32 over the group's row blocks."""
  (n, k), m = lhs.shape, dout.shape[1]
  out_dtype = jnp.result_type(lhs, dout)
  out = _zeros((group_sizes.shape[0], k, m), out_dtype, lhs, dout, group_sizes)
  if n == 0:
    return out
  b = min(block_size, n)
  starts, ends = _group_bounds(group_sizes, n)

  def group(e, out):
    def block(j, acc):
      r0, keep = _block(starts[e], ends[e], j, n, b)
      x = jnp.where(keep[:, None], lax.dynamic_slice_in_dim(lhs, r0, b), 0)
      d = lax.dynamic_slice_in_dim(dout, r0, b)
      return acc + lax.dot_general(x, d, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, _num_blocks(starts[e], ends[e], b), block,
                        _zeros((k, m), jnp.float32, lhs, dout, group_sizes))
    return lax.dynamic_update_index_in_dim(out, acc.astype(out_dtype), e, 0)

  return lax.fori_loop(0, group_sizes.shape[0], group, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs: Array, rhs: Array, group_sizes: Array, block_size: int,
         transpose_rhs: bool) -> Array:
  return _gmm_impl(lhs, rhs, group_sizes, block_size, transpose_rhs)


def _gmm_fwd(lhs, rhs, group_sizes, block_size, transpose_rhs):
  out = _gmm_impl(lhs, rhs, group_sizes, block_size, transpose_rhs)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(block_size, transpose_rhs, res, dout):
  lhs, rhs, group_sizes = res
  # Rows past sum(group_sizes) had zero outputs: both kernels skip them, so their
  # gradients are zero too.
  dlhs = _gmm(dout, rhs, group_sizes, block_size, not transpose_rhs)
  drhs = (_tgmm(dout, lhs, group_sizes, block_size) if transpose_rhs
          else _tgmm(lhs, dout, group_sizes, block_size))
  return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
