"""ResNet-34/50 (He et al. 2016) in Flax Linen, loading timm and torchvision weights.

RoGA uses ResNet-34 and the gradient-regularisation paper ResNet-50. The layout is the
torchvision one that timm keeps (stride on the 3x3 conv of the bottleneck, "ResNet v1.5"),
and both libraries write the same state-dict keys (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``), so one name mapping serves both sources.

This file also holds the small PyTorch-compatible pieces shared by the other families
(:class:`BatchNorm`, :func:`drop_path`, :func:`variables_from_torch`, :func:`split_head`): the
Flax module names mirror the checkpoint keys (``layer1_0`` for ``layer1.0``), so a state
dict maps onto the variables by name alone, and nothing needs a per-key table.
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
  whatever the compute dtype. Variables: ``scale``/``bias`` (torch ``weight``/``bias``),
  ``batch_stats`` ``mean``/``var`` (``running_mean``/``running_var``).
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
    xf = x.astype(jnp.float32)
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


VARIANTS: dict[str, dict[str, Any]] = {
  "resnet34": dict(block="basic", layers=(3, 4, 6, 3)),
  "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
  "tiny": dict(block="basic", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)),
  "tiny_bottleneck": dict(block="bottleneck", layers=(1, 2, 1, 1), channels=(8, 16, 32, 64)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
PREPROCESSING = {v: dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224) for v in VARIANTS}
# timm tags (pretrained cfgs of timm 1.0) whose preprocessing differs from the architecture's.
PREPROCESSING["resnet34.ra4_e3600_r224_in1k"] = dict(
  mean=(0.5,) * 3, std=(0.5,) * 3, input_size=224
)
for _tag, _size in [("34.a3", 160), ("50.a3", 160), ("50.a1h", 176), ("50.tv2", 176)]:
  PREPROCESSING[f"resnet{_tag}_in1k"] = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=_size)


class Block(nn.Module):
  """BasicBlock (two 3x3 convs) or Bottleneck (1x1, strided 3x3, 1x1 x4), ReLU after the add."""

  kind: str
  planes: int
  stride: int
  downsample: bool
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
      f, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False, dtype=self.dtype, name=name
    )
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)  # noqa: E731
    shortcut = x
    if self.kind == "basic":
      y = nn.relu(bn("bn1")(conv(self.planes, 3, self.stride, "conv1")(x), train))
      y = bn("bn2")(conv(self.planes, 3, 1, "conv2")(y), train)
    else:
      y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, "conv1")(x), train))
      y = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, "conv2")(y), train))
      y = bn("bn3")(conv(self.planes * 4, 1, 1, "conv3")(y), train)
    if self.downsample:
      shortcut = conv(y.shape[-1], 1, self.stride, "downsample_0")(x)
      shortcut = bn("downsample_1")(shortcut, train)
    return nn.relu(drop_path(self, y, self.drop_path_rate, train) + shortcut)


class ResNet(nn.Module):
  """ResNet: 7x7/2 stem (64 channels, as in timm and torchvision), 3x3/2 max-pool, four
  stages ``layer1..4``, average pool, ``fc``.

  Sows ``layer1``..``layer4`` and ``features`` (the final map) into "intermediates";
  returns logits when ``num_classes > 0``, else the pooled features.
  """

  block: str
  layers: Sequence[int]
  channels: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    x = nn.Conv(64, (7, 7), (2, 2), [(3, 3)] * 2, use_bias=False, dtype=self.dtype, name="conv1")(
      x.astype(self.dtype)
    )
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    x = nn.max_pool(x, (3, 3), (2, 2), [(1, 1)] * 2)
    total, index = sum(self.layers), 0
    for stage, (planes, depth) in enumerate(zip(self.channels, self.layers, strict=True)):
      for i in range(depth):
        stride = 2 if stage > 0 and i == 0 else 1
        x = Block(
          self.block,
          planes,
          stride,
          downsample=i == 0 and (stride != 1 or x.shape[-1] != planes * _EXPANSION[self.block]),
          drop_path_rate=self.drop_path_rate * index / max(total - 1, 1),
          dtype=self.dtype,
          name=f"layer{stage + 1}_{i}",
        )(x, train)
        index += 1
      self.sow("intermediates", f"layer{stage + 1}", x)
    self.sow("intermediates", "features", x)
    x = x.mean(axis=(1, 2))
    if not self.num_classes:
      return x
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def _config(variant: str) -> dict[str, Any]:
  return variant_config(VARIANTS, variant, "ResNet")


def create(variant: str, *, num_classes: int = 0, dtype: Any = jnp.float32, **kw: Any) -> ResNet:
  """ResNet for ``variant`` (see ``VARIANTS``); ``kw`` overrides fields (``drop_path_rate``)."""
  return ResNet(**{**_config(variant), **kw}, num_classes=num_classes, dtype=dtype)


def num_features(variant: str) -> int:
  cfg = {"channels": (64, 128, 256, 512), **_config(variant)}
  return cfg["channels"][-1] * _EXPANSION[cfg["block"]]


def preprocessing(variant: str) -> dict[str, Any]:
  """Input size and mean/std (0..1 units) the weights of ``variant`` (optionally with its timm
  tag) expect."""
  _config(variant)
  return variant_preprocessing(PREPROCESSING, variant)


def abstract_variables(model: nn.Module, size: int = 64) -> Any:
  """Shapes of ``model.init`` variables without computing anything (``jax.eval_shape``)."""
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def convert_timm(
  state_dict: Mapping[str, np.ndarray], variant: str, *, num_classes: int | None = None, **kw: Any
) -> dict:
  """timm ``resnet34``/``resnet50`` state dict -> Flax variables {"params", "batch_stats"}.

  ``num_classes``: see :func:`split_head` (None keeps the checkpoint's ``fc``).
  """
  num_classes, sd = split_head(state_dict, "fc", num_classes)
  reference = abstract_variables(create(variant, num_classes=num_classes, **kw))
  return variables_from_torch(sd, reference, what=f"ResNet {variant!r} checkpoint")


def convert_torchvision(
  state_dict: Mapping[str, np.ndarray], variant: str, *, num_classes: int | None = None, **kw: Any
) -> dict:
  """torchvision ``resnet34``/``resnet50`` state dict -> Flax variables. torchvision and
  timm share keys and architecture for these two models (checked by the parity tests)."""
  return convert_timm(state_dict, variant, num_classes=num_classes, **kw)
