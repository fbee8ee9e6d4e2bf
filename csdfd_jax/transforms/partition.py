"""The CS-DFD optimizer of Algorithm 1: CGR on the projection layer, UVS on the rest.

``csdfd(base, projection="projection")`` returns

    optax.chain(optax.partition({"uvs": uvs(...), "cgr": cgr(...)}, labels), base)

so stacked per-stream gradients go in and one optimizer step comes out. UVS's Gram
matrix and norms cover only the non-projection parameters (theta in Algorithm 1), and
CGR's norms only the projection parameters (theta_p), as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from csdfd_jax.transforms.cgr import CGRState, cgr
from csdfd_jax.transforms.uvs import UVSState, uvs

PathPredicate = Callable[[tuple[str, ...]], bool]


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_labels(tree: Any, is_projection: PathPredicate) -> Any:
  """Labels every leaf "cgr" when ``is_projection(path)`` holds, else "uvs"; a path
  is the tuple of dict keys / attribute names / indices leading to the leaf."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "cgr" if is_projection(tuple(_key_name(k) for k in path)) else "uvs",
    tree,
  )


def _predicate(projection: str | Sequence[str] | PathPredicate) -> PathPredicate:
  if callable(projection):
    return projection
  names = {projection} if isinstance(projection, str) else set(projection)
  return lambda path: bool(names.intersection(path))


def csdfd(
  base: optax.GradientTransformation,
  *,
  projection: str | Sequence[str] | PathPredicate = "projection",
  c: float = 0.5,
  tau: float = 0.01,
  num_streams: int = 2,
  reduction: str = "sum",
  rest: optax.GradientTransformation | None = None,
  phi: optax.GradientTransformation | None = None,
  **uvs_options: Any,
) -> optax.GradientTransformation:
  """UVS + CGR on stacked stream gradients, followed by ``base`` (Algorithm 1).

  Args:
    base: the optimizer that consumes the combined update, e.g. optax.adam(1e-4).
    projection: which parameters form the projection layer phi: a name (or names)
      that must appear as a key on the parameter's path, or a predicate on the path.
    c, tau: the paper's hyper-parameters (Eq. 9 and Eq. 23): 0.5 and 0.01.
    num_streams, reduction: as for ``uvs`` and ``cgr``; shared so both halves of
      the network get the same step size.
    rest: the transform of the non-projection parameters instead of UVS (e.g.
      ``sum_streams()``: the CGR-only ablation).
    phi: the transform of the projection parameters instead of CGR's Eq. 24 (e.g.
      ``sum_streams()`` when the gradients already carry an exact conflict-loss term).
    **uvs_options: further options of ``uvs`` (rescale, num_iters, ...).

  Raises (at ``init``) if no parameter matches ``projection``: CGR would silently act
  on nothing.
  """
  is_projection = _predicate(projection)

  def labels(tree):
    return path_labels(tree, is_projection)

  if rest is None:
    rest = uvs(c, num_streams=num_streams, reduction=reduction, **uvs_options)
  if phi is None:
    phi = cgr(tau, num_streams=num_streams, reduction=reduction)
  inner = optax.partition({"uvs": rest, "cgr": phi}, labels)
  tx = optax.chain(inner, base)

  def init_fn(params):
    if "cgr" not in jax.tree.leaves(labels(params)):
      paths = [
        "/".join(_key_name(k) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0][:8]
      ]
      raise ValueError(
        f"No parameter matches projection={projection!r}, so CGR would act on nothing. "
        f"Some parameter paths: {paths}. Name the projection layer's key, or pass a "
        "predicate on the path."
      )
    return tx.init(params)

  return optax.GradientTransformation(init_fn, tx.update)


def opt_state_scalars(opt_state: Any) -> dict[str, jax.Array]:
  """The scalars this package's transforms keep in their states, found by state type: UVS's
  stream weights (``uvs_weight/<k>``) and CGR's correction ratio. Two states of one type
  (two UVS in one optimizer) would make them ambiguous: that is an error, not a guess."""
  found: dict[type, list] = {UVSState: [], CGRState: []}
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, tuple(found))):
    if isinstance(node, tuple(found)):
      found[type(node)].append(node)
  for kind, states in found.items():
    if len(states) > 1:
      raise ValueError(
        f"the optimizer state holds {len(states)} {kind.__name__}s: their diagnostics would be "
        "ambiguous. Give the method a diagnostics function that names the one to log."
      )
  out = {}
  if found[UVSState]:
    weights = found[UVSState][0].weights
    out |= {f"uvs_weight/{i}": weights[i] for i in range(weights.shape[0])}
  if found[CGRState]:
    out["cgr_correction_ratio"] = found[CGRState][0].correction_ratio
  return out
