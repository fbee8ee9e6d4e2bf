"""Two objectives on R^2: the summed gradient sacrifices one of them, UVS does not.

Run from the repository root with ``python -m examples.two_objectives`` (or
``PYTHONPATH=. python examples/two_objectives.py``).

The problem, on p = (x, y):

  f1(x, y) = y^2 + (x^2 - 1)^2 / 2    "loud": steep in y, with two equally deep valleys,
                                       f1 = 0 at (-1, 0) and at (+1, 0);
  f2(x, y) = (x + 1)^2 / 8            "quiet": depends on x only and prefers the left
                                       valley, f2 = 0 at x = -1.

The sum f1 + f2 is non-convex with two local minima:
  * (-1, 0): the global minimum, f1 = f2 = 0;
  * (x_r, 0), x_r = (1 + 1/sqrt(2)) / 2 ~ 0.854: f1 ~ 0.037, f2 ~ 0.429, sum ~ 0.466.
Along x the sum is a double well whose barrier sits at x_b = (1 - 1/sqrt(2)) / 2 ~ 0.146,
for every y (f2 does not depend on y, and the y-term of f1 does not depend on x).

Start at (x0, y0) with x_b < x0 < x_r, y0 away from 0 (default (0.4, 2.0)):

* ``optax.adam(lr)`` on grad(f1 + f2): Adam moves each coordinate by the sign of its own
  (momentum-averaged) gradient. The x-component of the summed gradient points right, to
  x_r, whatever y is, so Adam walks into the right valley. f2 rises from f2(x0) to ~0.43
  and stays there: the right valley is a local minimum of the sum, so more steps do not
  help.
* ``optax.chain(uvs(c=0.5), optax.adam(lr))`` on [grad f1, grad f2]: UVS returns the v
  within c ||g0|| of g0 = g1 + g2 that maximises the slower of the two descent rates
  g_j . v. While y is away from 0, ||g0|| is dominated by f1's steep y-slope, and f2's rate
  g2 . g0 is negative (the sum climbs f2); UVS spends that large budget on f2's direction,
  so the x-component of v flips sign and Adam walks x left, over the barrier, while y is
  still descending. f1's drop in y pays for its climb over the barrier in x: both
  objectives fall, and the run ends at (-1, 0), where both are 0.

What this shows, and what it does not:
* With c < 1, UVS is still a descent method for f1 + f2 and converges to a stationary point
  of the sum; it does not reach a kind of solution the sum cannot. The difference lies in
  the trajectory (f2 does not climb, but for Adam's small overshoot at the end) and hence
  in the basin that is reached, which is decided in the first few dozen steps, while f1's
  gradient is large. Here the basin UVS reaches happens to be the global minimum of the
  sum too.
* UVS needs that "loud" slope to work with: x has to cross the barrier before y reaches 0.
  With Adam moving each coordinate by about lr per step, this needs y0 to be larger than
  the distance x0 - x_b, with some margin. On a 15 x 15 grid of starts with
  0.15 <= x0 <= 0.85 and 0.1 <= y0 <= 1.5 (c = 0.5, lr from 0.005 to 0.2, steps = 10 / lr),
  UVS ended with both objectives lower on every start with y0 >= 1.5 (x0 - x_b); started
  near y = 0 it has no budget to spend and ends in the right valley like the sum. With
  c = 0.2 that region is smaller, with c = 0.8 larger. For x0 < x_b or x0 > x_r both
  methods decrease both objectives; there is nothing to show there.
* The problem is axis-aligned, which matters for Adam (it scales each coordinate).
* "Almost monotone": Adam's momentum overshoots the minimum near the end, so the UVS run
  has a few small rises, which the table reports (count of steps that rose by more than
  1e-3 of the objective's start value, and the largest climb above the lowest value seen
  so far, in % of the start value). They grow with lr: over the sweep in ``main()`` the
  largest UVS climb is ~0.1% of the start value at lr = 0.01 and ~8% at lr = 0.1, against
  ~150-180% for f2 under the sum. From starts with y0 <= 1 the crossing of the barrier
  takes up most of f1's y-budget and f1 climbs more (up to ~13% at lr = 0.05).

``main()`` prints that table for the default start and a sweep over a grid of start points
and learning rates, and returns the results.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csdfd_jax.transforms import stack_streams, uvs

METHODS = ("sum", "uvs")
START = (0.4, 2.0)
STEPS = 200
LR = 0.05
C = 0.5
RISE_TOL = 1e-3  # a step "rose" if it went up by more than RISE_TOL * |f(start)|

# The two local minima of f1 + f2 (y = 0): the barrier between them and the right one.
X_BARRIER = (1.0 - 2.0**-0.5) / 2.0
X_RIGHT = (1.0 + 2.0**-0.5) / 2.0


def f1(p: jax.Array) -> jax.Array:
  """The loud objective: steep in y, two equally deep valleys at x = -1 and x = +1."""
  x, y = p[0], p[1]
  return y**2 + 0.5 * (x**2 - 1.0) ** 2


def f2(p: jax.Array) -> jax.Array:
  """The quiet objective: depends on x only, minimal at x = -1."""
  x = p[0]
  return 0.125 * (x + 1.0) ** 2


def _optimizer(method: str, lr: jax.Array, c: float) -> optax.GradientTransformation:
  if method == "uvs":
    return optax.chain(uvs(c, num_streams=2), optax.adam(lr))
  return optax.adam(lr)


def _trajectory(method: str, steps: int, c: float, start: jax.Array, lr: jax.Array):
  tx = _optimizer(method, lr, c)

  def step(carry, _):
    p, state = carry
    if method == "uvs":
      grads = stack_streams(jax.grad(f1)(p), jax.grad(f2)(p))
    else:
      grads = jax.grad(lambda q: f1(q) + f2(q))(p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), p

  _, path = jax.lax.scan(step, (start, tx.init(start)), None, length=steps)
  path = jnp.concatenate([start[None], path])
  return path, jax.vmap(f1)(path), jax.vmap(f2)(path)


_trajectory_jit = jax.jit(_trajectory, static_argnums=(0, 1, 2))


def run(
  method: str,
  start: Sequence[float] = START,
  steps: int = STEPS,
  lr: float = LR,
  *,
  c: float = C,
) -> dict[str, np.ndarray]:
  """Optimises from ``start`` and returns the trajectories.

  Args:
    method: "sum" (``optax.adam(lr)`` on grad(f1 + f2)) or "uvs"
      (``optax.chain(uvs(c), optax.adam(lr))`` on the stacked [grad f1, grad f2]).
    start: the initial point (x0, y0).
    steps: number of optimiser steps.
    lr: Adam's learning rate.
    c: the UVS radius (ignored for "sum").

  Returns:
    ``f1`` and ``f2``: the objectives at every iterate, shape [steps + 1] (index 0 is the
    start); ``path``: the iterates, [steps + 1, 2]; ``x``: the final point, [2].
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  start_arr = jnp.asarray(start, jnp.float32).reshape(2)
  path, v1, v2 = _trajectory_jit(method, int(steps), float(c), start_arr, jnp.float32(lr))
  path = np.asarray(path)
  return {"f1": np.asarray(v1), "f2": np.asarray(v2), "path": path, "x": path[-1]}


def max_climb(f: np.ndarray) -> float:
  """The largest rise of f above the lowest value it had reached before."""
  return float(np.max(f - np.minimum.accumulate(f)))


def relative_climb(f: np.ndarray) -> float:
  """max_climb(f) as a fraction of |f[0]|."""
  return max_climb(f) / abs(float(f[0]))


def rising_steps(f: np.ndarray, tol: float = RISE_TOL) -> int:
  """How many steps raised f by more than tol * |f[0]|."""
  return int(np.sum(np.diff(f) > tol * abs(float(f[0]))))


def sacrificed(res: dict[str, np.ndarray]) -> bool:
  """Whether some objective ends higher than it started."""
  return bool(res["f1"][-1] > res["f1"][0] or res["f2"][-1] > res["f2"][0])


def both_lower(res: dict[str, np.ndarray]) -> bool:
  """Whether both objectives end lower than they started."""
  return bool(res["f1"][-1] < res["f1"][0] and res["f2"][-1] < res["f2"][0])


def sweep(
  xs: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
  ys: Sequence[float] = (1.5, 2.0, 3.0),
  lrs: Sequence[float] = (0.01, 0.05, 0.1),
  horizon: float = 10.0,
) -> list[dict[str, float | int]]:
  """Runs both methods from every start (x0, y0) at every lr, steps = horizon / lr (so
  every run can travel the same distance), and summarises each lr: on how many starts
  the sum ends with an objective higher than it started, on how many UVS ends with both
  lower, and the largest climb (``relative_climb``, over both objectives and all starts)
  that each method makes along the way."""
  rows = []
  for lr in lrs:
    steps = round(horizon / lr)
    n = sum_bad = uvs_good = 0
    sum_climb = uvs_climb = 0.0
    for x0 in xs:
      for y0 in ys:
        r_sum = run("sum", (x0, y0), steps, lr)
        r_uvs = run("uvs", (x0, y0), steps, lr)
        n += 1
        sum_bad += sacrificed(r_sum)
        uvs_good += both_lower(r_uvs)
        sum_climb = max(sum_climb, relative_climb(r_sum["f1"]), relative_climb(r_sum["f2"]))
        uvs_climb = max(uvs_climb, relative_climb(r_uvs["f1"]), relative_climb(r_uvs["f2"]))
    rows.append(
      {
        "lr": lr,
        "steps": steps,
        "starts": n,
        "sum_sacrifices": sum_bad,
        "uvs_both_lower": uvs_good,
        "sum_max_climb": sum_climb,
        "uvs_max_climb": uvs_climb,
      }
    )
  return rows


def _row(method: str, res: dict[str, np.ndarray]) -> str:
  f1_, f2_ = res["f1"], res["f2"]
  return (
    f"{method:<5}{f1_[0]:8.3f} ->{f1_[-1]:7.3f}{f2_[0]:8.3f} ->{f2_[-1]:7.3f}"
    f"{100 * relative_climb(f1_):9.2f}%{100 * relative_climb(f2_):9.2f}%"
    f"{rising_steps(f1_):7d}{rising_steps(f2_):7d}   ({res['x'][0]:+.3f}, {res['x'][1]:+.3f})"
  )


def main() -> dict[str, object]:
  """Runs both methods from the default start, prints the table and a robustness sweep."""
  results: dict[str, object] = {m: run(m) for m in METHODS}
  print(
    f"start {START}, {STEPS} steps, Adam lr {LR}, UVS c {C}; "
    f"sum of objectives: barrier x = {X_BARRIER:.3f}, right valley x = {X_RIGHT:.3f}"
  )
  print(
    "meth       f1 start->end      f2 start->end   f1 climb  f2 climb  f1 up  f2 up   final (x, y)"
  )
  for m in METHODS:
    print(_row(m, results[m]))
  print(
    "(climb: largest rise above the lowest value so far, in % of the start value; "
    f"up: steps that rose by more than {RISE_TOL:g} x the start value)"
  )
  rows = sweep()
  print("\nsweep: starts x0 in (0.2, 0.4, 0.6, 0.8) x y0 in (1.5, 2, 3), steps = 10 / lr")
  for r in rows:
    print(
      f"  lr {r['lr']:<5} steps {r['steps']:<5} sum ends with an objective higher: "
      f"{r['sum_sacrifices']}/{r['starts']}, UVS ends with both lower: "
      f"{r['uvs_both_lower']}/{r['starts']}; largest climb: sum "
      f"{100 * r['sum_max_climb']:.0f}%, UVS {100 * r['uvs_max_climb']:.1f}%"
    )
  results["sweep"] = rows
  return results


if __name__ == "__main__":
  main()
