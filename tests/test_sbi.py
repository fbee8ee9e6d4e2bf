"""Self-blended images: determinism, locality of the blend, mask bounds, augmentation semantics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from csdfd_jax.data import demo, sbi

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _face(size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A drawn face with exact dlib-ordered landmarks (no data needed)."""
  rng = np.random.default_rng(seed)
  ident = demo.sample_identity(rng)
  scene = demo.sample_scene(rng, size)
  return demo.draw_face(ident, scene, demo.sample_frame(rng, scene), size)


@pytest.fixture(scope="module")
def face():
  return _face()


def _fill(points: np.ndarray, shape) -> np.ndarray:
  out = np.zeros(shape, np.uint8)
  cv2.fillConvexPoly(out, cv2.convexHull(points.astype(np.int32).reshape(-1, 1, 2)), 1)
  return out.astype(bool)


def _extended_brows(lm: np.ndarray) -> np.ndarray:
  """Upper bound of the 'extended' hull's raised brows: brows + (brows - eye line) / 2 + 1 px."""
  eyes = np.concatenate([lm[36:40], lm[42:46]]).mean(0)
  return np.concatenate([lm[17:27] + (lm[17:27] - eyes) / 2 + [0, -1]])


def test_deterministic_per_seed(face):
  image, lm = face
  a = sbi.sbi_pair(image, lm, np.random.default_rng(7), size=128, return_mask=True)
  b = sbi.sbi_pair(image, lm, np.random.default_rng(7), size=128, return_mask=True)
  c = sbi.sbi_pair(image, lm, np.random.default_rng(8), size=128, return_mask=True)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("seed", range(6))
def test_fake_differs_from_real_only_inside_mask(face, seed):
  image, lm = face
  target, fake, mask = sbi.synthesize(image, lm, np.random.default_rng(seed))
  changed = (fake != target).any(-1)
  assert changed.any()
  assert not (changed & (mask <= 0)).any()
  cfg = sbi.SBIConfig(post_augment=False)
  real, fake, mask = sbi.sbi_pair(
    image, lm, np.random.default_rng(seed), size=160, cfg=cfg, return_mask=True
  )
  changed = (fake != real).any(-1)
  assert changed.any() and not (changed & (mask <= 0)).any()


def test_hull_types_stay_in_landmark_hull(face):
  image, lm = face
  allowed = _fill(np.concatenate([lm, _extended_brows(lm)]), image.shape[:2])
  allowed = cv2.dilate(allowed.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
  areas = {}
  for kind in sbi.HULL_TYPES:
    mask = sbi.hull_mask(lm, image.shape[:2], kind)
    assert mask.dtype == np.float32 and mask.max() == 1.0
    assert not ((mask > 0) & ~allowed).any(), kind
    areas[kind] = (mask > 0).sum()
  assert areas["extended"] > areas["components"]
  forehead = lm[17:27] + [0, -0.4 * np.ptp(lm[:, 1])]  # 13 extra points as an 81-point predictor
  lm81 = np.concatenate([lm, forehead, forehead[[0, 4, 9]] + [0, -2]])
  assert (sbi.hull_mask(lm81, image.shape[:2]) > 0).sum() > 1.1 * areas["facehull"]
  with pytest.raises(ValueError, match="unknown hull type"):
    sbi.hull_mask(lm, image.shape[:2], "ellipse")


def test_elastic_field_magnitude():
  """alpha 50 x Gaussian(7)-smoothed U(-1, 1) noise: std ~1.2 px, used below as an 8 px bound."""
  fields = [sbi.elastic_field((256, 256), np.random.default_rng(s), 50.0, 7.0) for s in range(5)]
  std = np.std([f for pair in fields for f in pair])
  assert 0.8 < std < 1.6
  assert max(np.abs(f).max() for pair in fields for f in pair) < 8.0


@pytest.mark.parametrize("seed", range(8))
def test_mask_inside_hull_grown_by_deformation_bound(face, seed):
  """Support of the final mask within the landmark hull dilated by affine + elastic + blur reach."""
  image, lm = face
  cfg = sbi.SBIConfig()
  h, w = image.shape[:2]
  hull = np.concatenate([lm, _extended_brows(lm)])
  centre = np.array([w / 2 - 0.5, h / 2 - 0.5])
  affine = (cfg.scale[1] - 1) * np.linalg.norm(hull - centre, axis=1).max()
  affine += np.hypot(cfg.translate[0] * w, cfg.translate[1] * h)
  blur = (cfg.blur_kernel[1] // 2 + 2) * max(h, w) / cfg.blur_grid[0] + 1
  reach = int(np.ceil(affine + 8.0 + blur))
  allowed = _fill(hull, (h, w)).astype(np.uint8)
  allowed = cv2.dilate(allowed, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1,) * 2))
  _, _, mask = sbi.synthesize(image, lm, np.random.default_rng(seed), cfg)
  assert not ((mask > 0) & (allowed == 0)).any()
  assert mask[int(lm[30, 1]), int(lm[30, 0])] > 0  # the nose tip is always blended
  assert (mask > 0).sum() > 0.5 * _fill(lm, (h, w)).sum()


def test_blend_ratio_range():
  image, lm = _face(128, seed=3)
  cfg = sbi.SBIConfig()
  seen = set()
  for seed in range(40):
    _, _, mask = sbi.synthesize(image, lm, np.random.default_rng(seed), cfg)
    peak = float(mask.max())
    assert mask.min() >= 0
    close = [r for r in cfg.blend_ratios if 0.9 * r <= peak <= r + 1e-6]
    assert close, peak
    seen.add(close[0])
  assert seen == set(cfg.blend_ratios)


def test_flip_mirrors_the_same_sample(face):
  image, lm = face
  a = sbi.sbi_pair(image, lm, np.random.default_rng(3), size=96, cfg=sbi.SBIConfig(p_flip=0.0))
  b = sbi.sbi_pair(image, lm, np.random.default_rng(3), size=96, cfg=sbi.SBIConfig(p_flip=1.0))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y[:, ::-1])


def test_colour_ops_match_uint8_references():
  img = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
  shift = np.array([12.7, -30.2, 0.4])
  np.testing.assert_array_equal(
    sbi._rgb_shift(img, shift), np.clip(img + shift, 0, 255).astype(np.uint8)
  )
  ref = np.clip(img.astype(np.float32) * 1.2 + 255 * -0.1, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(sbi._brightness_contrast(img, -0.1, 0.2), ref)
  np.testing.assert_array_equal(
    sbi._hsv_shift(img, np.zeros(3)),
    cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), cv2.COLOR_HSV2RGB),
  )
  np.testing.assert_array_equal(sbi._sharpen(img, 0.0, 0.7), img)
  flat = np.full((32, 48, 3), 77, np.uint8)
  np.testing.assert_array_equal(sbi._downscale(flat, 4), flat)
  stripes = np.kron(np.indices((32, 24))[1] % 2 * 200, np.ones((1, 2)))[..., None].repeat(3, -1)
  stripes = stripes.astype(np.uint8)  # 2-px stripes vanish at ratio 4, survive at 1
  assert sbi._downscale(stripes, 4).std() < 0.3 * stripes.std()
  smooth = cv2.GaussianBlur(cv2.resize(img, (96, 64)), (0, 0), 2)
  err = np.abs(sbi._jpeg(smooth, 95).astype(int) - smooth).mean()
  assert 0 < err < 3


def test_errors_and_validation_config(face):
  image, lm = face
  with pytest.raises(ValueError, match="landmarks"):
    sbi.self_blend(image, lm + 10_000, np.random.default_rng(0))
  fake, mask = sbi.self_blend(image, lm, np.random.default_rng(0))
  assert fake.shape == image.shape and fake.dtype == np.uint8 and mask.shape == image.shape[:2]
  cfg = sbi.SBIConfig.validation()
  assert not cfg.post_augment and cfg.p_flip == 0
  real, fake = sbi.sbi_pair(image, lm, np.random.default_rng(0), size=64, cfg=cfg)
  assert real.shape == fake.shape == (64, 64, 3)


def _predictor_path() -> Path | None:
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = (
    Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
  )
  return path if path.is_file() else None


def test_real_ffhq_face_gives_plausible_fake():
  folder = DATA / "ffhq_real_384"
  predictor_path = _predictor_path()
  if not folder.is_dir() or predictor_path is None:
    pytest.skip("needs ../shared/data/ffhq_real_384 and face_recognition_models")
  dlib = pytest.importorskip("dlib")
  detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(predictor_path))
  done = 0
  for path in sorted(folder.glob("*.jpg"))[:3]:
    image = np.ascontiguousarray(cv2.imread(str(path))[..., ::-1])
    boxes = detector(image, 1)
    if not boxes:
      continue
    shape = predictor(image, boxes[0])
    lm = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
    for seed in range(3):
      real, fake, mask = sbi.sbi_pair(
        image, lm, np.random.default_rng(seed), size=256, return_mask=True
      )
      assert real.shape == fake.shape == (256, 256, 3) and real.dtype == fake.dtype == np.uint8
      area = (mask > 0.05).mean()
      assert 0.15 < area < 0.85, area
      ys, xs = np.nonzero(mask > 0.5 * mask.max())
      assert 64 < xs.mean() < 192 and 64 < ys.mean() < 192  # centred on the face crop
      assert np.abs(real.astype(int) - fake)[mask > 0.5 * mask.max()].mean() > 1.0
    done += 1
  assert done >= 2
