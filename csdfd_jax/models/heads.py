"""The detector: input normalisation, a backbone, the projection layer phi, the classifier.

CS-DFD (paper Sec. IV-B, Eq. 17) inserts a learnable projection phi_{theta_p} between the
backbone features f and the binary classifier: f_hat = phi(f). The paper says only that phi
"is composed of several linear layers"; here it is ``len(projection_dims)`` Dense layers with
a GELU between consecutive layers (a stack of purely linear layers would collapse to one
matrix) and none after the last, so f_hat stays a linear read-out space for the classifier.
The configs use two layers (``(512, 512)``), the smallest phi that can change the
representation: with one layer, phi followed by the classifier is a single linear map of f,
and phi adds parameters and changes the optimisation but adds no capacity.
The submodule is named ``projection`` so ``csdfd(..., projection="projection")`` puts CGR on
exactly theta_p. ``projection_dims=()`` gives the plain backbone + classifier (methods O, S,
O+S and UVS-only can still use phi, so all methods share one architecture by default).

Normalisation lives inside the model: the detector takes uint8 (or 0..255 float) NHWC images
and applies its weight source's mean/std, so a checkpoint can never be fed with the wrong
preprocessing at evaluation or prediction time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Projection(nn.Module):
  """phi: Dense layers of widths ``dims`` with GELU between them (paper Eq. 17)."""

  dims: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f: jnp.ndarray) -> jnp.ndarray:
    for i, width in enumerate(self.dims):
      if i:
        f = nn.gelu(f, approximate=False)
      f = nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(f)
    return f


class Detector(nn.Module):
  """uint8 images [B, H, W, 3] -> one real/fake logit per image [B] (positive = fake).

  ``mean``/``std`` are in 0..1 units, as timm writes them. Sows ``pooled`` (backbone
  features) and ``embedding`` (phi's output) into the ``intermediates`` collection.
  """

  backbone: nn.Module
  mean: Sequence[float]
  std: Sequence[float]
  projection_dims: Sequence[int] = (512,)
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, images: jnp.ndarray | None, *, train: bool = False, pooled: jnp.ndarray | None = None
  ) -> jnp.ndarray:
    """The fake logit [B]; with ``pooled`` (backbone features [B, D]) only the head runs, as
    the exact conflict-loss gradient of ``methods.csdfd`` needs."""
    if pooled is None:
      mean = jnp.asarray(self.mean, jnp.float32) * 255.0
      std = jnp.asarray(self.std, jnp.float32) * 255.0
      x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
      f = self.backbone(x, train=train)
    else:
      f = pooled.astype(self.dtype)
    self.sow("intermediates", "pooled", f)
    if self.projection_dims:
      f = Projection(tuple(self.projection_dims), dtype=self.dtype, name="projection")(f)
      self.sow("intermediates", "embedding", f)
    f = nn.Dropout(self.dropout, deterministic=not train)(f)
    logit = nn.Dense(1, dtype=self.dtype, name="classifier")(f)
    return logit[..., 0].astype(jnp.promote_types(self.dtype, jnp.float32))
