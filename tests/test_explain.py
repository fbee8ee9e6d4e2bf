"""Grad-CAM: exact feature-map gradients against analytic values and finite differences,
heat located where a constructed detector looks, shapes, range, determinism, the PNG grid."""

from __future__ import annotations

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from csdfd_jax import explain
from csdfd_jax.models import convnext, efficientnet, vit
from csdfd_jax.models.heads import Detector


def detector(backbone, projection_dims=(), mean=(0.5,) * 3, std=(0.25,) * 3):
  return Detector(backbone=backbone, mean=mean, std=std, projection_dims=projection_dims)


def init(model, size=32, seed=0):
  x = jnp.zeros((1, size, size, 3), jnp.uint8)
  v = jax.jit(lambda r: model.init(r, x, train=False))(jax.random.PRNGKey(seed))
  return {k: v[k] for k in ("params", "batch_stats") if k in v}


def grads_of(model, variables, x):
  """(logits from A, model logits, A, dy/dA); one compile."""
  out = explain.analyse(model, variables, jnp.asarray(x))
  return out["logits"], out["model_logits"], out["features"], out["grads"]


def images(n=2, size=32, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def effnet():
  model = detector(efficientnet.create("tiny"), projection_dims=(16, 8))
  return model, init(model, size=96)


def head_gradient(params, pooled: np.ndarray) -> np.ndarray:
  """d logit / d pooled of phi + classifier in float64 by hand: y = c . (W1 gelu(W0 p + b0)
  + b1) + b_c, gelu'(z) = Phi(z) + z phi(z)."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  w0, b0 = p["projection"]["dense0"]["kernel"], p["projection"]["dense0"]["bias"]
  w1 = p["projection"]["dense1"]["kernel"]
  c = p["classifier"]["kernel"][:, 0]
  z = pooled @ w0 + b0
  dgelu = 0.5 * (1 + special.erf(z / np.sqrt(2))) + z * np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
  return (dgelu * (w1 @ c)) @ w0.T


def test_feature_gradient_and_cam_match_a_float64_reference(effnet):
  """Mean-pooled backbone: dy/dA_ijc = (dy/dpooled)_c / (h w) at every cell, so alpha is
  that vector and the CAM is ReLU(A . alpha): both computed here in float64 from A."""
  model, variables = effnet
  x = images(size=96)  # a 3x3 final map (stride 32)
  logits, model_logits, feats, grads = grads_of(model, variables, x)
  np.testing.assert_allclose(logits, model_logits, rtol=1e-5, atol=1e-6)
  feats, grads = np.asarray(feats, np.float64), np.asarray(grads, np.float64)
  b, h, w, _ = feats.shape
  alpha = head_gradient(variables["params"], feats.mean((1, 2))) / (h * w)
  np.testing.assert_allclose(grads, np.broadcast_to(alpha[:, None, None], grads.shape), rtol=1e-4)
  nondegenerate = 0
  for target, sign in (("fake", 1.0), ("real", -1.0)):
    coarse = np.maximum(np.einsum("bhwc,bc->bhw", feats, sign * alpha), 0.0)
    up = np.asarray(jax.image.resize(jnp.asarray(coarse), (b, 96, 96), "bilinear"), np.float64)
    lo, hi = up.min((1, 2), keepdims=True), up.max((1, 2), keepdims=True)
    ok = hi > lo
    expected = np.where(ok, (up - lo) / np.where(ok, hi - lo, 1.0), 0.0)
    cams = np.asarray(explain.gradcam(model, variables, x, target=target))
    np.testing.assert_allclose(cams, expected, atol=1e-4)
    nondegenerate += int(ok.sum())
  assert nondegenerate >= 2


@pytest.mark.slow
def test_convnext_head_gradient_matches_finite_differences():
  """ConvNeXt (A reaches the logit through its ``head`` submodule, LayerNorm after the
  pool): the logit re-expressed from A equals the model's, and dy/dA agrees with central
  differences of it at random cells."""
  model = detector(convnext.create("tiny"), projection_dims=(16, 8))
  variables = init(model)
  x = images(1)
  logits, model_logits, feats, grads = grads_of(model, variables, x)
  np.testing.assert_allclose(logits, model_logits, rtol=1e-5, atol=1e-6)
  f = jax.jit(lambda a: explain.logits_from_features(model, variables, x, a)[0])
  rng = np.random.default_rng(0)
  eps = 1e-2
  for _ in range(4):
    i, j, c = (int(rng.integers(n)) for n in feats.shape[1:])
    e = jnp.zeros_like(feats).at[0, i, j, c].set(eps)
    fd = (float(f(feats + e)) - float(f(feats - e))) / (2 * eps)
    assert fd == pytest.approx(float(grads[0, i, j, c]), rel=2e-2, abs=1e-6)


class PatchNet(nn.Module):
  """A = ReLU(1x1 conv of the 4x4-averaged image) with positive weights, averaged out."""

  gradcam_pooling = "mean"

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.avg_pool(x, (4, 4), (4, 4))
    a = nn.relu(nn.Conv(4, (1, 1), use_bias=False, kernel_init=nn.initializers.ones)(x))
    self.sow("intermediates", "features", a)
    return a.mean((1, 2))


class CornerHead(nn.Module):
  @nn.compact
  def __call__(self, a, train=False):
    return a[:, :2, :2].mean((1, 2))


class CornerNet(nn.Module):
  """The output reads only the top-left 2x2 cells of A, through a ``head`` submodule."""

  gradcam_pooling = "head"

  @nn.compact
  def __call__(self, x, train=False):
    a = nn.avg_pool(x, (4, 4), (4, 4))
    self.sow("intermediates", "features", a)
    return CornerHead(name="head")(a, train)


def test_heat_lies_where_the_evidence_is():
  """Black images with one bright square: A is non-zero only there, the classifier weights
  are positive, so the 'fake' heat is 1 on the square and 0 away from it; the 'real' heat
  (negative evidence everywhere) is all zero."""
  model = detector(PatchNet(), mean=(0.0,) * 3, std=(1.0,) * 3)
  variables = init(model)
  kernel = variables["params"]["classifier"]["kernel"]
  variables["params"]["classifier"]["kernel"] = jnp.abs(kernel) + 0.1
  x = np.zeros((2, 32, 32, 3), np.uint8)
  x[0, 4:12, 20:28] = 200  # cells (1..2, 5..6) of the 8x8 map
  x[1, 16:32, 0:8] = 90
  cams = np.asarray(explain.gradcam(model, variables, x))
  assert cams.shape == (2, 32, 32)
  for cam, (r0, r1, c0, c1) in zip(cams, [(4, 12, 20, 28), (16, 32, 0, 8)], strict=True):
    inside = cam[r0 + 2 : r1 - 2, c0 + 2 : c1 - 2]
    far = np.ones_like(cam, bool)
    far[max(r0 - 4, 0) : r1 + 4, max(c0 - 4, 0) : c1 + 4] = False
    assert inside.min() > 0.99 and cam[far].max() == 0.0
  assert np.all(np.asarray(explain.gradcam(model, variables, x, target="real")) == 0.0)


def test_head_interception_routes_the_gradient_exactly():
  """y = w . mean(A[:2, :2]) + b: dy/dA = w / 4 on the 2x2 corner, 0 elsewhere."""
  model = detector(CornerNet(), mean=(0.0,) * 3, std=(1.0,) * 3)
  variables = init(model)
  x = images(2)
  logits, model_logits, feats, grads = grads_of(model, variables, x)
  np.testing.assert_allclose(logits, model_logits, rtol=1e-6)
  w = np.asarray(variables["params"]["classifier"]["kernel"])[:, 0]
  expected = np.zeros(feats.shape)
  expected[:, :2, :2] = w / 4
  np.testing.assert_allclose(grads, expected, rtol=1e-6, atol=1e-9)


def test_range_determinism_and_png_grid(effnet, tmp_path):
  model, variables = effnet
  x = images(size=96)
  for target in ("fake", "real"):
    a = np.asarray(explain.gradcam(model, variables, x, target=target))
    assert np.array_equal(a, np.asarray(explain.gradcam(model, variables, x, target=target)))
    assert a.shape == (2, 96, 96) and a.dtype == np.float32
    for cam in a:  # min-max normalised, or all zero when no cell has positive evidence
      assert (cam.min(), cam.max()) in ((0.0, 0.0), (0.0, 1.0))
  path = explain.save_gradcam_grid(model, variables, x, [0, 1], tmp_path / "cam.png", cols=2)
  png = cv2.imread(path)
  assert png is not None and png.shape[0] > 100 and png.shape[1] > 100
  blend = explain.overlay(x[0], a[0])
  assert blend.shape == x[0].shape and blend.dtype == np.uint8


def test_token_backbones_are_refused():
  with pytest.raises(ValueError, match="class token"):
    explain.pooling_of(vit.create("tiny"))
