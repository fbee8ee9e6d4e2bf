"""Update Vector Search (UVS): the conflict-averse update of CS-DFD (= CAGrad).

CS-DFD (arXiv 2507.21530, Section IV-A) replaces the combined gradient g0 of K stream
losses by the update v that maximises the worst stream's first-order descent rate inside
a ball around g0 (Eq. 9-10):

    max_v min_j g_j . v    s.t.  ||v - g0|| <= c ||g0||.

Its dual (Eq. 11-15) is a problem over the simplex of stream weights w:

    min_w F(w) = g_w . g0 + c ||g0|| ||g_w||,   g_w = sum_j w_j g_j,   (Eq. 15)

and the primal solution is v = g0 + c ||g0|| g_w / ||g_w||  (Eq. 14). This is exactly
CAGrad (Liu et al., NeurIPS 2021). Everything follows from the K x K Gram matrix of the
stream gradients, so the solve costs O(K^2) after one O(K * P) pass.

The solver (``solve_dual``):
* every face of the simplex is solved in closed form (Lagrange conditions on the face
  give a quadratic in the multiplier of sum(w) = 1) for K <= ``max_exact_streams``;
  for K = 2, the paper's case, these three faces are the whole problem: no iterations;
* for K >= 3, projected accelerated gradient (FISTA, Eq. 16 with momentum) on the
  simplex over the normalised Gram matrix, fixed iteration count, optionally warm
  started from the previous step's weights;
* every candidate w gives a feasible v, so the solver returns the candidate with the
  best primal value min_j g_j . v, which can only be as good as or better than any one.
  Measured on adversarial inputs: PGD alone after 100 iterations stays up to ~1e-3
  (relative) below the optimum; the face solutions close the gap.

Where the paper is silent, this module follows the official CAGrad code's options:
``reduction`` ("sum": g0 = sum_j g_j as in the paper's Eq. 3; "mean": CAGrad's average)
and ``rescale`` (none, 1/(1+c), 1/(1+c^2)).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csdfd_jax.transforms import stacked as st

REDUCTIONS = ("sum", "mean")
RESCALES = ("none", "1/(1+c)", "1/(1+c^2)")


class UVSState(NamedTuple):
  """weights: the last step's dual weights w ([K]; all zero when v = g0 was kept),
  used to warm-start the next solve. gram: the last step's Gram matrix ([K, K]), kept
  so that ``uvs_diagnostics`` can be computed from the state for free. The Gram is
  divided by max_j ||g_j||^2 (scale-free: cosines, weights and coefficients do not
  depend on the scale, and the stored matrix cannot overflow)."""

  weights: jax.Array
  gram: jax.Array


class UVSSolution(NamedTuple):
  """weights: w >= 0 summing to 1, or all zero when keeping v = g0 is best.
  coeffs: alpha with v = sum_j alpha_j g_j (before rescaling).
  value: the primal value min_j g_j . v reached (in the Gram's units)."""

  weights: jax.Array
  coeffs: jax.Array
  value: jax.Array


def reduction_vector(k: int, reduction: str) -> np.ndarray:
  """The weights a with g0 = sum_j a_j g_j."""
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  return np.full((k,), 1.0 if reduction == "sum" else 1.0 / k)


def rescale_factor(c: float, rescale: str) -> float:
  """The official CAGrad code's optional final scaling of v."""
  if rescale not in RESCALES:
    raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
  return {"none": 1.0, "1/(1+c)": 1.0 / (1.0 + c), "1/(1+c^2)": 1.0 / (1.0 + c * c)}[rescale]


def project_simplex(x: jax.Array) -> jax.Array:
  """Euclidean projection of x onto the probability simplex (sort-based)."""
  k = x.shape[-1]
  u = jnp.sort(x)[::-1]
  css = jnp.cumsum(u) - 1.0
  idx = jnp.arange(1, k + 1, dtype=x.dtype)
  rho = jnp.sum(u * idx > css)
  theta = css[rho - 1] / rho.astype(x.dtype)
  return jnp.maximum(x - theta, 0.0)


def _face_masks(k: int) -> np.ndarray:
  """All non-empty supports S of the simplex in R^k, as 0/1 rows."""
  rows = [
    [1.0 if i in s else 0.0 for i in range(k)]
    for r in range(1, k + 1)
    for s in itertools.combinations(range(k), r)
  ]
  return np.asarray(rows)


def _face_candidates(gh, b, big_c, masks, tiny):
  """Stationary points of F restricted to each face (Eq. 15 with its Lagrangian).

  On a face S with nonsingular Gram block G_S, stationarity of b.w + C sqrt(w'Gw) with
  1'w = 1 gives w proportional to H (nu 1 - b), H = G_S^+, where nu solves
  (nu 1 - b)' H (nu 1 - b) = C^2. Both roots are returned; clipping to w >= 0 keeps
  every candidate feasible for the primal.
  """
  k = gh.shape[0]
  outer = masks[:, :, None] * masks[:, None, :]
  block = gh * outer + jnp.eye(k, dtype=gh.dtype) * (1.0 - masks)[:, None, :]
  h = jnp.linalg.pinv(block) * outer
  bs = b * masks
  qa = jnp.einsum("nk,nkl,nl->n", masks, h, masks)
  qb = jnp.einsum("nk,nkl,nl->n", masks, h, bs)
  qc = jnp.einsum("nk,nkl,nl->n", bs, h, bs) - big_c**2
  ok = qa > tiny
  safe_a = jnp.where(ok, qa, 1.0)
  root = jnp.sqrt(jnp.maximum(qb**2 - qa * qc, 0.0))
  nus = jnp.stack([(qb + root) / safe_a, (qb - root) / safe_a], axis=1)
  x = jnp.einsum("nkl,nrl->nrk", h, nus[..., None] * masks[:, None, :] - bs[:, None, :])
  x = jnp.where(ok[:, None, None], jnp.maximum(x, 0.0), 0.0)
  return x.reshape(-1, k)


def _pgd(gh, b, big_c, w0, num_iters, tiny):
  """FISTA on the simplex for F(w) = b.w + C sqrt(w'Gw) (Eq. 16, accelerated).

  The step is r / (C tr(G)) with r = sqrt(w'Gw): the local curvature bound of the
  norm term, which keeps steps safe near g_w = 0 where F is not smooth.
  """
  lip = jnp.trace(gh)

  def body(_, carry):
    w, y, t = carry
    r = jnp.sqrt(jnp.maximum(y @ gh @ y, tiny))
    grad = b + big_c * (gh @ y) / r
    eta = jnp.where(big_c > 0, r / (big_c * lip + tiny), 0.0)
    w_new = project_simplex(y - eta * grad)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    y_new = w_new + ((t - 1.0) / t_new) * (w_new - w)
    return w_new, y_new, t_new

  w, _, _ = jax.lax.fori_loop(0, num_iters, body, (w0, w0, jnp.ones((), gh.dtype)))
  return w


def _primal(gh, a, big_c, ws, tiny):
  """For each candidate w (rows), alpha = a + C w / ||g_w|| and min_j g_j . v."""
  q = jnp.einsum("nk,kl,nl->n", ws, gh, ws)
  ok = q > tiny
  alpha = a + big_c * ws / jnp.sqrt(jnp.where(ok, q, 1.0))[:, None]
  alpha = jnp.where(ok[:, None], alpha, a)
  value = jnp.min(alpha @ gh, axis=-1)
  return alpha, jnp.where(ok & jnp.isfinite(value), value, -jnp.inf)


def solve_dual(
  gram: jax.Array,
  c: float,
  reduction: str = "sum",
  *,
  num_iters: int = 100,
  init_weights: jax.Array | None = None,
  max_exact_streams: int = 8,
) -> UVSSolution:
  """Solves the UVS dual (Eq. 15) from the stream Gram matrix.

  Works on G / max_j ||g_j||^2, so the result does not depend on the gradient scale.
  Returns the candidate with the best primal value among: v = g0 itself, the closed
  form on every face (K <= max_exact_streams) and the PGD iterate (K >= 3).
  """
  k = gram.shape[0]
  dtype = st.compute_dtype(gram.dtype)
  gram = gram.astype(dtype)
  tiny = jnp.finfo(dtype).eps
  a = jnp.asarray(reduction_vector(k, reduction), dtype)
  scale = jnp.max(jnp.diagonal(gram))
  nonzero = scale > 0
  gh = gram / jnp.where(nonzero, scale, 1.0)
  b = gh @ a
  big_c = c * jnp.sqrt(jnp.maximum(a @ b, 0.0))

  candidates = [jnp.zeros((1, k), dtype)]
  if k <= max_exact_streams:
    candidates.append(_face_candidates(gh, b, big_c, jnp.asarray(_face_masks(k), dtype), tiny))
  if k >= 3 and num_iters > 0:
    w0 = jnp.full((k,), 1.0 / k, dtype)
    if init_weights is not None:
      prev = init_weights.astype(dtype)
      w0 = jnp.where(jnp.sum(prev) > 0, prev / jnp.maximum(jnp.sum(prev), tiny), w0)
    candidates.append(_pgd(gh, b, big_c, w0, num_iters, tiny)[None])
  ws = jnp.concatenate(candidates, axis=0)
  sums = jnp.sum(ws, axis=1, keepdims=True)
  ws = jnp.where(sums > 0, ws / jnp.where(sums > 0, sums, 1.0), 0.0)
  alphas, values = _primal(gh, a, big_c, ws, tiny)
  values = values.at[0].set(jnp.min(b))  # w = 0 stands for v = g0
  best = jnp.argmax(values)
  keep_g0 = ~nonzero | (big_c <= 0)
  weights = jnp.where(keep_g0, 0.0, ws[best])
  coeffs = jnp.where(keep_g0, a, alphas[best])
  return UVSSolution(weights, coeffs, jnp.where(keep_g0, gram @ a, gram @ coeffs).min())


def _safe_gram(updates):
  """The Gram matrix in one pass; a second, rescaled pass (g / max|g|) only when
  squares overflowed or fell below float precision (|g| beyond ~1e+-19 in float32)."""
  gram = st.gram_matrix(updates)
  info = jnp.finfo(gram.dtype)
  usable = jnp.all(jnp.isfinite(gram)) & (jnp.max(jnp.diagonal(gram)) > info.tiny / info.eps)

  def rescaled(_):
    scale = st.max_abs(updates)
    return st.gram_matrix(updates, scale), scale

  return jax.lax.cond(usable, lambda _: (gram, jnp.ones((), gram.dtype)), rescaled, None)


def _norms(updates, gram, scale, a, w):
  """||g0|| and ||g_w|| (in units of scale): read off the Gram matrix unless
  cancellation made that inaccurate (the norm is below a tenth of its triangle bound
  sum_j w_j ||g_j||), in which case they are computed from the combined vectors."""
  root = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  q0, qw = a @ gram @ a, w @ gram @ w
  accurate = (q0 >= 1e-2 * (a @ root) ** 2) & (qw >= 1e-2 * (w @ root) ** 2)

  def from_gram(_):
    return jnp.sqrt(jnp.maximum(q0, 0.0)), jnp.sqrt(jnp.maximum(qw, 0.0))

  def from_vectors(_):
    norms = [st.tree_norm(st.combine(updates, x, keep_dtype=False), scale) for x in (a, w)]
    return tuple(n.astype(gram.dtype) for n in norms)

  return jax.lax.cond(accurate, from_gram, from_vectors, None)


def uvs(
  c: float = 0.5,
  *,
  num_streams: int = 2,
  reduction: str = "sum",
  rescale: str = "none",
  num_iters: int = 100,
  warm_start: bool = True,
  max_exact_streams: int = 8,
) -> optax.GradientTransformation:
  """Update Vector Search as an optax transformation: stacked [K, ...] -> [...].

  Args:
    c: radius of the search ball relative to ||g0|| (Eq. 9); the paper uses 0.5.
      c = 0 returns g0 unchanged.
    num_streams: K, the size of the leading stream axis of every update leaf.
    reduction: "sum" (paper Eq. 3, default) or "mean" (CAGrad) for g0.
    rescale: "none" (paper), "1/(1+c)" or "1/(1+c^2)" (CAGrad code's variants).
    num_iters: PGD iterations for K >= 3 (fixed, so the step compiles once).
    warm_start: start PGD from the previous step's weights kept in the state.
    max_exact_streams: solve every simplex face in closed form up to this K
      (2^K - 1 faces).

  Returns:
    A GradientTransformation whose ``init`` takes the (unstacked) params and whose
    ``update`` maps stacked stream gradients to v = g0 + c ||g0|| g_w / ||g_w|| (Eq. 14).
    When ||g_w|| is below sqrt(eps) * max_j ||g_j|| (a convex combination of the
    streams vanishes within float precision: the streams are Pareto-stationary and
    the direction of g_w is noise), the update is g0. Never NaN for finite inputs.
  """
  if c < 0:
    raise ValueError(f"c must be >= 0, got {c}")
  a_np = reduction_vector(num_streams, reduction)
  factor = rescale_factor(c, rescale)

  def init_fn(params):
    del params
    return UVSState(
      weights=jnp.zeros((num_streams,), jnp.float32),
      gram=jnp.zeros((num_streams, num_streams), jnp.float32),
    )

  def update_fn(updates, state, params=None):
    del params
    if not jax.tree.leaves(updates):  # e.g. an empty partition of optax.partition
      return updates, state
    k = st.num_streams(updates)
    if k != num_streams:
      raise ValueError(
        f"uvs(num_streams={num_streams}) got updates whose leading stream axis is "
        f"{k}. Pass num_streams={k}, or stack exactly {num_streams} stream gradients."
      )
    a = jnp.asarray(a_np, jnp.float32)
    if c == 0:
      return st.combine(updates, a * factor), state
    gram, scale = _safe_gram(updates)
    sol = solve_dual(
      gram,
      c,
      reduction,
      num_iters=num_iters,
      init_weights=state.weights if warm_start else None,
      max_exact_streams=max_exact_streams,
    )
    a = a.astype(gram.dtype)
    norm_0, norm_w = _norms(updates, gram, scale, a, sol.weights)
    floor = jnp.sqrt(jnp.finfo(gram.dtype).eps * jnp.max(jnp.diagonal(gram)))
    ok = norm_w > floor
    lam = jnp.where(ok, c * norm_0 / jnp.where(ok, norm_w, 1.0), 0.0)
    weights = jnp.where(ok, sol.weights, 0.0)
    top = jnp.max(jnp.diagonal(gram))
    unit_gram = gram / jnp.where(top > 0, top, 1.0)
    new_state = UVSState(weights.astype(jnp.float32), unit_gram.astype(jnp.float32))
    return st.combine(updates, (a + lam * weights) * factor), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def uvs_diagnostics(
  gram: jax.Array,
  weights: jax.Array,
  c: float = 0.5,
  reduction: str = "sum",
  rescale: str = "none",
) -> dict[str, jax.Array]:
  """What the paper's Fig. 2 and 5 look at, from a Gram matrix and UVS weights.

  Pass ``state.gram`` and ``state.weights`` of a UVSState to read the last step for
  free. Returns the stream cosines, the weights, the coefficients alpha of
  v = sum_j alpha_j g_j, and each stream's first-order descent rate g_j . v before
  UVS (v = g0) and after, plus the norms of g0 and v.
  """
  k = gram.shape[0]
  dtype = st.compute_dtype(gram.dtype)
  gram = gram.astype(dtype)
  a = jnp.asarray(reduction_vector(k, reduction), dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  denom = jnp.outer(norms, norms)
  cosine = jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)
  q = weights @ gram @ weights
  norm_0 = jnp.sqrt(jnp.maximum(a @ gram @ a, 0.0))
  ok = q > 0
  alpha = a + jnp.where(ok, c * norm_0 / jnp.sqrt(jnp.where(ok, q, 1.0)), 0.0) * weights
  alpha = alpha * rescale_factor(c, rescale)
  return {
    "gram": gram,
    "cosine": cosine,
    "weights": weights,
    "coeffs": alpha,
    "rate_before": gram @ a,
    "rate_after": gram @ alpha,
    "norm_g0": norm_0,
    "norm_v": jnp.sqrt(jnp.maximum(alpha @ gram @ alpha, 0.0)),
  }
