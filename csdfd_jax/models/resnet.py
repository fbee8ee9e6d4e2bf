"""ResNet-34/50 (He et al. 2016) in Flax Linen, loading timm and torchvision weights.

RoGA uses ResNet-34 and the gradient-regularisation paper ResNet-50. The layout is the
torchvision one that timm keeps (stride on the 3x3 conv of the bottleneck, "ResNet v1.5"),
and both libraries write the same state-dict keys (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``), so one name mapping serves both sources.

Module names mirror the checkpoint keys, so :func:`layers.variables_from_torch` maps
either state dict by name alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from csdfd_jax.models.layers import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  BatchNorm,
  abstract_variables,
  drop_path,
  split_head,
  variables_from_torch,
  variant_config,
  variant_preprocessing,
)

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
