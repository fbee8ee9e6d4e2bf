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
* every face of the simplex is solved in closed form (Lagrange conditions on the face,
  one bordered KKT solve and a scalar equation for ||g_w||) for K <= ``max_exact_streams``;
  for K = 2, the paper's case, these three faces are the whole problem: no iterations;
* for K > max_exact_streams, projected accelerated gradient (FISTA, Eq. 16 with
  momentum) on the simplex, optionally warm started from the previous step's weights,
  then the faces within its max_exact_streams largest weights and a few active-set
  steps (which reach the optimum to rounding where FISTA alone stops ~1e-3 short);
* every candidate w gives a feasible v, so the solver returns the candidate with the
  best primal value min_j g_j . v, which can only be as good as or better than any one.

Where the streams nearly cancel (1 + cos(g_1, g_2) ~ 1e-6 in float32), the Gram's
entries lose ||g0||^2, <g_j, g0> and ||g_w||^2 to rounding; ``uvs`` detects it and solves
again around the Gram's solution with those quantities read off the vectors (in a
lax.cond, two more passes, only then). The update is differentiable (no NaN gradient)
and c may be traced (scheduled with ``optax.inject_hyperparams``, see ``STATIC_ARGS``).

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
# uvs() options that fix array shapes or loop counts: optax.inject_hyperparams must keep
# them static (it would trace every numeric argument), only c can be scheduled.
STATIC_ARGS = ("num_streams", "num_iters", "max_exact_streams", "polish_steps")


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


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) whose gradient stays finite at and below 0 (the double-where trick)."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


class _Dual(NamedTuple):
  """The dual (Eq. 15) written around a point w_ref of the simplex, in units of
  max_j ||g_j||^2: gh the Gram, b_j = <g_j, g0>, big_c = c ||g0||, q = ||g_wref||^2 and
  r_j = <g_j, g_wref>. With d = w - w_ref, ||g_w||^2 = q + 2 d.r + d'G d and
  g_j . g_w = r_j + (G d)_j: accurate near w_ref even where the Gram's entries cancel,
  once b, q and r are read from the vectors. The plain Gram (w_ref = 0, q = 0, r = 0) has
  w_ref, q and r None, which the face solve uses to skip the centring terms (statically)."""

  gh: jax.Array
  b: jax.Array
  big_c: jax.Array
  w_ref: jax.Array | None
  q: jax.Array | None
  r: jax.Array | None


def _gram_dual(gh: jax.Array, a: jax.Array, c) -> _Dual:
  b = gh @ a
  return _Dual(gh, b, c * _safe_sqrt(a @ b), None, None, None)


def _norms_and_rates(dual: _Dual, ws: jax.Array) -> tuple[jax.Array, jax.Array]:
  """||g_w||^2 and g_j . g_w for the rows w of ws."""
  if dual.w_ref is None:
    gw = ws @ dual.gh
    return jnp.sum(ws * gw, axis=-1), gw
  d = ws - dual.w_ref
  gd = d @ dual.gh
  return dual.q + 2.0 * d @ dual.r + jnp.sum(d * gd, axis=-1), dual.r + gd


def _spd_solve(m: jax.Array, rhs: jax.Array, floor) -> jax.Array:
  """x with m x = rhs for a batch of small symmetric positive definite m ([n, k, k], rhs
  [n, k, r]): Gaussian elimination without pivoting (LDL', which needs no pivoting on SPD
  matrices), unrolled over the static k, on the rows of [m | rhs] so that each elimination is
  one row update. XLA fuses the row updates into a few loops over the batch, where a batched
  LAPACK LU is one call per matrix: for K = 6 (63 faces) the solve is 1.7x faster than with
  separate updates of m and rhs, and those were 2.2-2.7x faster for K = 2-6 than
  ``jnp.linalg.solve`` on the bordered system (measured side by side on the Gram matrices of
  ``bench/solver.py``). Pivots are floored at ``floor`` so that no division is by 0 (nor its
  gradient) where m is singular to rounding."""
  k = m.shape[-1]
  aug = jnp.concatenate([m, rhs.astype(m.dtype)], axis=-1)
  rows, inverses = [aug[:, i, :] for i in range(k)], []
  for j in range(k):
    inverse = 1.0 / jnp.maximum(rows[j][:, j], floor)
    inverses.append(inverse)
    for i in range(j + 1, k):
      rows[i] = rows[i] - (rows[i][:, j] * inverse)[:, None] * rows[j]
  x = [None] * k
  for j in reversed(range(k)):
    acc = rows[j][:, k:]
    for i in range(j + 1, k):
      acc = acc - rows[j][:, i, None] * x[i]
    x[j] = acc * inverses[j][:, None]
  return jnp.stack(x, axis=1)


def _face_points(dual: _Dual, masks: jax.Array) -> jax.Array:
  """Stationary points of F(w) = b.w + C ||g_w|| (Eq. 15) on each face S (mask rows).

  With w = w_ref + z, the Lagrange conditions on the face, b_S + C (r + G z)_S / rho
  + mu 1_S = 0, 1'w = 1, rho = ||g_w||, are linear in z for a fixed rho: z = z0 + rho z1
  from one KKT solve; then ||g_w||^2 = alpha + beta rho^2 gives rho in closed form.

  The KKT system [[G_S, 1], [1', 0]] is indefinite, and G_S itself is nearly singular along
  1_S where streams nearly cancel. Since 1'z is fixed (= s) on the face, G_S z + mu 1 = f is
  the same as M z + (mu - gamma s) 1 = f with M = G_S + gamma 1_S 1_S' (gamma = 1, the scale
  of the normalised Gram), which is positive definite exactly where the KKT matrix is
  invertible and well conditioned along 1_S; so z = M^-1 (f - mu' 1) with mu' from 1'z = s
  (``_spd_solve``: three right-hand sides, unrolled). Returns the unclipped w of every face.
  """
  gh, b, big_c, w_ref, q, r = dual
  k = masks.shape[1]
  dtype = gh.dtype
  centred = w_ref is None  # the plain Gram: w_ref = 0, fix = 0, s = 1, r_f = 0, q_f = 0
  if not centred:
    fix = -w_ref * (1.0 - masks)  # z off the face brings w to 0 there
    s = 1.0 - masks @ w_ref  # what z adds on the face, so that sum(w) = 1
    r_f = r + fix @ gh
    q_f = q + 2.0 * fix @ r + jnp.sum(fix * (fix @ gh), axis=-1)
  outer = masks[:, :, None] * masks[:, None, :]
  # A ridge of a few ulps on the face block keeps M invertible (and its gradient finite) where
  # G_S is exactly singular off 1_S, e.g. duplicate streams: such a face's optimum is also
  # attained on a smaller face, which is solved as well.
  eps = jnp.finfo(dtype).eps
  eye = jnp.eye(k, dtype=dtype)
  m = (gh + 16 * eps * eye + 1.0) * outer + eye * (1.0 - masks)[:, None, :]
  safe_c = jnp.where(big_c > 0, big_c, 1.0)
  columns = [-(b / safe_c) * masks, masks]
  if not centred:
    columns.insert(0, -r_f * masks)
  y = _spd_solve(m, jnp.stack(columns, axis=-1), eps * eps)
  y0, y1, y2 = (None, *jnp.moveaxis(y, -1, 0)) if centred else jnp.moveaxis(y, -1, 0)
  ones_y = jnp.sum(y2, axis=-1)  # 1_S' M^-1 1_S > 0 on a non-empty face
  ones_y = jnp.maximum(ones_y, eps * eps)
  mu1 = jnp.sum(y1, axis=-1) / ones_y  # the second column has s = 0
  z1 = y1 - mu1[:, None] * y2
  if centred:  # the first column is 0 and s = 1: mu' = -1 / ones_y
    z0 = y2 / ones_y[:, None]
    alpha = 1.0 / ones_y - 1.0  # q_f + z0.r_f - (mu' + s) s
  else:
    mu0 = (jnp.sum(y0, axis=-1) - s) / ones_y  # mu' of the first column
    z0 = y0 - mu0[:, None] * y2
    mu0 = mu0 + s  # mu = mu' + gamma s
    alpha = q_f + jnp.sum(z0 * r_f, axis=-1) - mu0 * s
  beta = jnp.sum(z1 * (z1 @ gh), axis=-1)
  bounded = beta < 1.0  # else F has no minimum inside the face's affine hull
  rho = jnp.where(bounded, _safe_sqrt(alpha / jnp.where(bounded, 1.0 - beta, 1.0)), 0.0)
  w = (z0 + rho[:, None] * z1) * masks
  return w if centred else w_ref + fix + w


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


def _polish(dual: _Dual, w: jax.Array, num_steps: int, tiny) -> jax.Array:
  """Primal active-set steps from w (for K above the face enumeration).

  Each step moves from w toward the closed-form optimum of F on the current support
  (``_face_points``), stopping where a weight reaches 0, which then leaves the support;
  when that optimum is feasible, the stream whose partial derivative of F most undercuts
  the multiplier (a violated KKT condition) joins the support. F is convex, so each
  accepted step descends; a step that would not is refused.
  """
  k = w.shape[0]

  def objective(x):
    q, _ = _norms_and_rates(dual, x[None])
    return dual.b @ x + dual.big_c * _safe_sqrt(q[0])

  def body(_, carry):
    w, mask = carry
    delta = _face_points(dual, mask[None].astype(w.dtype))[0] - w
    shrinking = mask & (delta < 0)
    ratios = jnp.where(shrinking, w / jnp.where(shrinking, -delta, 1.0), jnp.inf)
    t = jnp.minimum(1.0, jnp.min(ratios))
    w_new = jnp.where(mask, jnp.maximum(w + t * delta, 0.0), 0.0)
    w_new = w_new / jnp.maximum(jnp.sum(w_new), tiny)
    blocked = t < 1.0
    q, rates = _norms_and_rates(dual, w_new[None])
    grad = dual.b + dual.big_c * rates[0] / jnp.sqrt(jnp.maximum(q[0], tiny))
    violation = jnp.where(mask, jnp.inf, grad - grad @ w_new)
    j = jnp.argmin(violation)
    add = ~blocked & (violation[j] < -tiny * jnp.max(jnp.abs(grad)))
    new_mask = jnp.where(blocked, mask & (jnp.arange(k) != jnp.argmin(ratios)), mask)
    new_mask = new_mask.at[j].set(new_mask[j] | add)
    better = objective(w_new) <= objective(w)
    return jnp.where(better, w_new, w), jnp.where(better, new_mask, mask)

  w, _ = jax.lax.fori_loop(0, num_steps, body, (w, w > 0))
  return w


def _evaluate(dual: _Dual, ws: jax.Array, floor) -> tuple[jax.Array, jax.Array]:
  """For each candidate w (rows): ||g_w||^2 and the primal value min_j g_j . v of
  v = g0 + C g_w / ||g_w|| (Eq. 14); -inf where ||g_w||^2 <= floor (g_w vanishes, or
  cannot be told from rounding)."""
  q, rates = _norms_and_rates(dual, ws)
  ok = q > floor
  lam = jnp.where(ok, dual.big_c / _safe_sqrt(jnp.where(ok, q, 1.0)), 0.0)
  value = jnp.min(dual.b + lam[:, None] * rates, axis=-1)
  return q, jnp.where(ok & jnp.isfinite(value), value, -jnp.inf)


def _normalise(ws: jax.Array) -> jax.Array:
  """Rows clipped to w >= 0 and scaled to sum to 1 (all-zero rows stay zero)."""
  ws = jnp.maximum(ws, 0.0)
  sums = jnp.sum(ws, axis=1, keepdims=True)
  return jnp.where(sums > 0, ws / jnp.where(sums > 0, sums, 1.0), 0.0)


def _solve(dual: _Dual, extra: list[jax.Array], k: int, max_exact_streams: int, steps: int):
  """Best candidate (by primal value) among v = g0, the rows of ``extra``, every face
  (K <= max_exact_streams) or else the active-set polish of the last extra row.
  Returns (w, ||g_w||^2, value); w = 0 stands for v = g0. Around w_ref = 0 (the plain
  Gram) ||g_w||^2 below eps is rounding; around a point read off the vectors it is not,
  and the caller decides what a tiny ||g_w|| means."""
  dtype = dual.gh.dtype
  tiny = jnp.finfo(dtype).eps
  floor = tiny if dual.w_ref is None else jnp.where(jnp.any(dual.w_ref != 0), 0.0, tiny)
  candidates = [jnp.zeros((1, k), dtype), *extra]
  if k <= max_exact_streams:
    candidates.append(_face_points(dual, jnp.asarray(_face_masks(k), dtype)))
  elif extra:
    # Every face within the max_exact_streams largest weights of the iterate, then
    # active-set steps from the best of them (which can still add streams).
    start = extra[-1][0]
    top = jnp.argsort(-start)[: min(max_exact_streams, k)]
    ranked = jnp.asarray(_face_masks(len(top)), dtype) if len(top) else jnp.zeros((0, 0), dtype)
    faces = _normalise(
      _face_points(dual, jnp.zeros((len(ranked), k), dtype).at[:, top].set(ranked))
    )
    ws = _normalise(jnp.concatenate([start[None], faces], axis=0))
    _, values = _evaluate(dual, ws, floor)
    candidates.append(_polish(dual, ws[jnp.argmax(values)], steps, tiny)[None])
  ws = _normalise(jnp.concatenate(candidates, axis=0))
  qs, values = _evaluate(dual, ws, floor)
  values = values.at[0].set(jnp.min(dual.b))  # w = 0 stands for v = g0
  best = jnp.argmax(values)
  keep_g0 = dual.big_c <= 0
  return jnp.where(keep_g0, 0.0, ws[best]), jnp.where(keep_g0, 0.0, qs[best]), values[best]


def _gram_solve(gh, a, c, *, num_iters, init_weights, max_exact_streams, polish_steps):
  """The dual from the (normalised) Gram alone: every face in closed form (exhaustive, so
  exact, for K <= max_exact_streams), or else FISTA then active-set polish."""
  k = gh.shape[0]
  dual = _gram_dual(gh, a, c)
  extra = []
  if max_exact_streams < k and k >= 3 and num_iters > 0:
    tiny = jnp.finfo(gh.dtype).eps
    w0 = jnp.full((k,), 1.0 / k, gh.dtype)
    if init_weights is not None:
      prev = init_weights.astype(gh.dtype)
      w0 = jnp.where(jnp.sum(prev) > 0, prev / jnp.maximum(jnp.sum(prev), tiny), w0)
    extra.append(_pgd(gh, dual.b, dual.big_c, w0, num_iters, tiny)[None])
  return _solve(dual, extra, k, max_exact_streams, polish_steps)


def solve_dual(
  gram: jax.Array,
  c: float,
  reduction: str = "sum",
  *,
  num_iters: int = 100,
  init_weights: jax.Array | None = None,
  max_exact_streams: int = 8,
  polish_steps: int = 8,
) -> UVSSolution:
  """Solves the UVS dual (Eq. 15) from the stream Gram matrix.

  Works on G / max_j ||g_j||^2, so the result does not depend on the gradient scale.
  Returns the candidate with the best primal value among: v = g0 itself, the closed
  form on every face (K <= max_exact_streams), the PGD iterate (K >= 3) and, for
  K > max_exact_streams, its active-set polish (``polish_steps`` steps).
  """
  k = gram.shape[0]
  dtype = st.compute_dtype(gram.dtype)
  gram = gram.astype(dtype)
  a = jnp.asarray(reduction_vector(k, reduction), dtype)
  scale = jnp.max(jnp.diagonal(gram))
  nonzero = scale > 0
  gh = gram / jnp.where(nonzero, scale, 1.0)
  w, q, _ = _gram_solve(
    gh,
    a,
    c,
    num_iters=num_iters,
    init_weights=init_weights,
    max_exact_streams=max_exact_streams,
    polish_steps=polish_steps,
  )
  ok = nonzero & (q > 0)
  big_c = c * _safe_sqrt(a @ gh @ a)
  lam = jnp.where(ok, big_c / _safe_sqrt(jnp.where(ok, q, 1.0)), 0.0)
  weights = jnp.where(ok, w, 0.0)
  coeffs = a + lam * weights
  return UVSSolution(weights, coeffs, jnp.min(gram @ coeffs))


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


def _vector_solve(updates, unit, gh, a, c, w, *, max_exact_streams, polish_steps):
  """Re-solves the dual around w with b, ||g0|| and g_w read from the vectors.

  Where the streams nearly cancel (e.g. 1 + cos(g_1, g_2) ~ 1e-6), the Gram's entries
  lose the small quantities the dual depends on (||g0||^2, <g_j, g0>, ||g_w||^2) to
  rounding of the large ones. One combine pass builds g0 and g_w (scaled by ``unit``)
  and one pass takes their inner products with the streams; the faces (or active-set
  steps) around w then only read the Gram along small displacements.
  Returns (w, ||g0||^2, ||g_w||^2) in the Gram's units.
  """
  k = gh.shape[0]
  w_ref = jnp.where(jnp.sum(w) > 0, w, a / jnp.sum(a))
  inv = 1.0 / unit
  extras = st.combine(updates, jnp.stack([a, w_ref]) * inv, keep_dtype=False)
  cross = st.cross_gram(updates, extras, unit)
  inner = st.gram_matrix(extras)
  q0 = inner[0, 0]
  dual = _Dual(gh, cross[:, 0], c * _safe_sqrt(q0), w_ref, inner[1, 1], cross[:, 1])
  w, q, _ = _solve(dual, [w_ref[None]], k, max_exact_streams, polish_steps)
  return w, q0, q


def _static(value, cast):
  """value as a Python number, or None when it is traced (e.g. a scheduled hyperparameter)."""
  try:
    return cast(value)
  except TypeError:
    return None


def uvs(
  c: float | jax.Array = 0.5,
  *,
  num_streams: int = 2,
  reduction: str = "sum",
  rescale: str = "none",
  num_iters: int = 100,
  warm_start: bool = True,
  max_exact_streams: int = 8,
  polish_steps: int = 8,
) -> optax.GradientTransformation:
  """Update Vector Search as an optax transformation: stacked [K, ...] -> [...].

  Args:
    c: radius of the search ball relative to ||g0|| (Eq. 9); the paper uses 0.5.
      c = 0 returns g0 unchanged. May be a traced value, to schedule it:
      ``optax.inject_hyperparams(uvs, static_args=STATIC_ARGS)(c=schedule)``
      (inject_hyperparams would otherwise trace the integer options too).
    num_streams: K, the size of the leading stream axis of every update leaf.
    reduction: "sum" (paper Eq. 3, default) or "mean" (CAGrad) for g0.
    rescale: "none" (paper), "1/(1+c)" or "1/(1+c^2)" (CAGrad code's variants).
    num_iters: PGD iterations for K >= 3 (fixed, so the step compiles once).
    warm_start: start PGD from the previous step's weights kept in the state.
    max_exact_streams: solve every simplex face in closed form up to this K
      (2^K - 1 faces); above it, PGD then ``polish_steps`` active-set steps.
    polish_steps: active-set steps after PGD for K > max_exact_streams.

  Returns:
    A GradientTransformation whose ``init`` takes the (unstacked) params and whose
    ``update`` maps stacked stream gradients to v = g0 + c ||g0|| g_w / ||g_w|| (Eq. 14).
    Where the Gram matrix is cancelled (||g0|| or ||g_w|| below a tenth of its triangle
    bound, e.g. nearly opposite streams), the dual is solved again around the Gram's
    solution from quantities read off the vectors (two more passes, in a lax.cond).
    When ||g_w|| is below sqrt(eps) * max_j ||g_j|| (a convex combination of the
    streams vanishes within float precision: the streams are Pareto-stationary and
    the direction of g_w is noise), the update is g0. Never NaN for finite inputs;
    differentiable (jax.grad of a function of the update is finite).
  """
  c_value = _static(c, float)
  if c_value is not None and c_value < 0:
    raise ValueError(f"c must be >= 0, got {c}")
  for name, value in (
    ("num_streams", num_streams),
    ("num_iters", num_iters),
    ("max_exact_streams", max_exact_streams),
    ("polish_steps", polish_steps),
  ):
    if _static(value, int) is None:
      raise ValueError(
        f"uvs({name}=...) got a traced value: only c can be scheduled. "
        "optax.inject_hyperparams treats every numeric argument as a hyperparameter; "
        "use optax.inject_hyperparams(uvs, static_args=csdfd_jax.transforms.uvs.STATIC_ARGS)."
      )
  num_streams, num_iters = int(num_streams), int(num_iters)
  max_exact_streams, polish_steps = int(max_exact_streams), int(polish_steps)
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
    if c_value == 0:
      return st.combine(updates, jnp.asarray(a_np * factor, jnp.float32)), state
    gram, scale = _safe_gram(updates)
    dtype = gram.dtype
    a = jnp.asarray(a_np, dtype)
    top = jnp.max(jnp.diagonal(gram))
    gh = gram / jnp.where(top > 0, top, 1.0)
    options = dict(max_exact_streams=max_exact_streams, polish_steps=polish_steps)
    init = state.weights if warm_start else None
    w, qw, _ = _gram_solve(gh, a, c, num_iters=num_iters, init_weights=init, **options)
    root = _safe_sqrt(jnp.diagonal(gh))
    q0 = a @ gh @ a
    accurate = (q0 >= 1e-2 * (a @ root) ** 2) & (qw >= 1e-2 * (w @ root) ** 2)
    unit = scale * _safe_sqrt(top)
    w, q0, qw = jax.lax.cond(
      accurate,
      lambda: (w, q0, qw),
      lambda: _vector_solve(updates, unit, gh, a, c, w, **options),
    )
    ok = (qw > jnp.finfo(dtype).eps) & (c > 0)
    lam = jnp.where(ok, c * _safe_sqrt(q0) / _safe_sqrt(jnp.where(ok, qw, 1.0)), 0.0)
    weights = jnp.where(ok, w, 0.0)
    new_state = UVSState(weights.astype(jnp.float32), gh.astype(jnp.float32))
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
