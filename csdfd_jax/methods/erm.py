"""Empirical risk minimisation on one or both streams (paper Eq. 1-3).

``O`` trains on real + original fakes, ``S`` on real + self-blended fakes, ``O+S`` on both
with the summed loss L1 + L2 of Eq. 3 — the '1+1<2' baseline whose stream gradients
conflict (Eq. 4-5).
"""

from __future__ import annotations

from csdfd_jax.methods import Method, stream_names
from csdfd_jax.transforms import sum_streams

__all__ = ["build", "sum_streams"]

STREAMS = {"O": ("o",), "S": ("s",), "O+S": ("o", "s")}


def build(name: str, config) -> Method:
  """O, S or O+S; O+S sums (``config.reduction``) the declared streams, (o, s) by default."""
  streams = stream_names(config) if name == "O+S" else STREAMS[name]
  return Method(name, streams, sum_streams(config.reduction))
