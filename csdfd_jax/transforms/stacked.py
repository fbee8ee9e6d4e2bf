"""Helpers for stacked stream gradients.

Per-stream gradients travel as one pytree whose leaves carry a leading stream axis K
(leaf shape ``[K, ...]``). These helpers read such trees in one pass: the K x K Gram
matrix of the streams, and linear combinations of the streams.

Arithmetic is done in at least float32 (float64 stays float64), whatever the gradient
dtype, and matrix products use ``Precision.HIGHEST`` so that GPUs do not silently drop
to TF32 for the inner products the solvers depend on. Squares of gradients overflow
float32 above ~1e19 and underflow below ~1e-19, so Gram matrices and norms take an
optional ``scale`` (use ``max_abs``) and work on g / scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype the transforms compute in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def num_streams(stacked: PyTree) -> int:
  """The stream count K shared by every leaf of a stacked tree (static)."""
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(stacked)}
  if None in sizes:
    raise ValueError(
      "Stacked stream gradients need a leading stream axis K on every leaf; found a "
      "scalar leaf. Stack the per-stream gradients with stack_streams(g_1, ..., g_K)."
    )
  if len(sizes) > 1:
    raise ValueError(
      f"Leaves disagree on the stream axis: leading sizes {sorted(sizes)}. Every leaf "
      "of a stacked tree must have the same leading size K."
    )
  return sizes.pop() if sizes else 0


def stack_streams(*trees: PyTree) -> PyTree:
  """Stacks K per-stream gradient trees of one structure into a stacked tree."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def stream_sum(leaf: jax.Array) -> jax.Array:
  """leaf[0] + ... + leaf[K-1] over the leading stream axis, as K-1 elementwise adds.

  Same result as ``jnp.sum(leaf, axis=0)`` for K = 2 (one rounding either way), but XLA's
  CPU backend runs a reduction over a short leading axis far slower than the adds: 11-25x
  for an EfficientNet-B0 gradient tree with K = 2 (the project's bench/xla_cpu.py)."""
  out = leaf[0]
  for k in range(1, leaf.shape[0]):
    out = out + leaf[k]
  return out


def _tree_dtype(leaves) -> jnp.dtype:
  return compute_dtype(jnp.result_type(*leaves)) if leaves else jnp.dtype(jnp.float32)


def _inverse(scale, dtype):
  if scale is None:
    return jnp.ones((), dtype)
  scale = scale.astype(dtype)
  return jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)


def max_abs(tree: PyTree) -> jax.Array:
  """The largest |entry| of a tree (0 for an empty tree), in at least float32."""
  leaves = jax.tree.leaves(tree)
  dtype = _tree_dtype(leaves)
  if not leaves:
    return jnp.zeros((), dtype)
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]))


def gram_matrix(stacked: PyTree, scale: jax.Array | None = None) -> jax.Array:
  """G[i, j] = <g_i / scale, g_j / scale> summed over all leaves: one O(K * P) pass."""
  leaves = jax.tree.leaves(stacked)
  k = num_streams(stacked)
  dtype = _tree_dtype(leaves)
  inv = _inverse(scale, dtype)
  gram = jnp.zeros((k, k), dtype)
  for leaf in leaves:
    flat = leaf.reshape(k, -1).astype(dtype) * inv
    gram = gram + jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
  return gram


def cross_gram(stacked: PyTree, other: PyTree, scale: jax.Array | None = None) -> jax.Array:
  """X[i, m] = <g_i / scale, h_m> between the K streams and M vectors of a second
  stacked tree of the same structure (leading axis M), summed over all leaves."""
  leaves, others = jax.tree.leaves(stacked), jax.tree.leaves(other)
  k, m = num_streams(stacked), num_streams(other)
  dtype = _tree_dtype(leaves + others)
  inv = _inverse(scale, dtype)
  out = jnp.zeros((k, m), dtype)
  for leaf, extra in zip(leaves, others, strict=True):
    flat = leaf.reshape(k, -1).astype(dtype) * inv
    rows = extra.reshape(m, -1).astype(dtype)
    out = out + jnp.matmul(flat, rows.T, precision=jax.lax.Precision.HIGHEST)
  return out


def combine(stacked: PyTree, coeffs: jax.Array, *, keep_dtype: bool = True) -> PyTree:
  """sum_j coeffs[j] * g_j, leaf by leaf, computed in at least float32 and returned in
  each leaf's own dtype (or in the compute dtype with ``keep_dtype=False``). Coefficients
  of shape [M, K] give M combinations, stacked on a new leading axis."""

  def one(leaf):
    dtype = compute_dtype(leaf.dtype)
    out = jnp.tensordot(
      coeffs.astype(dtype),
      leaf.astype(dtype),
      axes=1,
      precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(leaf.dtype) if keep_dtype else out

  return jax.tree.map(one, stacked)


def tree_norm(tree: PyTree, scale: jax.Array | None = None) -> jax.Array:
  """Global L2 norm of tree / scale, accumulated in at least float32."""
  leaves = jax.tree.leaves(tree)
  dtype = _tree_dtype(leaves)
  inv = _inverse(scale, dtype)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(dtype) * inv)) for x in leaves))


def sum_streams(reduction: str = "sum") -> optax.GradientTransformation:
  """Stacked [K, ...] updates -> their sum (the gradient of L_1 + ... + L_K, CS-DFD Eq. 3) or
  their mean over the streams (``reduction="mean"``)."""
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

  def reduce(u):
    total = stream_sum(u)
    return total if reduction == "sum" else total / u.shape[0]

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(reduce, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
