"""Self-Blended Images (SBI): training fakes synthesised online from a single real face.

Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended Images", CVPR 2022 (arXiv
2204.08376), Section 3. A real face I is turned into a pseudo-fake by blending two slightly
different copies of itself: the source I_s and the target I_t differ by a colour/frequency
augmentation (the source-target generator, STG), I_s is shifted and rescaled a little, and the
blend mask M comes from the landmarks, deformed and blurred (the mask generator, MG):

    I_SB = M * I_s + (1 - M) * I_t                                (the paper's blending equation)

The result carries the generic traces of face swaps (blending boundary, colour and resolution
mismatch, landmark mismatch) without any identity change, so a detector trained on
(I_t, I_SB) pairs cannot latch onto one manipulation method.

This module re-implements the procedure of the official code (mapooon/SelfBlendedImages,
``src/utils/sbi.py``, ``blend.py``, ``funcs.py``, and the Face X-ray masks it uses from
AlgoHunt/Face-Xray) with NumPy + OpenCV, step by step:

1. ``sbi_pair`` takes the stored face square whole (``csdfd_jax.data.framing``).
2. ``synthesize``: with probability 0.25 the landmarks are cut to the 68 dlib points; the mask is
   one of four hulls chosen uniformly (``HULL_TYPES``: DFL-full, extended, components, face hull);
   either the source or the target (1/2 each) gets ``source_augment``: RGB shift ±20 (p 0.3),
   HSV shift ±0.3 (p 1), brightness/contrast ±0.1 (p 1), then one of downscale x2/x4
   (nearest down, linear up) or sharpen (alpha 0.2-0.5, lightness 0.5-1.0).
3. ``random_deform``: an affine map of source and mask (translation ±3% of the width and ±1.5% of
   the height, independent x/y scales in [0.95, 1/0.95] about the image centre), then an elastic
   deformation of the mask alone (displacement = alpha 50 x Gaussian(sigma 7)-smoothed uniform
   noise in [-1, 1], nearest-neighbour sampling).
4. ``blend_mask``: the mask is resized to a random 192-256 px square-ish grid, blurred with an odd
   kernel in [5, 25] and cut to where the blur still reaches its maximum (an erosion), blurred again
   with another odd kernel in [5, 25] and sigma in [5, 45], renormalised to max 1 and resized back;
   it is then scaled by a blend ratio drawn from {0.25, 0.5, 0.75, 1, 1, 1} and I_SB is formed.
5. ``sbi_pair`` applies the same post-augmentation to real and fake (RGB shift ±20 p 0.3, HSV ±0.3
   p 0.3, brightness/contrast ±0.3 p 0.3, JPEG quality 40-100 p 0.5), shrinks both to ``size``
   and flips both horizontally with probability 0.5.

Every probability and range is a field of ``SBIConfig``. The albumentations colour ops are
re-implemented with their uint8 semantics (lookup tables, values cut by ``astype(uint8)``): note
that albumentations reads the HSV limits in OpenCV units (hue 0-180, saturation/value 0-255), so the
official ±0.3 moves a channel by at most one level; we keep those numbers (configurable).

Deviations from the official code, and why:
- Randomness comes from one ``np.random.Generator`` passed in (the official code mixes the global
  ``np.random``, ``random`` and albumentations' state), so a sample is a pure function of the
  generator state: the property grain checkpoints rely on. The draw order differs, so samples are
  not bit-identical to the official ones, only identically distributed.
- No data-dependent retry loop: the official ``__getitem__`` catches any exception and retries on a
  random other image. Here a face whose landmark hull is empty (landmarks outside the image) raises
  ``ValueError``; and if the erosion of step 4 empties a mask (a face smaller than the blur kernel,
  where the official code divides by zero and yields NaNs), the un-eroded mask is kept.
- Erosion cut: the official code keeps pixels whose normalised blur equals 1 exactly; we keep those
  within 1e-5 of the maximum, which is the same set without relying on floating-point equality.
- Horizontal flip: the official code flips image, landmarks (with a dlib index permutation) and
  detector box first; we flip the finished real/fake pair at the end. Every step is symmetric in
  distribution under a mirror, so the samples are identically distributed and no landmark
  permutation is needed (81-point orders differ between predictors).
- What the synthesis runs on, and the framing: the official code blends on a wide landmark crop
  of the full-resolution frame (sides +w/2, top +h, bottom +0.4h) and then cuts a random-margin
  box around a RetinaFace box (each side w/4 or h/4 times U(0.2, 0.8)) and resizes it. Here the
  blend runs on the stored face square (1.8x the landmark box, the store's only pixels) and the
  square is kept whole, at the output resolution or above, then shrunk: S is framed exactly like
  stream O and the test faces (``csdfd_jax.data.framing`` says why) and the blended face is never
  upsampled. The official random margins were a scale augmentation of S alone; none is applied.
- Landmarks: the official code uses an 81-point predictor, so the face hull includes the
  forehead in 3 of 4 draws (the other: the cut to 68 points). The default predictor here has 68
  points (``face-recognition-models``; an 81-point file works with ``--predictor``), so the
  forehead is never in the mask and ``p_drop_extra_landmarks`` has no effect.
- JPEG: albumentations hands the RGB array to ``cv2.imencode``, which reads it as BGR, so its
  chroma planes mix the wrong channels; we convert to BGR first, as a real JPEG of a frame is.
- The Face X-ray hull masks are an optional add-on of the official code (without the library it
  uses the face hull only); we use the four-hull mode by default, as the README recommends for the
  reported scores. ``SBIConfig(hull="facehull")`` uses the face hull alone, but not the official
  fallback's exact mask: that one is a uint8 image, and a uint8 Gaussian blur rounds the edge so
  its erosion keeps almost the whole hull (100 %, 100 %, 99.8 % of the area at kernels 5, 15,
  25), while our float mask (anti-aliased edge) erodes to about 94 %, 79 %, 67 %.
- Batch: the official loader draws 16 (real, fake) pairs per step; here a stream's batch is
  ``config.data.batch_size`` images, half real, so the default 16 gives 8 pairs per S sub-batch
  (the O sub-batch holds the other 16 images of the step).
- Input scaling: the official code feeds ``img / 255`` ([0, 1]) to the AdvProp EfficientNet-B4,
  whose weights were trained on [-1, 1]; the detector here normalises with the weight file's own
  mean/std, i.e. (x - 0.5) / 0.5 for ``.ap`` weights.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from csdfd_jax.data.framing import resize_face, resize_landmarks

HULL_TYPES = ("dfl_full", "extended", "components", "facehull")


@dataclasses.dataclass(frozen=True)
class SBIConfig:
  """Probabilities and ranges of the SBI synthesis (defaults: the official training phase)."""

  # Mask generator.
  p_drop_extra_landmarks: float = 0.25  # use only the 68 dlib points (when 81 are given)
  hull: str = "random"  # "random" (uniform over HULL_TYPES) or one of HULL_TYPES
  translate: tuple[float, float] = (0.03, 0.015)  # max |shift| as a fraction of (width, height)
  scale: tuple[float, float] = (0.95, 1 / 0.95)  # x and y scales drawn independently
  elastic_alpha: float = 50.0
  elastic_sigma: float = 7.0
  blur_grid: tuple[int, int] = (192, 256)  # side of the grid where the mask is blurred, inclusive
  blur_kernel: tuple[int, int] = (5, 25)  # odd kernel sizes, inclusive
  blur_sigma: tuple[int, int] = (5, 45)  # sigma of the second blur, inclusive
  blend_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
  # Source-target generator (applied to the source or the target, 1/2 each).
  src_p_rgb_shift: float = 0.3
  src_rgb_shift: float = 20.0
  src_hsv_shift: tuple[float, float, float] = (0.3, 0.3, 0.3)
  src_brightness: float = 0.1
  src_contrast: float = 0.1
  downscale_ratios: tuple[int, ...] = (2, 4)
  sharpen_alpha: tuple[float, float] = (0.2, 0.5)
  sharpen_lightness: tuple[float, float] = (0.5, 1.0)
  # Post-augmentation shared by real and fake.
  post_augment: bool = True
  p_rgb_shift: float = 0.3
  rgb_shift: float = 20.0
  p_hsv: float = 0.3
  hsv_shift: tuple[float, float, float] = (0.3, 0.3, 0.3)
  p_brightness_contrast: float = 0.3
  brightness: float = 0.3
  contrast: float = 0.3
  p_jpeg: float = 0.5
  jpeg_quality: tuple[int, int] = (40, 100)  # inclusive
  p_flip: float = 0.5

  @classmethod
  def validation(cls, **overrides) -> SBIConfig:
    """The official val phase: no post-augmentation, no flip (the fixed fakes of a
    validation set made by SBI of its reals, ``config.data.val_fakes``)."""
    return cls(**{"post_augment": False, "p_flip": 0.0, **overrides})


# ----------------------------------------------------------------------------- colour ops (uint8)


def _lut(img: np.ndarray, tables: np.ndarray) -> np.ndarray:
  """Applies one 256-entry table per channel (the albumentations uint8 path)."""
  table = np.clip(tables, 0, 255).astype(np.uint8).T.reshape(1, 256, 3)
  return cv2.LUT(np.ascontiguousarray(img), np.ascontiguousarray(table))


def _rgb_shift(img: np.ndarray, shift: np.ndarray) -> np.ndarray:
  base = np.arange(256, dtype=np.float32)
  return _lut(img, np.stack([base + s for s in shift]))


def _hsv_shift(img: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """Shifts hue (OpenCV units 0-180, wrapping), saturation and value (0-255, clipped)."""
  base = np.arange(256, dtype=np.float32)
  hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
  tables = np.stack([np.mod(base + shift[0], 180), base + shift[1], base + shift[2]])
  return cv2.cvtColor(_lut(hsv, tables), cv2.COLOR_HSV2RGB)


def _brightness_contrast(img: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
  """out = in * (1 + contrast) + 255 * brightness (albumentations, brightness_by_max)."""
  table = np.arange(256, dtype=np.float32) * (1.0 + contrast) + 255.0 * brightness
  return _lut(img, np.stack([table] * 3))


def _downscale(img: np.ndarray, ratio: int) -> np.ndarray:
  h, w = img.shape[:2]
  small = cv2.resize(img, (max(1, int(w / ratio)), max(1, int(h / ratio))), interpolation=0)
  return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _sharpen(img: np.ndarray, alpha: float, lightness: float) -> np.ndarray:
  """Blend of identity and the 3x3 Laplacian-style kernel with centre 8 + lightness."""
  effect = -np.ones((3, 3), np.float32)
  effect[1, 1] = 8.0 + lightness
  identity = np.zeros((3, 3), np.float32)
  identity[1, 1] = 1.0
  return cv2.filter2D(img, -1, (1 - alpha) * identity + alpha * effect)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
  ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  if not ok:
    raise RuntimeError("OpenCV could not JPEG-encode an image")
  return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


def source_augment(img: np.ndarray, rng: np.random.Generator, cfg: SBIConfig) -> np.ndarray:
  """The source-target generator's augmentation (STG): colour, then frequency (blur or sharpen)."""
  if rng.random() < cfg.src_p_rgb_shift:
    img = _rgb_shift(img, rng.uniform(-cfg.src_rgb_shift, cfg.src_rgb_shift, 3))
  img = _hsv_shift(img, rng.uniform(-1, 1, 3) * np.asarray(cfg.src_hsv_shift))
  img = _brightness_contrast(
    img,
    rng.uniform(-cfg.src_brightness, cfg.src_brightness),
    rng.uniform(-cfg.src_contrast, cfg.src_contrast),
  )
  if rng.random() < 0.5:
    return _downscale(img, int(rng.choice(cfg.downscale_ratios)))
  return _sharpen(img, rng.uniform(*cfg.sharpen_alpha), rng.uniform(*cfg.sharpen_lightness))


def _post_augment_fn(rng: np.random.Generator, cfg: SBIConfig):
  """Draws the shared post-augmentation once; returns the function that applies it to any image."""
  ops = []
  if rng.random() < cfg.p_rgb_shift:
    shift = rng.uniform(-cfg.rgb_shift, cfg.rgb_shift, 3)
    ops.append(lambda x: _rgb_shift(x, shift))
  if rng.random() < cfg.p_hsv:
    hsv = rng.uniform(-1, 1, 3) * np.asarray(cfg.hsv_shift)
    ops.append(lambda x: _hsv_shift(x, hsv))
  if rng.random() < cfg.p_brightness_contrast:
    b, c = rng.uniform(-cfg.brightness, cfg.brightness), rng.uniform(-cfg.contrast, cfg.contrast)
    ops.append(lambda x: _brightness_contrast(x, b, c))
  if rng.random() < cfg.p_jpeg:
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    ops.append(lambda x: _jpeg(x, quality))

  def apply(x: np.ndarray) -> np.ndarray:
    for op in ops:
      x = op(x)
    return x

  return apply


# ----------------------------------------------------------------------------- masks


# Point groups (dlib 68-point indices) whose convex hulls make up the Face X-ray masks.
_GROUPS = {
  "dfl_full": (np.r_[0:17, 48:68], np.r_[27:31, 33], np.r_[17:27, 0, 27, 16, 33]),
  "components": (
    np.r_[0:9, 17],
    np.r_[8:17, 26],
    np.r_[17:20, 8],
    np.r_[24:27, 8],
    np.r_[19:25, 8],
    np.r_[17:22, 27, 31:36, 8],
    np.r_[22:27, 27, 31:36, 8],
    np.r_[27:36],
  ),
}


def _hull_groups(lm: np.ndarray, kind: str) -> list[np.ndarray]:
  """The point sets whose hulls are filled for each mask type (integer landmarks in)."""
  if kind == "facehull":
    return [lm]
  if kind == "extended":  # components with the brows raised by half their height above the eyes
    lm = lm.copy()
    outer_l = (lm[36] + (lm[36] + lm[0]) // 2) // 2
    outer_r = (lm[45] + (lm[16] + lm[45]) // 2) // 2
    below_l = np.stack([outer_l, lm[36], lm[37], lm[38], lm[39]])
    below_r = np.stack([lm[42], lm[43], lm[44], lm[45], outer_r])
    lm[17:22] = lm[17:22] + (lm[17:22] - below_l) // 2
    lm[22:27] = lm[22:27] + (lm[22:27] - below_r) // 2
    kind = "components"
  return [lm[idx] for idx in _GROUPS[kind]]


def hull_mask(landmarks: np.ndarray, shape: tuple[int, int], kind: str = "facehull") -> np.ndarray:
  """Float32 [H, W] mask in [0, 1]: union of the convex hulls of `kind` (see ``HULL_TYPES``).

  "facehull" is the hull of all given points (68, or 81 with the forehead points) with an
  anti-aliased edge; the other three use the first 68 points, as in Face X-ray's masks.
  Coordinates are truncated to integers, as the official code does.
  """
  if kind not in HULL_TYPES:
    raise ValueError(f"unknown hull type {kind!r}: use one of {HULL_TYPES}")
  lm = np.asarray(landmarks, np.float64).astype(np.int32)
  if kind != "facehull" and len(lm) < 68:
    raise ValueError(f"hull type {kind!r} needs 68 landmarks, got {len(lm)}")
  canvas = np.zeros(shape, np.uint8)
  line = cv2.LINE_AA if kind == "facehull" else cv2.LINE_8
  for group in _hull_groups(lm, kind):
    cv2.fillConvexPoly(canvas, cv2.convexHull(group.reshape(-1, 1, 2)), 255, lineType=line)
  return canvas.astype(np.float32) / 255.0


def elastic_field(
  shape: tuple[int, int], rng: np.random.Generator, alpha: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
  """Displacements (dx, dy) = alpha * G_sigma * U(-1, 1) noise, as albumentations' ElasticTransform
  (scipy's gaussian_filter with truncate 4 and 'reflect' borders, done with OpenCV)."""
  k = 2 * int(4 * sigma + 0.5) + 1
  dx, dy = (
    cv2.GaussianBlur(
      rng.random(shape, np.float32) * 2 - 1, (k, k), sigma, borderType=cv2.BORDER_REFLECT
    )
    * alpha
    for _ in range(2)
  )
  return dx, dy


def random_deform(
  source: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: SBIConfig
) -> tuple[np.ndarray, np.ndarray]:
  """Random affine map of source and mask about the image centre, then elastic warp of the mask."""
  h, w = mask.shape
  sx, sy = rng.uniform(*cfg.scale, size=2)
  tx = rng.uniform(-cfg.translate[0], cfg.translate[0]) * w
  ty = rng.uniform(-cfg.translate[1], cfg.translate[1]) * h
  cx, cy = w / 2 - 0.5, h / 2 - 0.5
  m = np.array([[sx, 0, cx - sx * cx + tx], [0, sy, cy - sy * cy + ty]], np.float64)
  source = cv2.warpAffine(source, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
  mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
  dx, dy = elastic_field((h, w), rng, cfg.elastic_alpha, cfg.elastic_sigma)
  gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
  mask = cv2.remap(mask, gx + dx, gy + dy, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
  return source, mask


def _odd(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
  lo, hi = bounds
  return int(rng.choice(np.arange(lo | 1, hi + 1, 2)))


def blend_mask(mask: np.ndarray, rng: np.random.Generator, cfg: SBIConfig) -> np.ndarray:
  """Erode-then-soften the mask on a random ~224 px grid (official ``get_blend_mask``); max 1."""
  h, w = mask.shape
  gh, gw = (int(rng.integers(cfg.blur_grid[0], cfg.blur_grid[1] + 1)) for _ in range(2))
  k1, k2 = _odd(rng, cfg.blur_kernel), _odd(rng, cfg.blur_kernel)
  sigma2 = float(rng.integers(cfg.blur_sigma[0], cfg.blur_sigma[1] + 1))
  small = cv2.resize(mask.astype(np.float32), (gw, gh), interpolation=cv2.INTER_LINEAR)
  if small.max() <= 0:
    raise ValueError("the SBI mask is empty: are the landmarks inside the image?")
  blurred = cv2.GaussianBlur(small, (k1, k1), 0)
  core = (blurred >= blurred.max() * (1 - 1e-5)).astype(np.float32)
  if core.sum() == 0:
    core = (small > 0).astype(np.float32)
  soft = cv2.GaussianBlur(core, (k2, k2), sigma2)
  soft /= soft.max()
  return cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------- synthesis


def synthesize(
  image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, cfg: SBIConfig = SBIConfig()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One self-blend (official ``self_blending``): returns (target, fake, mask).

  `target` is the image the fake is blended onto: the input, colour/frequency-augmented when the
  STG picked the target (half of the time). `fake` = mask * source + (1 - mask) * target (I_SB,
  cut to uint8), so fake == target wherever mask == 0. `mask` is float32 [H, W] with max equal to
  the drawn blend ratio (up to resampling).
  """
  image = np.ascontiguousarray(image, np.uint8)
  lm = np.asarray(landmarks, np.float32)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
  if rng.random() < cfg.p_drop_extra_landmarks:
    lm = lm[:68]
  kind = HULL_TYPES[int(rng.integers(len(HULL_TYPES)))] if cfg.hull == "random" else cfg.hull
  mask = hull_mask(lm, image.shape[:2], kind)
  if mask.max() <= 0:
    raise ValueError("the landmark hull is empty: the landmarks lie outside the image")
  source, target = image, image
  if rng.random() < 0.5:
    source = source_augment(image, rng, cfg)
  else:
    target = source_augment(image, rng, cfg)
  source, mask = random_deform(source, mask, rng, cfg)
  mask = blend_mask(mask, rng, cfg) * np.float32(
    cfg.blend_ratios[rng.integers(len(cfg.blend_ratios))]
  )
  m = mask[..., None]
  fake = (m * source.astype(np.float32) + (1 - m) * target.astype(np.float32)).astype(np.uint8)
  return target, fake, mask


def self_blend(
  image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, cfg: SBIConfig = SBIConfig()
) -> tuple[np.ndarray, np.ndarray]:
  """(fake uint8 [H, W, 3], mask float32 [H, W] in [0, 1]) of ``synthesize``: the SPEC contract."""
  _, fake, mask = synthesize(image, landmarks, rng, cfg)
  return fake, mask


def sbi_pair(
  image: np.ndarray,
  landmarks: np.ndarray,
  rng: np.random.Generator,
  *,
  size: int,
  cfg: SBIConfig = SBIConfig(),
  return_mask: bool = False,
):
  """One training pair: (real, fake) uint8 [size, size, 3], plus the mask if asked.

  ``image`` is the stored face square (``csdfd_jax.data.framing``), kept whole so that S images
  are framed exactly like stream O's and the test faces. When it is smaller than ``size`` it is
  first resized up to ``size`` (as every other stream resizes it), so the synthesis always runs
  at the output resolution or above: ``synthesize`` on the square, the same post-augmentation
  on both (colour ops, JPEG), then both are shrunk (or kept) to ``size`` by ``resize_face`` and
  flipped together. `real` is the target of the blend (the input face, colour-augmented half of
  the time, as officially). Deterministic for a given state of `rng`.
  """
  image = np.asarray(image, np.uint8)
  lm = np.asarray(landmarks, np.float32)
  side = image.shape[0]
  if side < size:
    image, lm = resize_face(image, size), resize_landmarks(lm, side, size)
  flip = rng.random() < cfg.p_flip
  real, fake, mask = synthesize(image, lm, rng, cfg)
  if cfg.post_augment:
    post = _post_augment_fn(rng, cfg)
    real, fake = post(real), post(fake)
  out = []
  for x in (real, fake, mask):
    x = resize_face(x, size)
    out.append(np.ascontiguousarray(x[:, ::-1]) if flip else x)
  return tuple(out) if return_mask else tuple(out[:2])
