"""Training methods: each maps a config to the data streams it reads and the gradient
transformation that turns stacked per-stream gradients into one update.

| ``config.method`` | streams | update | module |
| --- | --- | --- | --- |
| ``O``     | o    | g_o                      | erm |
| ``S``     | s    | g_s                      | erm |
| ``O+S``   | o, s | g_o + g_s (paper Eq. 3)  | erm |
| ``uvs``   | o, s | UVS on all parameters    | csdfd |
| ``cgr``   | o, s | CGR on phi, sum elsewhere | csdfd |
| ``csdfd`` | o, s | CGR on phi, UVS elsewhere (Algorithm 1) | csdfd |

Every method shares :mod:`csdfd_jax.methods.step`: per-stream losses and gradients on the
streams' own sub-batches, so O+S and csdfd see exactly the same images per step and differ
only in how the gradients are combined.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import optax

METHODS = {"O": "erm", "S": "erm", "O+S": "erm", "uvs": "csdfd", "cgr": "csdfd", "csdfd": "csdfd"}


class Method(NamedTuple):
  name: str
  streams: tuple[str, ...]
  transform: optax.GradientTransformation  # stacked [K, ...] updates -> one update


def get(name: str, config) -> Method:
  """The method named ``name`` built from ``config`` (its ``uvs``/``cgr`` sections)."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
  module = importlib.import_module(f"csdfd_jax.methods.{METHODS[name]}")
  return module.build(name, config)
