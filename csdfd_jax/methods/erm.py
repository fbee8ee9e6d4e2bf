"""Empirical risk minimisation on one or both streams (paper Eq. 1-3).

``O`` trains on real + original fakes, ``S`` on real + self-blended fakes, ``O+S`` on both
with the summed loss L1 + L2 of Eq. 3 — the '1+1<2' baseline whose stream gradients
conflict (Eq. 4-5).
"""

from __future__ import annotations

import jax
import optax

from csdfd_jax.methods import Method
from csdfd_jax.transforms import stream_sum

STREAMS = {"O": ("o",), "S": ("s",), "O+S": ("o", "s")}


def sum_streams(reduction: str = "sum") -> optax.GradientTransformation:
  """Stacked [K, ...] updates -> their sum (the gradient of Eq. 3) or mean over streams."""
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

  def reduce(u):
    total = stream_sum(u)
    return total if reduction == "sum" else total / u.shape[0]

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(reduce, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def build(name: str, config) -> Method:
  """O, S or O+S; O+S combines its streams by ``config.reduction`` like every other method."""
  return Method(name, STREAMS[name], sum_streams(config.reduction))
