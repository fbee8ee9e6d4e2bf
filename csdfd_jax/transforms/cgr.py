"""Conflict Gradient Reduction (CGR): the projection-layer update of CS-DFD.

CS-DFD (arXiv 2507.21530, Section IV-B) adds a conflict descent loss on the projection
layer phi before the classifier, L_phi = -e_1 . e_2 (Eq. 18), the negative cosine of
the two stream gradients. Its gradient needs Hessians (Eq. 19); with the Hessian taken
as tau times the diagonal of the gradient outer product (Eq. 21-23) the update of the
projection-layer parameters becomes (Eq. 24):

    u = g_1 + g_2 - gamma (g_1 * g_1 * g_2 + g_2 * g_2 * g_1),
    gamma = tau / (||g_1|| ||g_2||),

with * element-wise and the norms taken over all parameters this transform sees.

Generalisation to K streams (not in the paper, which has K = 2): the loss becomes the
sum of pairwise negative cosines, so the correction sums over stream pairs:

    u = sum_j g_j - sum_{i<j} gamma_ij (g_i * g_i * g_j + g_j * g_j * g_i).

How strong the term is: the correction is cubic in the gradient entries divided by two
norms, so for dense gradients of P entries its size relative to sum_j g_j scales like
tau / P. The state and ``cgr_diagnostics`` report that ratio so users can see it.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csdfd_jax.transforms import stacked as st


class CGRState(NamedTuple):
  """The last step's ||CGR correction|| / ||sum_j g_j|| and mean pairwise stream
  cosine on the parameters CGR sees (for K = 2 the cosine is -L_phi, Eq. 18)."""

  correction_ratio: jax.Array
  cosine: jax.Array


def _pair_gammas(gram, tau, eps):
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  pairs = list(itertools.combinations(range(gram.shape[0]), 2))
  return pairs, [tau / (norms[i] * norms[j] + eps) for i, j in pairs]


def _cosines(gram, eps):
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  return gram / (jnp.outer(norms, norms) + eps)


def _split(stacked, tau, eps):
  """(sum_j g_j, correction, gram, scale) with update = sum - correction.

  Works on x = g / max|g| so that the cubic products cannot overflow or underflow:
  gamma g_i g_j (g_i + g_j) = scale * tau x_i x_j (x_i + x_j) / (|x_i| |x_j|), Eq. 24.
  """
  scale = st.max_abs(stacked)
  gram = st.gram_matrix(stacked, scale)
  pairs, gammas = _pair_gammas(gram, tau, eps)
  inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)

  def one(leaf):
    dtype = st.compute_dtype(leaf.dtype)
    x = leaf.astype(dtype)
    xs = x * inv.astype(dtype)
    corr = jnp.zeros(x.shape[1:], dtype)
    for (i, j), gamma in zip(pairs, gammas, strict=True):
      corr = corr + gamma.astype(dtype) * xs[i] * xs[j] * (xs[i] + xs[j])
    return st.stream_sum(x), corr * scale.astype(dtype)

  out = jax.tree.map(one, stacked)
  total = jax.tree.map(lambda _, o: o[0], stacked, out)
  corr = jax.tree.map(lambda _, o: o[1], stacked, out)
  return total, corr, gram, scale


def cgr(
  tau: float = 0.01,
  *,
  num_streams: int = 2,
  reduction: str = "sum",
  eps: float = 1e-12,
) -> optax.GradientTransformation:
  """CGR as an optax transformation: stacked [K, ...] -> [...] (paper Eq. 24).

  Args:
    tau: scale of the diagonal Hessian approximation (Eq. 23); the paper uses 0.01.
    num_streams: K, the size of the leading stream axis of every update leaf.
    reduction: "sum" (paper) or "mean": "mean" divides the whole update by K, so that
      CGR and ``uvs(reduction="mean")`` give the projection layer and the rest of the
      network the same step size.
    eps: added to the norm product in gamma, so zero gradients give no NaN. The norms
      are of g / max|g| (the transform works scale-free to avoid float32 overflow in
      the cubic term), so eps is relative to the gradients' own scale.

  Computes in at least float32 and returns each leaf in its own dtype. Meant for the
  parameters of the projection layer only: see ``csdfd`` for the partitioned
  optimizer of Algorithm 1.
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
  factor = 1.0 if reduction == "sum" else 1.0 / num_streams

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.float32)
    return CGRState(correction_ratio=zero, cosine=zero)

  def update_fn(updates, state, params=None):
    del params
    if not jax.tree.leaves(updates):  # e.g. an empty partition of optax.partition
      return updates, state
    k = st.num_streams(updates)
    if k != num_streams:
      raise ValueError(
        f"cgr(num_streams={num_streams}) got updates whose leading stream axis is "
        f"{k}. Pass num_streams={k}, or stack exactly {num_streams} stream gradients."
      )
    total, corr, gram, scale = _split(updates, tau, eps)
    upper = np.triu(np.ones((k, k), bool), 1)
    cosine = jnp.mean(_cosines(gram, eps)[upper]) if k > 1 else jnp.zeros((), gram.dtype)
    norm_t, norm_c = st.tree_norm(total, scale), st.tree_norm(corr, scale)
    ratio = jnp.where(norm_t > 0, norm_c / jnp.where(norm_t > 0, norm_t, 1.0), 0.0)
    new = jax.tree.map(lambda u, t, cr: ((t - cr) * factor).astype(u.dtype), updates, total, corr)
    return new, CGRState(ratio.astype(jnp.float32), cosine.astype(jnp.float32))

  return optax.GradientTransformation(init_fn, update_fn)


def cgr_diagnostics(stacked, tau: float = 0.01, eps: float = 1e-12) -> dict[str, jax.Array]:
  """The conflict view of the projection layer: pairwise cosines, L_phi (Eq. 18,
  summed over pairs), ||correction||, ||sum_j g_j|| and their ratio."""
  total, corr, gram, scale = _split(stacked, tau, eps)
  cosine = _cosines(gram, eps)
  k = gram.shape[0]
  upper = np.triu(np.ones((k, k), bool), 1)
  norm_t, norm_c = st.tree_norm(total, scale), st.tree_norm(corr, scale)
  return {
    "cosine": cosine,
    "conflict_loss": -jnp.sum(jnp.where(upper, cosine, 0.0)),
    "norm_correction": norm_c * scale,
    "norm_sum": norm_t * scale,
    "correction_ratio": norm_c / jnp.maximum(norm_t, eps),
  }
