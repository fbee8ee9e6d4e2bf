"""Training methods. A method is one module with ``build(name, config) -> Method``.

| method | streams | update | module |
| --- | --- | --- | --- |
| ``O``     | o    | g_o                      | erm |
| ``S``     | s    | g_s                      | erm |
| ``O+S``   | o, s | g_o + g_s (paper Eq. 3)  | erm |
| ``uvs``   | o, s | UVS on all parameters    | csdfd |
| ``cgr``   | o, s | CGR on phi, sum elsewhere | csdfd |
| ``csdfd`` | o, s (or K declared streams) | CGR on phi, UVS elsewhere (Algorithm 1) | csdfd |
| ``sam``   | those of ``sam.base`` (S) | the base method's, at theta + rho g/||g|| | sam |
| ``roga``  | K declared domains (o, s) | mean of per-domain RoGA gradients (Eq. 6) | roga |
| ``gr``    | ``gr.streams`` (o) | (1-a) g + a g(PIM-perturbed features), summed (Eq. 12) | gr |
| ``dualflat`` | ``gr.streams`` (o) | GR plus b g(theta + r' g/||g||) (Eq. 14) | gr |
| ``gmdf``  | one per dataset | inner SGD on experts, Adam on the base (Eq. 13-15) | gmdf |

The first six compute per-stream BCE gradients; ``cgr.mode="exact"`` adds the exact gradient of
the conflict loss (Eq. 18) to phi's.

The contract (``Method``): the method declares its streams (``specs``: which records give each
stream's reals and fakes, see ``csdfd_jax.data.pipeline.StreamSpec``), produces its own stacked
gradients (``gradients(model)`` returns the ``GradFn`` of ``methods.step``), names the gradient
transformation that turns them into one update (and, if it needs one, its own optimizer around
the base one), and reads its own diagnostics from the optimizer state. The loop
(``train_lib``) and the step (``methods.step``) know no method by name. A method outside this
package is named by its module path: ``config.method = "my_project.my_method"`` imports that
module and calls its ``build(name, config)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import flax.linen as nn
import optax

from csdfd_jax.data.pipeline import StreamSpec, default_spec
from csdfd_jax.methods.step import GradFn, bce, per_stream
from csdfd_jax.transforms import opt_state_scalars

METHODS = {
  "O": "erm",
  "S": "erm",
  "O+S": "erm",
  "uvs": "csdfd",
  "cgr": "csdfd",
  "csdfd": "csdfd",
  "sam": "sam",
  "roga": "roga",
  "gr": "gr",
  "dualflat": "gr",
  "gmdf": "gmdf",
}


def bce_per_stream(streams: tuple[str, ...]) -> Callable[[nn.Module], GradFn]:
  """The default gradients: each stream's BCE on its own sub-batch (``per_stream(bce)``)."""
  return lambda model: per_stream(bce(model), streams)


class Method(NamedTuple):
  name: str
  streams: tuple[str, ...]  # the stream names: the batch's keys and the stacked axis' order
  transform: optax.GradientTransformation  # stacked [K, ...] updates -> one update
  gradients: Callable[[nn.Module], GradFn] | None = None  # None: bce_per_stream(streams)
  diagnostics: Callable[[Any], dict] = opt_state_scalars  # scalars from the opt state
  specs: tuple[StreamSpec, ...] | None = None  # None: the standard spec of each stream name
  # The names of the stacked gradient axis when it is not one entry per stream (a method that
  # combines its streams itself, e.g. GM-DF's one meta-gradient: ("meta",)).
  axes: tuple[str, ...] | None = None
  # A method that owns its optimizer: base optimizer -> the optimizer the step applies after
  # ``transform`` (GM-DF: SGD on the expert parameters, the base optimizer on the rest, the
  # text tower frozen). None: the base optimizer (config.optim) on every parameter.
  optimizer: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = None

  def gradient_fn(self, model: nn.Module) -> GradFn:
    make = self.gradients or bce_per_stream(self.streams)
    return make(model)

  @property
  def update_axes(self) -> tuple[str, ...]:
    return self.axes or self.streams

  def full_optimizer(self, base: optax.GradientTransformation) -> optax.GradientTransformation:
    """``transform`` then the method's optimizer around ``base`` (or ``base`` itself)."""
    return optax.chain(self.transform, self.optimizer(base) if self.optimizer else base)

  def stream_specs(self) -> tuple[StreamSpec, ...]:
    specs = self.specs or tuple(default_spec(s) for s in self.streams)
    if tuple(s.name for s in specs) != self.streams:
      raise ValueError(f"method {self.name!r}: specs {specs} do not match streams {self.streams}")
    return specs


def stream_names(config) -> tuple[str, ...]:
  """The declared streams of a multi-stream method: ``config.data.streams``, comma-separated
  names (``pipeline.default_spec``); default (o, s)."""
  spec = getattr(config, "data", None) and config.data.get("streams", "")
  names = tuple(s.strip() for s in spec.split(",") if s.strip()) if spec else ("o", "s")
  if len(names) < 2:
    raise ValueError(f"data.streams={spec!r}: a multi-stream method needs at least two streams")
  return names


def module_of(name: str) -> ModuleType:
  """The module that builds method ``name``: one of ``METHODS``, or a module path."""
  if name in METHODS:
    return importlib.import_module(f"csdfd_jax.methods.{METHODS[name]}")
  try:
    module = importlib.import_module(name)
  except ImportError as e:
    raise ValueError(
      f"unknown method {name!r}; valid: {', '.join(METHODS)}, or the import path of a module "
      f"with build(name, config) ({e})"
    ) from None
  if not callable(getattr(module, "build", None)):
    raise ValueError(f"method module {name!r} has no build(name, config) function")
  return module


def get(name: str, config) -> Method:
  """The method named ``name`` built from ``config``."""
  method = module_of(name).build(name, config)
  if not isinstance(method, Method):
    raise TypeError(f"{name}.build returned {type(method).__name__}, not a methods.Method")
  return method
