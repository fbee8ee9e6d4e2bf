"""Independent float64 NumPy/SciPy references for UVS (Eq. 9-15) and CGR (Eq. 24)."""

import numpy as np
from scipy.optimize import minimize


def primal_value(g: np.ndarray, a: np.ndarray, c: float) -> float:
  """max_v min_j g_j . v  s.t. ||v - g0|| <= c ||g0||, solved directly (Eq. 10)."""
  g0 = a @ g
  radius = c * np.linalg.norm(g0)
  scale = max(np.max(np.abs(g)), 1e-300)
  gs, g0s, rs = g / scale, g0 / scale, radius / scale
  p = g.shape[1]
  cons = [{"type": "ineq", "fun": (lambda x, j=j: gs[j] @ x[:p] - x[p])} for j in range(len(g))]
  cons.append({"type": "ineq", "fun": lambda x: rs**2 - np.sum((x[:p] - g0s) ** 2)})
  x0 = np.concatenate([g0s, [np.min(gs @ g0s)]])
  res = minimize(
    lambda x: -x[p], x0, constraints=cons, method="SLSQP", options={"ftol": 1e-15, "maxiter": 500}
  )
  x = res.x
  # Project back into the ball so the reference value is attained by a feasible v.
  d = x[:p] - g0s
  if np.linalg.norm(d) > rs > 0:
    d *= rs / np.linalg.norm(d)
  v = g0s + d
  return float(np.min(gs @ v)) * scale**2


def dual_value(g: np.ndarray, a: np.ndarray, c: float) -> float:
  """min over the simplex of g_w . g0 + c ||g0|| ||g_w|| (Eq. 15), by SLSQP."""
  k = len(g)
  scale = max(np.max(np.abs(g)), 1e-300)
  gram = (g / scale) @ (g / scale).T
  b = gram @ a
  big_c = c * np.sqrt(a @ gram @ a)

  def f(w):
    return b @ w + big_c * np.sqrt(max(w @ gram @ w, 0.0))

  best = np.inf
  starts = [np.full(k, 1.0 / k)] + [np.eye(k)[j] for j in range(k)]
  for w0 in starts:
    res = minimize(
      f,
      w0,
      method="SLSQP",
      bounds=[(0, 1)] * k,
      constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1}],
      options={"ftol": 1e-15, "maxiter": 500},
    )
    best = min(best, f(np.clip(res.x, 0, None) / np.sum(np.clip(res.x, 0, None))))
  return float(best) * scale**2


def cgr_update(g: np.ndarray, tau: float) -> np.ndarray:
  """Eq. 24 summed over stream pairs, on flattened float64 gradients g: [K, P]."""
  norms = np.linalg.norm(g, axis=1)
  out = g.sum(0).copy()
  for i in range(len(g)):
    for j in range(i + 1, len(g)):
      gamma = tau / (norms[i] * norms[j])
      out -= gamma * (g[i] * g[i] * g[j] + g[j] * g[j] * g[i])
  return out
