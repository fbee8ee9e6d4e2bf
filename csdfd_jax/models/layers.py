"""Pieces shared by the backbone families: PyTorch-compatible BatchNorm and stochastic depth,
the state-dict name mapping, and the variant/preprocessing tables' lookups.

The Flax module names of every family mirror the checkpoint keys (``layer1_0`` for
``layer1.0``), so a state dict maps onto the variables by name alone
(:func:`variables_from_torch`) and nothing needs a per-key table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from csdfd_jax.models.weights import StrictMapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics, so train-mode running statistics match torch.

  Train mode normalises with the biased batch variance but updates the running variance
  with the unbiased one (n / (n - 1)), with ``momentum`` weighting the new batch (torch
  convention: running = (1 - m) running + m batch). Statistics are computed in float32
  whatever the compute dtype (float64 stays float64, for reference tests), and so is the
  normalisation ``(x - mean) * k + bias`` (XLA fuses the casts into it), cast back to the
  compute dtype at the end: folding it into ``x * k + (bias - mean * k)`` in bfloat16 loses
  the small difference of two large terms when |mean| >> std. Variables: ``scale``/``bias``
  (torch ``weight``/``bias``), ``batch_stats`` ``mean``/``var`` (``running_mean``/
  ``running_var``).
  """

  epsilon: float = 1e-5
  momentum: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      if not self.is_initializing():
        n = x.size // features
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def drop_path(module: nn.Module, x: jnp.ndarray, rate: float, train: bool) -> jnp.ndarray:
  """Stochastic depth: drops whole residual branches per sample, scaling kept ones by
  1 / (1 - rate) (timm ``DropPath``). Draws from ``module``'s "dropout" rng stream."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(
    module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1)
  )
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


_TORCH_LEAF = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def torch_key(path: Sequence[str]) -> str:
  """Flax variable path -> PyTorch state-dict key: ('params', 'layer1_0', 'conv1', 'kernel')
  -> 'layer1.0.conv1.weight'. A trailing ``_<digits>`` on a module name is a list index."""
  collection, *modules, leaf = path
  parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join([*parts, _TORCH_LEAF.get((collection, leaf), leaf)])


def _kernel_to_flax(w: np.ndarray) -> np.ndarray:
  """torch Conv (O, I/g, kh, kw) -> Flax (kh, kw, I/g, O); torch Linear (O, I) -> (I, O)."""
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T


def variables_from_torch(
  state_dict: Mapping[str, np.ndarray], reference: Any, *, what: str
) -> dict:
  """Fills every leaf of ``reference`` (e.g. ``jax.eval_shape`` of ``model.init``) from the
  state-dict key named by :func:`torch_key`, strictly: a missing, unused (other than
  ``num_batches_tracked``) or mis-shaped key raises ``WeightMappingError`` naming it."""
  mapping = StrictMapping(state_dict, ignore=("num_batches_tracked",))
  out = {}
  for path, leaf in traverse_util.flatten_dict(reference).items():
    transform = _kernel_to_flax if path[-1] == "kernel" else None
    out[path] = mapping.take(torch_key(path), tuple(leaf.shape), transform)
  mapping.finish(what)
  return traverse_util.unflatten_dict({p: np.asarray(v, np.float32) for p, v in out.items()})


def split_head(
  state_dict: Mapping[str, np.ndarray], head: str, num_classes: int | None
) -> tuple[int, dict[str, np.ndarray]]:
  """Resolves the classifier ``head`` (key prefix, e.g. "fc") of a checkpoint.

  ``num_classes=None`` keeps the checkpoint's classifier (its size, or 0 without one);
  ``num_classes=0`` drops it deliberately (a backbone from an ImageNet checkpoint);
  a positive number must match the checkpoint's classifier.
  """
  sd = dict(state_dict)
  if num_classes is None:
    weight = sd.get(f"{head}.weight")
    return (0 if weight is None else int(np.shape(weight)[0])), sd
  if num_classes == 0:
    for suffix in ("weight", "bias"):
      sd.pop(f"{head}.{suffix}", None)
  return num_classes, sd


def variant_config(variants: Mapping[str, dict], variant: str, family: str) -> dict[str, Any]:
  """Sizes of ``variant``; a timm pretrained tag ("resnet50.a1_in1k") names its architecture."""
  arch = variant.split(".", 1)[0]
  if arch not in variants:
    raise ValueError(f"unknown {family} variant {variant!r}; known: {', '.join(variants)}")
  return dict(variants[arch])


def variant_preprocessing(table: Mapping[str, dict], variant: str) -> dict[str, Any]:
  """``table[variant]`` for a tag with its own normalisation, else the architecture's entry."""
  return dict(table.get(variant) or table[variant.split(".", 1)[0]])


def param_count(tree: Any) -> int:
  """Number of scalars in a (possibly abstract) parameter tree."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def abstract_variables(model: nn.Module, size: int = 64) -> Any:
  """Shapes of ``model.init`` variables without computing anything (``jax.eval_shape``)."""
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
