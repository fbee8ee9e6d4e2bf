"""Grad-CAM heatmaps for the detector (Selvaraju et al., ICCV 2017; CS-DFD paper Fig. 4).

For an image with backbone feature map A [h, w, C] (the ``features`` intermediate every
backbone sows: the last convolutional map) and logit y (positive = fake):

    alpha_c = 1/(h w) sum_ij dy/dA_ijc          (Grad-CAM Eq. 1: gradient, spatially pooled)
    L       = ReLU(sum_c alpha_c A_c)           (Grad-CAM Eq. 2)

then L is upsampled bilinearly to the image size and min-max normalised to [0, 1] per image.
``target="real"`` uses -y, the evidence for the real class.

The gradient w.r.t. A is exact, not estimated: the logit is re-expressed as a function of A
by intercepting the module that consumes the map (``nn.intercept_methods``) and JAX
differentiates that function. How A becomes the backbone's output is family-specific:
EfficientNet, ResNet and Xception average A over space (the interception replaces the
backbone's output by ``mean(A)``); ConvNeXt feeds A to its ``head`` submodule (the
interception feeds our A to it). ViT's ``features`` are tokens of which only the class token
reaches the logit, so Grad-CAM at that layer is identically zero: it is refused. A backbone
class can declare ``gradcam_pooling = "mean" | "head"`` to opt in.

Resolution: the map has stride 32, so a 64 px demo face gives a 2x2 map and a 32 px one a
single cell (a constant map, returned as all zeros); the paper's 256 px crops give 8x8.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

POOLING = {"EfficientNet": "mean", "ResNet": "mean", "Xception": "mean", "ConvNeXt": "head"}


def pooling_of(backbone: nn.Module) -> str:
  """How the backbone turns its ``features`` map into its output: "mean" or "head"."""
  kind = getattr(backbone, "gradcam_pooling", None) or POOLING.get(type(backbone).__name__)
  if kind not in ("mean", "head"):
    raise ValueError(
      f"Grad-CAM needs a spatial feature map, and {type(backbone).__name__} does not say how "
      "its 'features' reach the logit (ViT: only the class token does, so the map's gradient "
      "is zero). Supported: " + ", ".join(POOLING) + "; or set gradcam_pooling on the module."
    )
  return kind


def _features(model: nn.Module, variables, images) -> tuple[jax.Array, jax.Array]:
  logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  try:
    return logits, state["intermediates"]["backbone"]["features"][0]
  except KeyError as e:
    raise ValueError(f"{type(model.backbone).__name__} does not sow a 'features' map") from e


def logits_from_features(model: nn.Module, variables, images, features) -> jax.Array:
  """The detector's logits with the backbone's ``features`` map replaced by ``features``
  (equal to the model's logits when ``features`` is the map the images produce)."""
  kind = pooling_of(model.backbone)
  replaced = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if kind == "mean" and module.name == "backbone" and module.parent is not None:
      replaced.append(module.name)
      dtype = getattr(module, "dtype", features.dtype)
      return features.astype(jnp.float32).mean((1, 2)).astype(dtype)
    parent = module.parent
    if kind == "head" and module.name == "head" and getattr(parent, "name", None) == "backbone":
      replaced.append(module.name)
      return next_fun(features, *args[1:], **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, images, train=False)
  if len(replaced) != 1:  # else the logit would not depend on `features` at all
    raise ValueError(
      f"could not route the feature map into {type(model).__name__}: expected one "
      f"submodule 'backbone'{' with a submodule head' if kind == 'head' else ''}"
    )
  return logits


def features_and_gradients(
  model: nn.Module, variables, images, *, target: str = "fake"
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits [B], feature map A [B,h,w,C], dy/dA [B,h,w,C]) with y = +-logit per ``target``."""
  if target not in ("fake", "real"):
    raise ValueError(f"target must be 'fake' or 'real', got {target!r}")
  _, features = _features(model, variables, images)
  fn = partial(logits_from_features, model, variables, images)
  logits, vjp = jax.vjp(fn, features)
  sign = 1.0 if target == "fake" else -1.0
  (grads,) = vjp(jnp.full_like(logits, sign))  # images are independent in eval mode
  return logits, features, grads


def cam_from(features: jax.Array, grads: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Grad-CAM Eqs. 1-2 on [B,h,w,C] maps, upsampled to ``size`` and normalised to [0, 1]."""
  alpha = grads.astype(jnp.float32).mean((1, 2))
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", features.astype(jnp.float32), alpha))
  cam = jax.image.resize(cam, (cam.shape[0], *size), "bilinear")
  lo, hi = cam.min((1, 2), keepdims=True), cam.max((1, 2), keepdims=True)
  span = hi - lo
  # XLA may divide by multiplying with the reciprocal: pin the maximum to exactly 1.
  scaled = jnp.where(cam >= hi, 1.0, jnp.minimum((cam - lo) / jnp.maximum(span, 1e-12), 1.0))
  return jnp.where(span > 1e-12, scaled, 0.0)


@partial(jax.jit, static_argnums=(0,), static_argnames=("target",))
def analyse(model: nn.Module, variables, images, *, target: str = "fake") -> dict[str, jax.Array]:
  """Jitted Grad-CAM with its ingredients: {"cams" [B,H,W], "logits" [B] (re-expressed from
  A), "model_logits" [B] (the plain forward; equal to "logits"), "features" A, "grads"
  dy/dA}."""
  backbone = getattr(model, "backbone", None)
  if backbone is None:
    raise ValueError(
      f"Grad-CAM reads a Detector's backbone feature map; {type(model).__name__} has no "
      "backbone (GM-DF's CLIP tower: only the class token reaches the logit)"
    )
  pooling_of(backbone)
  logits, features, grads = features_and_gradients(model, variables, images, target=target)
  model_logits, _ = _features(model, variables, images)
  cams = cam_from(features, grads, images.shape[1:3])
  return {
    "cams": cams,
    "logits": logits,
    "model_logits": model_logits,
    "features": features,
    "grads": grads,
  }


def gradcam(model: nn.Module, variables, images, *, target: str = "fake") -> jax.Array:
  """Grad-CAM heatmaps [B, H, W] in [0, 1] of uint8 images [B, H, W, 3] (module docstring)."""
  return analyse(model, variables, jnp.asarray(images), target=target)["cams"]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """uint8 RGB image blended with the 'jet' colouring of a [0, 1] heatmap."""
  from matplotlib import colormaps

  colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
  blend = (1 - alpha) * (np.asarray(image, np.float32) / 255.0) + alpha * colour
  return (np.clip(blend, 0, 1) * 255).round().astype(np.uint8)


def save_gradcam_grid(
  model: nn.Module,
  variables,
  images,
  labels: Sequence[int] | None,
  path: str | os.PathLike,
  *,
  target: str = "fake",
  cols: int = 8,
  alpha: float = 0.45,
  title: str | None = None,
) -> str:
  """A PNG grid: each face above its Grad-CAM overlay, titled with its label and fake
  probability (paper Fig. 4). Returns ``path``."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  images = np.asarray(images)
  out = analyse(model, variables, jnp.asarray(images), target=target)
  cams, probs = np.asarray(out["cams"]), np.asarray(jax.nn.sigmoid(out["logits"]))
  n = len(images)
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  fig, axes = plt.subplots(2 * rows, cols, figsize=(1.6 * cols, 3.4 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for i in range(n):
    r, c = divmod(i, cols)
    name = "" if labels is None else ("fake " if int(labels[i]) == 1 else "real ")
    axes[2 * r, c].imshow(images[i])
    axes[2 * r, c].set_title(f"{name}p={probs[i]:.2f}", fontsize=8)
    axes[2 * r + 1, c].imshow(overlay(images[i], cams[i], alpha))
  fig.suptitle(title or f"Grad-CAM (evidence for '{target}')", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return str(path)


def sample_faces(
  records: str,
  split: str,
  image_size: int,
  *,
  per_class: int = 8,
  datasets: Sequence[str] | None = None,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images, labels): ``per_class`` reals then fakes drawn (seeded) from a split of an
  ArrayRecord set, one face per video where possible, resized as in evaluation."""
  from csdfd_jax.data import pipeline

  batches = pipeline.eval_batches(
    records, split, batch_size=1, image_size=image_size, datasets=datasets
  )
  meta = batches.records.meta
  rng = np.random.default_rng(seed)
  picked: list[int] = []
  for label in (0, 1):
    idx = batches.indices[np.asarray(meta["label"])[batches.indices] == label]
    _, first = np.unique(np.asarray(meta["media_id"])[idx], return_index=True)
    pool = idx[first] if len(first) >= per_class else idx
    picked.extend(rng.permutation(pool)[:per_class].tolist())
  recs = batches.records.read(picked)
  images = np.stack([pipeline.resize_face(r["image"], image_size) for r in recs])
  return images, np.asarray([int(r["label"]) for r in recs])


def save_run_gradcam(
  model: nn.Module,
  variables,
  records: str,
  split: str,
  image_size: int,
  path: str | os.PathLike,
  *,
  per_class: int = 8,
  datasets: Sequence[str] | None = None,
  title: str | None = None,
) -> str:
  """Grad-CAM grid of ``per_class`` real and fake faces of a test split (eval.py's Fig. 4)."""
  images, labels = sample_faces(records, split, image_size, per_class=per_class, datasets=datasets)
  return save_gradcam_grid(model, variables, images, labels, path, title=title)
