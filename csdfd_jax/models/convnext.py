"""ConvNeXt (Liu et al. 2022) in Flax Linen, loading timm ``convnext_*`` weights.

The gradient-regularisation paper uses ConvNeXt-B. Layout as timm: a 4x4/4 patchify stem
(conv + LayerNorm), four stages (stages 1-3 start with LayerNorm + 2x2/2 conv), blocks
``x + DropPath(gamma * fc2(GELU(fc1(LN(dwconv7x7(x))))))`` with per-channel layer scale
``gamma``, then global average pooling, a LayerNorm (``head.norm``) and the classifier
(``head.fc``). NHWC makes timm's channels-first ``LayerNorm2d`` an ordinary LayerNorm over
the last axis (eps 1e-6 everywhere). Names mirror timm's keys (``stages_2.blocks_5.conv_dw``).
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
  abstract_variables,
  drop_path,
  split_head,
  variables_from_torch,
  variant_config,
  variant_preprocessing,
)
from csdfd_jax.models.vit import CLIP_MEAN, CLIP_STD, Mlp, layer_norm

VARIANTS: dict[str, dict[str, Any]] = {
  "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
  "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
  "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
  "tiny": dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64)),
}
PREPROCESSING = {v: dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224) for v in VARIANTS}
# timm tags (pretrained cfgs of timm 1.0) whose preprocessing differs from the architecture's:
# higher-resolution fine-tunes, and the OpenCLIP-trained ConvNeXt-B weights (CLIP mean/std).
for _arch in ("convnext_tiny", "convnext_small", "convnext_base"):
  for _tag, _size in [
    ("fb_in22k_ft_in1k_384", 384),
    ("in12k_ft_in1k_384", 384),
    ("eupe_lvd1689m", 256),
  ]:
    PREPROCESSING[f"{_arch}.{_tag}"] = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=_size)
_CLIP_TAGS = (
  "laion2b laion2b_augreg laion2b_augreg_ft_in1k laion2b_augreg_ft_in12k laiona laiona_320 "
  "laion2b_augreg_ft_in12k_in1k laion2b_augreg_ft_in12k_in1k_384 laiona_augreg_320 "
  "laiona_augreg_ft_in1k_384"
).split()
for _tag in (f"clip_{t}" for t in _CLIP_TAGS):
  _size = int(_tag[-3:]) if _tag[-3:].isdigit() else 256
  PREPROCESSING[f"convnext_base.{_tag}"] = dict(mean=CLIP_MEAN, std=CLIP_STD, input_size=_size)


class Block(nn.Module):
  """Depthwise 7x7 -> LN -> ``mlp`` (4x, exact GELU) -> layer scale ``gamma`` -> DropPath."""

  drop_path_rate: float = 0.0
  ls_init_value: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    c = x.shape[-1]
    y = nn.Conv(
      c, (7, 7), padding=[(3, 3)] * 2, feature_group_count=c, dtype=self.dtype, name="conv_dw"
    )(x)
    y = layer_norm("norm", self.dtype)(y)
    y = Mlp(4 * c, dtype=self.dtype, name="mlp")(y, train)
    gamma = self.param("gamma", nn.initializers.constant(self.ls_init_value), (c,), jnp.float32)
    return x + drop_path(self, y * gamma.astype(self.dtype), self.drop_path_rate, train)


class Stage(nn.Module):
  """Optional LN + 2x2/2 conv downsample (``downsample_0``/``_1``), then ``blocks_<j>``."""

  dim: int
  downsample: bool
  drop_path_rates: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if self.downsample:
      x = layer_norm("downsample_0", self.dtype)(x)
      x = nn.Conv(self.dim, (2, 2), (2, 2), "VALID", dtype=self.dtype, name="downsample_1")(x)
    for j, rate in enumerate(self.drop_path_rates):
      x = Block(rate, dtype=self.dtype, name=f"blocks_{j}")(x, train)
    return x


class Head(nn.Module):
  """Global average pool -> LayerNorm (``norm``) -> dropout -> ``fc`` (if ``num_classes``)."""

  num_classes: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = layer_norm("norm", self.dtype)(x.mean(axis=(1, 2)))
    if not self.num_classes:
      return x
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


class ConvNeXt(nn.Module):
  """ConvNeXt. Sows ``stage0``..``stage3`` and ``features`` (the final map, before the head
  norm) into "intermediates". Returns logits when ``num_classes > 0``, else the pooled,
  normalised features (timm ``forward_head(pre_logits=True)``). ``drop_path_rate`` rises
  linearly from 0 over all blocks, as in timm."""

  depths: Sequence[int]
  dims: Sequence[int]
  num_classes: int = 0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    x = nn.Conv(self.dims[0], (4, 4), (4, 4), "VALID", dtype=self.dtype, name="stem_0")(
      x.astype(self.dtype)
    )
    x = layer_norm("stem_1", self.dtype)(x)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    start = 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims, strict=True)):
      stage_rates = tuple(rates[start : start + depth])
      x = Stage(dim, i > 0, stage_rates, self.dtype, name=f"stages_{i}")(x, train)
      start += depth
      self.sow("intermediates", f"stage{i}", x)
    self.sow("intermediates", "features", x)
    return Head(self.num_classes, self.drop_rate, self.dtype, name="head")(x, train)


def _config(variant: str) -> dict[str, Any]:
  return variant_config(VARIANTS, variant, "ConvNeXt")


def create(variant: str, *, num_classes: int = 0, dtype: Any = jnp.float32, **kw: Any) -> ConvNeXt:
  """ConvNeXt for ``variant`` (see ``VARIANTS``); ``kw`` overrides fields (``drop_path_rate``)."""
  return ConvNeXt(**{**_config(variant), **kw}, num_classes=num_classes, dtype=dtype)


def num_features(variant: str) -> int:
  return _config(variant)["dims"][-1]


def preprocessing(variant: str) -> dict[str, Any]:
  """Input size and mean/std (0..1 units) the weights of ``variant`` (optionally with its timm
  tag) expect."""
  _config(variant)
  return variant_preprocessing(PREPROCESSING, variant)


def convert_timm(
  state_dict: Mapping[str, np.ndarray], variant: str, *, num_classes: int | None = None, **kw: Any
) -> dict:
  """timm ``convnext_*`` state dict -> Flax variables {"params"}. ``num_classes``: see
  ``layers.split_head`` (None keeps the checkpoint's ``head.fc``; ``head.norm`` always loads)."""
  num_classes, sd = split_head(state_dict, "head.fc", num_classes)
  reference = abstract_variables(create(variant, num_classes=num_classes, **kw), size=64)
  return variables_from_torch(sd, reference, what=f"ConvNeXt {variant!r} checkpoint")
