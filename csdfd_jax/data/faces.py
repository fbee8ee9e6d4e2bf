"""Face detection (dlib HOG), landmarks (dlib shape predictor) and square face crops with margin.

Detection runs on a resized copy of the frame and boxes are mapped back; the landmarks are then
predicted on the full-resolution frame, so resizing costs no landmark accuracy:
  - frames whose long side exceeds `detect_size` (960 px) are downscaled to it: on a 1080p DFDC
    frame dlib takes ~0.16 s at full size, ~0.04 s at 960 px and finds the same faces (faces there
    are >= 150 px; the HOG detector's smallest face is ~80 px at upsample 0, so 960 px still finds
    faces down to ~160 px of a 1080p frame);
  - smaller frames (FFHQ's 384 px, 480p videos) are upsampled once inside dlib (`upsample=None`
    picks 1 below 960 px, as SBI's `face_detector(frame, 1)`), so the detector works at 960-1920 px.

Crop geometry. SBI (mapooon/SelfBlendedImages, `crop_face`) and DeepfakeBench keep more than the
face: SBI stores whole frames and, at training time, cuts the box of the 68 landmarks plus random
margins of up to 0.1 w left/right, 0.4 h above and 0.16 h below (before that, a wider crop with
1.0 h above and 0.4 h below for the blending); DeepfakeBench aligns 5 landmarks onto a 256 px
template with scale 1.3: measured on 10 FFHQ photos and 4 DFDC frames, the 68-landmark box then
spans 55 % of the crop side and its centre sits 0.26 h below the crop centre. Our store keeps one
fixed square per face, and every stream, split and scored face is framed by exactly that square
(``csdfd_jax.data.framing``; SBI blends on it whole, nothing is re-cropped):
  side = scale * max(w, h) of the 68-landmark box (scale 1.8: the box spans 1/1.8 = 56 % of the
  side, as in DeepfakeBench),
  centre = box centre moved up by shift * h (shift 0.2: the 68 points stop at the eyebrows, and
  both references are top-heavy), which leaves 0.6 h above the box, 0.2 h below and 0.4 w on each
  side: room for the forehead and for the blend mask's blur and deformation.
Parts of the square outside the frame are zero-filled (no re-centring: the face stays at the same
place in every crop). The square is resized to `size` (256 px, the paper's size) with INTER_AREA
when shrinking and INTER_CUBIC when enlarging; landmarks and masks are transformed identically.
With an 81-point predictor the box uses the first 68 points, so crops match across predictors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import cv2
import numpy as np

from csdfd_jax.data.store import FaceCrop

PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
# Debian/Ubuntu's `libdlib-data` installs the predictor here.
_SYSTEM_PREDICTORS = (Path("/usr/share/dlib") / PREDICTOR_68,)


class PredictorNotFound(FileNotFoundError):
  """No dlib shape predictor file where one was expected."""


def default_predictor_path() -> str:
  """Path of the 68-point predictor from `face-recognition-models` (or Debian's libdlib-data).

  The package is located without importing it: its `__init__` needs `pkg_resources`, which recent
  setuptools no longer provides.
  """
  candidates = []
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is not None and spec.submodule_search_locations:
    for location in spec.submodule_search_locations:
      candidates.append(Path(location) / "models" / PREDICTOR_68)
  candidates.extend(_SYSTEM_PREDICTORS)
  for path in candidates:
    if path.is_file():
      return str(path)
  raise PredictorNotFound(
    f"no dlib 68-point landmark predictor found (looked at {', '.join(map(str, candidates))}). "
    "Fix: `pip install face-recognition-models` (or `apt install libdlib-data`), or pass "
    "--predictor /path/to/shape_predictor_68_face_landmarks.dat (an 81-point predictor works too)."
  )


def resolve_predictor(path: str | os.PathLike | None) -> str:
  """`path` if it is a file, the default predictor if `path` is None; else PredictorNotFound."""
  if path is None:
    return default_predictor_path()
  if not Path(path).is_file():
    raise PredictorNotFound(
      f"predictor file {path} not found. Fix: pass the path of a dlib shape predictor .dat file, "
      "or omit --predictor to use the 68-point model of `pip install face-recognition-models`."
    )
  return str(path)


@dataclasses.dataclass(frozen=True)
class FaceConfig:
  """Detection and crop settings (see the module docstring for the defaults' origin)."""

  size: int = 256  # output crop side in pixels
  scale: float = 1.8  # crop side / max side of the 68-landmark box
  shift: float = 0.2  # crop centre moved up by this fraction of the landmark box height
  max_faces: int = 8  # at most this many faces per frame, largest first
  # Faces smaller than this fraction of the largest face's box area are dropped: SBI's test-time
  # rule (0.5), for multi-person videos (DFDC). Training then reads the largest face only.
  min_face_ratio: float = 0.5
  detect_size: int = 960  # frames are downscaled so their long side is at most this for detection
  upsample: int | None = None  # dlib pyramid upsampling; None: 1 if the detection image < 960 px


@dataclasses.dataclass
class Detection:
  """A face in frame coordinates: box (x0, y0, x1, y1), detector score, landmarks [N, 2]."""

  box: tuple[float, float, float, float]
  score: float
  landmarks: np.ndarray


def crop_square(landmarks: np.ndarray, scale: float, shift: float) -> tuple[float, float, float]:
  """(x0, y0, side) of the square crop around the first 68 landmarks (module docstring)."""
  pts = np.asarray(landmarks, np.float64)[:68]
  (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
  w, h = x1 - x0, y1 - y0
  side = max(scale * max(w, h), 1.0)
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - shift * h
  return cx - side / 2, cy - side / 2, side


def cut_and_resize(
  image: np.ndarray,
  x0: float,
  y0: float,
  side: float,
  size: int,
  *,
  interpolation: int | None = None,
) -> np.ndarray:
  """The square [x0, x0+side) x [y0, y0+side) of `image`, zero-filled outside, resized to `size`."""
  h, w = image.shape[:2]
  left, top = int(np.floor(x0)), int(np.floor(y0))
  n = int(np.ceil(side))
  out = np.zeros((n, n, *image.shape[2:]), image.dtype)
  sx0, sy0 = max(left, 0), max(top, 0)
  sx1, sy1 = min(left + n, w), min(top + n, h)
  if sx1 > sx0 and sy1 > sy0:
    out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
  if interpolation is None:
    interpolation = cv2.INTER_AREA if n > size else cv2.INTER_CUBIC
  return cv2.resize(out, (size, size), interpolation=interpolation)


def to_crop_coords(points: np.ndarray, x0: float, y0: float, side: float, size: int) -> np.ndarray:
  """Maps frame pixel coordinates into the crop of `cut_and_resize` (pixel-centre convention)."""
  left, top, n = np.floor(x0), np.floor(y0), np.ceil(side)
  s = size / n
  pts = np.asarray(points, np.float64)
  return ((pts - [left, top] + 0.5) * s - 0.5).astype(np.float32)


class FaceExtractor:
  """dlib frontal face detector + shape predictor, loaded once (one per worker process)."""

  def __init__(
    self, predictor_path: str | os.PathLike | None = None, config: FaceConfig = FaceConfig()
  ):
    import dlib  # imported here so that reading a store never needs dlib

    self.config = config
    self.predictor_path = resolve_predictor(predictor_path)
    self._detector = dlib.get_frontal_face_detector()
    self._predictor = dlib.shape_predictor(self.predictor_path)
    self._rectangle = dlib.rectangle

  def detect(self, rgb: np.ndarray) -> list[Detection]:
    """Faces of an RGB frame, largest first, at most `config.max_faces`, each with a box area of
    at least `config.min_face_ratio` times the largest's, with landmarks."""
    cfg = self.config
    h, w = rgb.shape[:2]
    ratio = min(1.0, cfg.detect_size / max(h, w))
    small = (
      rgb
      if ratio == 1.0
      else cv2.resize(rgb, None, fx=ratio, fy=ratio, interpolation=cv2.INTER_AREA)
    )
    upsample = cfg.upsample
    if upsample is None:
      upsample = 1 if max(small.shape[:2]) < 960 else 0
    rects, scores, _ = self._detector.run(np.ascontiguousarray(small), upsample, 0.0)
    found = []
    for rect, score in zip(rects, scores, strict=True):
      box = (
        rect.left() / ratio,
        rect.top() / ratio,
        (rect.right() + 1) / ratio,
        (rect.bottom() + 1) / ratio,
      )
      found.append((box, float(score)))
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    found.sort(key=lambda bs: area(bs[0]), reverse=True)
    if found:
      largest = area(found[0][0])
      found = [bs for bs in found if area(bs[0]) >= cfg.min_face_ratio * largest]
    detections = []
    for box, score in found[: cfg.max_faces]:
      rect = self._rectangle(*(int(round(v)) for v in box))
      shape = self._predictor(rgb, rect)
      landmarks = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
      detections.append(Detection(box, score, landmarks))
    return detections

  def crop(
    self,
    rgb: np.ndarray,
    detection: Detection,
    *,
    frame_index: int = 0,
    face_index: int = 0,
    mask: np.ndarray | None = None,
  ) -> FaceCrop:
    """The square crop of one detection, its landmarks in crop coordinates, the mask cut alike."""
    cfg = self.config
    x0, y0, side = crop_square(detection.landmarks, cfg.scale, cfg.shift)
    image = cut_and_resize(rgb, x0, y0, side, cfg.size)
    landmarks = to_crop_coords(detection.landmarks, x0, y0, side, cfg.size)
    crop_mask = None
    if mask is not None:
      if mask.ndim == 3:
        mask = mask.max(axis=2)
      crop_mask = cut_and_resize(mask, x0, y0, side, cfg.size, interpolation=cv2.INTER_NEAREST)
    return FaceCrop(image, frame_index, face_index, landmarks, crop_mask)

  def extract(
    self, rgb: np.ndarray, *, frame_index: int = 0, mask: np.ndarray | None = None
  ) -> list[FaceCrop]:
    """Detect + crop: the crops of the (largest) faces of a frame; empty when no face is found."""
    return [
      self.crop(rgb, d, frame_index=frame_index, face_index=i, mask=mask)
      for i, d in enumerate(self.detect(rgb))
    ]
