"""Flax Linen backbones (one module per family), the detection head, and weight import.

A config names a family module (``model.name = "efficientnet"``); :func:`create_backbone`
imports ``csdfd_jax.models.<name>`` and calls its ``create(variant, ...)``. No registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

FAMILIES = ("efficientnet", "vit", "xception", "resnet", "convnext", "clip")


def family(name: str) -> ModuleType:
  """The backbone family module ``csdfd_jax.models.<name>``; a clear error otherwise."""
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}")
  return importlib.import_module(f"csdfd_jax.models.{name}")


def create_backbone(name: str, variant: str, **kwargs):
  """``family(name).create(variant, **kwargs)``: a Flax module returning pooled features."""
  return family(name).create(variant, **kwargs)


def available_families() -> list[str]:
  """Families whose module is importable in this install."""
  present = {m.name for m in pkgutil.iter_modules(__path__)}
  return [f for f in FAMILIES if f in present]
