"""Xception (Chollet 2017) as used in deepfake detection, loading timm ``legacy_xception``.

This is the Keras-ported ImageNet Xception that FaceForensics++ (Roessler et al. 2019)
fine-tuned and that CS-DFD (Table II) and the gradient-regularisation paper use as a
baseline: an entry flow (two plain 3x3 convs, then blocks 1-3 that halve the resolution),
a middle flow (blocks 4-11 at 728 channels) and an exit flow (block 12, two separable convs
to 2048 channels), every conv followed by BatchNorm. Blocks are
``[ReLU, SeparableConv 3x3, BN] x reps`` with a 1x1 strided conv + BN shortcut when the
shape changes. Inputs are 299 px normalised to [-1, 1] (mean = std = 0.5).

Module names mirror timm's keys; a block's layers keep their ``rep.<index>`` positions
(``block1.rep.0.conv1`` is block 1's first depthwise conv, ``block2.rep.2`` its first BN).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from csdfd_jax.models.layers import (
  BatchNorm,
  abstract_variables,
  split_head,
  variables_from_torch,
  variant_config,
  variant_preprocessing,
)

# (out channels, reps, stride, start_with_relu, grow_first) for block1..block12.
_ENTRY = [(128, 2, 2, False, True), (256, 2, 2, True, True), (728, 2, 2, True, True)]
_MIDDLE = [(728, 3, 1, True, True)] * 8
_EXIT = [(1024, 2, 2, True, False)]
VARIANTS: dict[str, dict[str, Any]] = {
  "legacy_xception": dict(blocks=tuple(_ENTRY + _MIDDLE + _EXIT), head_channels=(1536, 2048)),
  # Same topology, narrow: entry 8-16-32, one middle block, exit 48 -> 64 -> 96.
  "tiny": dict(
    stem_channels=(4, 8),
    blocks=(
      (16, 2, 2, False, True),
      (24, 2, 2, True, True),
      (32, 2, 2, True, True),
      (32, 3, 1, True, True),
      (48, 2, 2, True, False),
    ),
    head_channels=(64, 96),
  ),
}
PREPROCESSING = {v: dict(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=299) for v in VARIANTS}


class SeparableConv2d(nn.Module):
  """Depthwise 3x3 (``conv1``) then pointwise 1x1 (``pointwise``), no biases."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    x = nn.Conv(
      c,
      (3, 3),
      padding=[(1, 1)] * 2,
      feature_group_count=c,
      use_bias=False,
      dtype=self.dtype,
      name="conv1",
    )(x)
    return nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="pointwise")(x)


class Block(nn.Module):
  """``reps`` x (ReLU, SeparableConv, BN), then a 3x3/2 max-pool when strided, plus a
  shortcut. ``grow_first`` widens in the first separable conv, else in the last one."""

  out_channels: int
  reps: int
  stride: int
  start_with_relu: bool
  grow_first: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inp: jnp.ndarray, train: bool) -> jnp.ndarray:
    in_channels = inp.shape[-1]
    x, index = inp, 0
    for i in range(self.reps):
      if self.grow_first or i == self.reps - 1:
        out = self.out_channels
      else:
        out = in_channels
      if i > 0 or self.start_with_relu:
        x = nn.relu(x)
        index += 1  # the ReLU holds a position in timm's ``rep`` Sequential
      x = SeparableConv2d(out, self.dtype, name=f"rep_{index}")(x)
      x = BatchNorm(dtype=self.dtype, name=f"rep_{index + 1}")(x, train)
      index += 2
    if self.stride != 1:
      x = nn.max_pool(x, (3, 3), (self.stride, self.stride), [(1, 1)] * 2)
    if self.out_channels != in_channels or self.stride != 1:
      s = (self.stride, self.stride)
      skip = nn.Conv(self.out_channels, (1, 1), s, use_bias=False, dtype=self.dtype, name="skip")
      inp = BatchNorm(dtype=self.dtype, name="skipbn")(skip(inp), train)
    return x + inp


class Xception(nn.Module):
  """Xception. Sows (as timm's feature taps, each ReLU-activated) ``stem`` (1/2),
  ``entry1`` (1/4), ``entry2`` (1/8), ``middle`` (1/16) and ``features`` (1/32, the final
  map) into "intermediates". Returns logits (``fc``) when ``num_classes > 0``, else the
  average-pooled features."""

  blocks: tuple[tuple[int, int, int, bool, bool], ...]
  head_channels: tuple[int, int]
  stem_channels: tuple[int, int] = (32, 64)
  num_classes: int = 0
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    for i, (features, stride) in enumerate(zip(self.stem_channels, (2, 1), strict=True), start=1):
      x = nn.Conv(
        features, (3, 3), stride, "VALID", use_bias=False, dtype=self.dtype, name=f"conv{i}"
      )(x)
      x = nn.relu(BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train))
    self.sow("intermediates", "stem", x)
    taps = {1: "entry1", 2: "entry2", len(self.blocks) - 1: "middle"}
    for i, (out, reps, stride, relu_first, grow_first) in enumerate(self.blocks, start=1):
      x = Block(out, reps, stride, relu_first, grow_first, self.dtype, name=f"block{i}")(x, train)
      if i in taps:
        self.sow("intermediates", taps[i], nn.relu(x))
    for i, features in enumerate(self.head_channels, start=3):
      x = SeparableConv2d(features, self.dtype, name=f"conv{i}")(x)
      x = nn.relu(BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train))
    self.sow("intermediates", "features", x)
    x = x.mean(axis=(1, 2))
    if not self.num_classes:
      return x
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def _config(variant: str) -> dict[str, Any]:
  return variant_config(VARIANTS, variant, "Xception")


def create(variant: str, *, num_classes: int = 0, dtype: Any = jnp.float32, **kw: Any) -> Xception:
  """Xception for ``variant`` (see ``VARIANTS``); ``kw`` overrides fields (``drop_rate``)."""
  return Xception(**{**_config(variant), **kw}, num_classes=num_classes, dtype=dtype)


def num_features(variant: str) -> int:
  return _config(variant)["head_channels"][-1]


def preprocessing(variant: str) -> dict[str, Any]:
  """Input size and mean/std (0..1 units) the weights of ``variant`` (optionally with its timm
  tag) expect."""
  _config(variant)
  return variant_preprocessing(PREPROCESSING, variant)


def convert_timm(
  state_dict: Mapping[str, np.ndarray], variant: str, *, num_classes: int | None = None, **kw: Any
) -> dict:
  """timm ``legacy_xception`` (= Cadene's FF++ Xception) state dict -> Flax variables
  {"params", "batch_stats"}. ``num_classes``: see ``layers.split_head``."""
  num_classes, sd = split_head(state_dict, "fc", num_classes)
  reference = abstract_variables(create(variant, num_classes=num_classes, **kw), size=96)
  return variables_from_torch(sd, reference, what=f"Xception {variant!r} checkpoint")
