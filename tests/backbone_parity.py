"""Helpers shared by the backbone parity tests (timm/torchvision -> Flax)."""

from __future__ import annotations

import functools

import jax
import numpy as np


def state(model) -> dict[str, np.ndarray]:
  """A torch module's state dict as numpy arrays."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def apply(model, variables, x, **kw):
  """Jitted apply: one compilation is much faster than eager op-by-op dispatch on CPU."""
  return jax.jit(functools.partial(model.apply, **kw))(variables, x)


def eval_both(model, variables, x):
  """Logits (+ intermediates) and pooled features in one compilation (XLA shares the trunk)."""
  logits = functools.partial(model.apply, mutable=["intermediates"])
  return jax.jit(lambda v, x: (logits(v, x), model.clone(num_classes=0).apply(v, x)))(variables, x)


def matmul_dtypes(model, variables, x) -> set[str]:
  """Operand dtypes of every convolution and matrix product the forward pass traces."""
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, tuple | list) else [param]:
          if hasattr(sub, "eqns"):
            visit(sub)
          elif hasattr(sub, "jaxpr"):
            visit(sub.jaxpr)

  visit(jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, x).jaxpr)
  return found
