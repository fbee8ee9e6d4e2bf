"""Face detection, landmarks and crops with the real dlib models on real FFHQ photos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from csdfd_jax.data.faces import (
  FaceConfig,
  FaceExtractor,
  PredictorNotFound,
  crop_square,
  cut_and_resize,
  default_predictor_path,
  resolve_predictor,
  to_crop_coords,
)
from csdfd_jax.data.video import read_image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FFHQ = DATA / "ffhq_real_384"
needs_ffhq = pytest.mark.skipif(not FFHQ.is_dir(), reason=f"{FFHQ} absent")

# 68-point iBUG indices
EYES = slice(36, 48)
MOUTH = slice(48, 68)
JAW = slice(0, 17)


@pytest.fixture(scope="module")
def extractor() -> FaceExtractor:
  return FaceExtractor()


@needs_ffhq
@pytest.mark.parametrize("number", [0, 1, 7, 42, 123])
def test_ffhq_face_and_landmarks(extractor, number):
  rgb = read_image(FFHQ / f"ffhq_{number:05d}.jpg")
  detections = extractor.detect(rgb)
  assert len(detections) == 1
  lm = detections[0].landmarks
  assert lm.shape == (68, 2)
  # FFHQ photos are aligned: eyes at a fixed place, ~38% down a 384 px image (the template)
  eyes, mouth = lm[EYES].mean(0), lm[MOUTH].mean(0)
  assert eyes[1] < mouth[1] - 20
  assert 100 < eyes[1] < 200 and 150 < eyes[0] < 235
  crops = extractor.extract(rgb, frame_index=3)
  (crop,) = crops
  assert crop.image.shape == (256, 256, 3) and crop.image.dtype == np.uint8
  assert crop.frame_index == 3 and crop.face_index == 0
  assert crop.landmarks.shape == (68, 2)
  assert (crop.landmarks > 0).all() and (crop.landmarks < 255).all()
  # the margin: the landmark box fills about 1/scale of the side and sits near the middle
  cfg = extractor.config
  w, h = np.ptp(crop.landmarks, 0)
  assert max(w, h) * cfg.scale == pytest.approx(256, abs=3)
  cx, cy = crop.landmarks.min(0) + np.array([w, h]) / 2
  assert cx == pytest.approx(128, abs=1.5) and cy == pytest.approx(128 + cfg.shift * h, abs=1.5)
  assert crop.landmarks[EYES, 1].mean() < crop.landmarks[MOUTH, 1].mean()
  assert crop.landmarks[JAW, 1].max() > crop.landmarks[MOUTH, 1].max()


@needs_ffhq
def test_crop_pixels_and_landmarks_agree(extractor):
  """The crop pixel under each transformed landmark is the frame pixel under the landmark."""
  rgb = read_image(FFHQ / "ffhq_00005.jpg")
  (det,) = extractor.detect(rgb)
  crop = extractor.crop(rgb, det)
  x0, y0, side = crop_square(det.landmarks, extractor.config.scale, extractor.config.shift)
  # compare on a crop made without resampling blur: size = ceil(side), nearest neighbour
  n = int(np.ceil(side))
  exact = cut_and_resize(rgb, x0, y0, side, n, interpolation=cv2.INTER_NEAREST)
  pts = to_crop_coords(det.landmarks, x0, y0, side, n)
  for (fx, fy), (cx, cy) in zip(det.landmarks.astype(int), np.rint(pts).astype(int), strict=True):
    assert (exact[cy, cx] == rgb[fy, fx]).all()
  # and the resized crop is the exact crop resized (same geometry)
  resized = cv2.resize(exact, (256, 256), interpolation=cv2.INTER_AREA)
  assert np.abs(resized.astype(int) - crop.image.astype(int)).mean() < 1.0


@needs_ffhq
def test_mask_is_cropped_like_the_face(extractor):
  rgb = read_image(FFHQ / "ffhq_00002.jpg")
  (det,) = extractor.detect(rgb)
  hull = cv2.convexHull(det.landmarks.astype(np.int32))
  mask = np.zeros(rgb.shape[:2], np.uint8)
  cv2.fillConvexPoly(mask, hull, 255)
  crop = extractor.crop(rgb, det, mask=np.repeat(mask[..., None], 3, 2))
  expected = np.zeros((256, 256), np.uint8)
  cv2.fillConvexPoly(expected, cv2.convexHull(np.rint(crop.landmarks).astype(np.int32)), 255)
  a, b = crop.mask > 127, expected > 127
  assert crop.mask.shape == (256, 256)
  assert (a & b).sum() / (a | b).sum() > 0.95


def test_flat_image_has_no_face(extractor):
  grey = np.full((300, 400, 3), 128, np.uint8)
  assert extractor.detect(grey) == []
  assert extractor.extract(grey) == []


@needs_ffhq
def test_large_frames_are_detected_downscaled(extractor):
  """A 4x enlarged photo (1536 px) is detected on its 960 px copy; landmarks stay at full scale."""
  rgb = read_image(FFHQ / "ffhq_00001.jpg")
  big = cv2.resize(rgb, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
  (small_det,) = extractor.detect(rgb)
  (big_det,) = extractor.detect(big)
  assert np.abs(big_det.landmarks / 4 - small_det.landmarks).mean() < 3


@needs_ffhq
def test_all_faces_up_to_k_largest_first():
  a = read_image(FFHQ / "ffhq_00003.jpg")
  b = cv2.resize(read_image(FFHQ / "ffhq_00004.jpg"), (256, 256), interpolation=cv2.INTER_AREA)
  canvas = np.zeros((384, 384 + 256, 3), np.uint8)
  canvas[:, :384], canvas[64:320, 384:] = a, b
  two = FaceExtractor(config=FaceConfig(max_faces=2, min_face_ratio=0.0))
  dets = two.detect(canvas)
  assert len(dets) == 2
  areas = [(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in dets]
  assert areas[0] > areas[1]
  assert dets[0].landmarks[:, 0].max() < 384 < dets[1].landmarks[:, 0].min()  # larger = left photo
  crops = two.extract(canvas, frame_index=9)
  assert [(c.frame_index, c.face_index) for c in crops] == [(9, 0), (9, 1)]
  sides = [np.ptp(c.landmarks, 0).max() for c in crops]
  assert sides[0] == pytest.approx(sides[1], rel=0.15)  # every crop has the same face scale
  (one,) = FaceExtractor(config=FaceConfig(max_faces=1)).detect(canvas)
  np.testing.assert_allclose(one.landmarks, dets[0].landmarks)


@needs_ffhq
@pytest.mark.parametrize("side, kept", [(340, 2), (200, 1)])
def test_faces_under_half_the_largest_are_dropped(side, kept):
  """SBI's test-time rule, the default: every face with at least half the largest's box area."""
  a = read_image(FFHQ / "ffhq_00003.jpg")
  b = cv2.resize(read_image(FFHQ / "ffhq_00004.jpg"), (side, side), interpolation=cv2.INTER_AREA)
  canvas = np.zeros((384, 384 + side, 3), np.uint8)
  canvas[:, :384], canvas[:side, 384:] = a, b
  dets = FaceExtractor().detect(canvas)
  assert len(dets) == kept
  if kept == 1:
    assert dets[0].landmarks[:, 0].max() < 384  # the large face on the left


def test_predictor_lookup_and_errors(tmp_path):
  path = default_predictor_path()
  assert Path(path).name == "shape_predictor_68_face_landmarks.dat" and Path(path).is_file()
  assert resolve_predictor(path) == path
  with pytest.raises(PredictorNotFound, match="pip install face-recognition-models"):
    resolve_predictor(tmp_path / "missing.dat")
  with pytest.raises(PredictorNotFound, match="--predictor"):
    FaceExtractor(tmp_path / "missing.dat")
