"""A classical graphics face swap on real faces, in the spirit of FaceForensics++'s FaceSwap.

FaceForensics++ (Rössler et al., ICCV 2019) builds its "FaceSwap" fakes with a graphics pipeline,
no learning (MarekKowalski/FaceSwap): a 3D face template is fitted to the landmarks of both faces,
the source's texture is rendered in the target's pose, its colours are matched to the target and
it is alpha-blended into the target frame with a feathered mask over the rendered face's hull.
This module is the 2D analogue on single images, written from the description with NumPy, OpenCV
and SciPy only (no code taken from that project): the 3D fit is replaced by a piecewise-affine
warp between the two sets of 68 landmarks.

1. Warp (``warp_maps`` / ``warp_face``): piecewise-affine over a Delaunay triangulation of the
   target's 68 landmarks (dlib order: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67).
   Every target triangle gets the affine map that sends it onto the same three landmarks of the
   source. The triangulation is extended by 8 "frame" points (corners and edge midpoints of the
   target's landmark box, grown by ``FRAME_MARGIN`` of its side, placed in the source by the least
   squares affine fit of the landmarks), so that the hull landmarks (jaw, brows) are interior
   vertices: the warp is continuous across the face outline and also defined a little outside it.
   Instead of warping triangle by triangle (``cv2.warpAffine`` on each bounding box with a triangle
   mask, then pasting), the backward map is built triangle by triangle: each pixel of a triangle's
   bounding box whose barycentric coordinates are all >= 0 reads the source at the same
   barycentric combination of the source vertices; the image is then resampled once with
   ``cv2.remap`` (bilinear). That is the same piecewise-affine map, with one interpolation and no
   seams or gaps along shared triangle edges (neighbouring affine maps agree there). Delaunay
   uses the target's points so that its triangles tile the target face without overlap; where the
   source face is posed very differently a triangle can be mirrored in the source, which only
   flips that patch's texture.
2. Blend mask (``blend_mask``): the convex hull of the target's 68 landmarks, rasterised, then
   feathered by its distance transform d (pixels to the nearest pixel outside the hull):
   ``mask = smoothstep((d - erode) / feather)``. Pixels closer than ``erode`` pixels to the hull
   edge get exactly 0 and the mask rises smoothly to 1 over ``feather`` pixels, so every pixel with
   mask > 0 lies inside the hull by construction (at least ``erode`` >= 1 px from its raster
   edge). ``erode`` and ``feather`` are random fractions of the face size sqrt(hull area).
3. Colour correction (``color_transfer``): Reinhard et al.'s transfer ("Color Transfer between
   Images", 2001), per-channel mean and standard deviation matched in CIE L*a*b* (OpenCV's float
   LAB: L 0-100, a/b about -127..127), with statistics weighted by the blend mask so that they
   describe exactly the pixels that will be blended. The std ratio is clipped to
   ``STD_RATIO_BOUNDS`` so a flat patch is not stretched into noise. A small random shift of the
   target's mean (``SwapConfig.color_jitter`` LAB units per channel) imitates the imperfect colour
   match of real swaps, so that a perfect match is not itself a cue.
4. Blend. ``blend="alpha"`` (default): ``out = mask * face + (1 - mask) * target``.
   ``blend="poisson"``: the corrected face is first cloned into the target by
   ``cv2.seamlessClone`` (NORMAL_CLONE, over mask > 0, aligned pixel for pixel), then
   alpha-blended with the same mask, so the mask means the same thing in both modes.
   Alpha is the default because (a) FF++'s FaceSwap blends with a feathered alpha mask after a
   colour transfer, so alpha reproduces its kind of artefact (a soft seam inside the face hull);
   (b) the returned mask is then the exact blend weight, a faithful pixel label; (c) it needs no
   Poisson solve. A Poisson clone spreads the colour difference along the boundary into the whole
   face (changes of low frequency far from the seam), another kind of trace; OpenCV's solver also
   truncates rather than rounds (cloning an image onto itself can come back one level darker).

Guarantee: pixels where the returned mask is 0 are exactly the target's pixels (they are copied
back explicitly; for Poisson the clone's solve region is the mask's bounding box, whose pixels
outside the mask are restored too). The landmarks of the result are the target's: the swap keeps
the target's geometry and only the appearance inside the mask changes.

Randomness (erosion, feather, colour jitter) comes only from the ``rng`` argument, so a swap is a
pure function of its inputs and the generator's state. ``make_swaps`` derives one generator per
(target, source) pair from the seed, so each file depends only on the seed and its own pair.

``make_swaps`` writes JPEGs of quality 92: the real FFHQ images these swaps are mixed with are
JPEG q92 (4:2:0 chroma), so a lossless PNG fake, or a fake of another JPEG quality, would let a
detector separate real from fake by compression traces alone instead of by the manipulation.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from scipy.spatial import Delaunay

N_LANDMARKS = 68
BLENDS = ("alpha", "poisson")
FRAME_MARGIN = 0.3  # frame points: landmark box grown by this fraction of its longer side
STD_RATIO_BOUNDS = (1 / 3, 3.0)  # colour transfer: target std / source std is clipped to this
MIN_FACE_AREA = 64.0  # px^2: smaller landmark hulls are degenerate faces
JPEG_QUALITY = 92  # the FFHQ reals' quality (module docstring)


@dataclasses.dataclass(frozen=True)
class SwapConfig:
  """Random ranges of one swap; fractions are of the face size sqrt(target hull area).

  The defaults keep the seam well inside the face and soft: for a ~200 px FFHQ face the mask
  starts 4-12 px inside the landmark hull and reaches 1 after another 10-30 px.
  """

  erode: tuple[float, float] = (0.02, 0.06)  # mask is 0 within this distance of the hull edge
  feather: tuple[float, float] = (0.05, 0.15)  # then rises to 1 over this distance
  color_jitter: float = 2.0  # LAB units: the target mean of each channel is shifted by U(-j, j)


class SwapResult(NamedTuple):
  """One swap: the image, its blend mask, its landmarks and the colour-corrected warped face.

  image: uint8 [H, W, 3] RGB, the target with the source's face.
  mask: float32 [H, W] in [0, 1], the blend weight of the face (0: the target's pixel, exactly).
  landmarks: float32 [68, 2], the result's landmarks (the target's: the geometry is kept).
  warped: uint8 [H, W, 3] RGB, the source warped onto the target's landmarks and colour-corrected
    (what was blended in; for Poisson, before the clone); undefined (0) outside ``warp_valid``.
  warp_valid: bool [H, W], where the warp is defined (the triangulated frame around the face).
  """

  image: np.ndarray
  mask: np.ndarray
  landmarks: np.ndarray
  warped: np.ndarray
  warp_valid: np.ndarray


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    raise ValueError(f"{what} must be a numpy array, got {type(image).__name__}")
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 2 or image.shape[1] < 2:
    raise ValueError(f"{what} must be an RGB image [H, W, 3], got shape {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8, got {image.dtype}")
  return np.ascontiguousarray(image)


def _check_landmarks(landmarks: np.ndarray, what: str) -> np.ndarray:
  lm = np.asarray(landmarks)
  if lm.shape != (N_LANDMARKS, 2):
    raise ValueError(
      f"{what} must be the 68 dlib landmarks [68, 2], got shape {lm.shape} "
      "(with an 81-point predictor pass landmarks[:68])"
    )
  if not np.issubdtype(lm.dtype, np.number):
    raise ValueError(f"{what} must be numeric, got {lm.dtype}")
  lm = lm.astype(np.float64)
  if not np.isfinite(lm).all():
    raise ValueError(f"{what} contain non-finite values (NaN or inf)")
  return lm


def _hull_area(points: np.ndarray) -> float:
  return float(cv2.contourArea(cv2.convexHull(points.astype(np.float32))))


def _check_face(lm: np.ndarray, what: str) -> None:
  area = _hull_area(lm)
  if area < MIN_FACE_AREA:
    raise ValueError(
      f"degenerate face: the hull of the {what} has area {area:.1f} px^2 "
      f"(< {MIN_FACE_AREA}); the landmarks are collapsed, collinear or the face is too small"
    )


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares affine [2, 3] with dst ~ A @ [src, 1]; ValueError when it is ill-posed."""
  design = np.column_stack([src, np.ones(len(src))])
  coef, _, rank, _ = np.linalg.lstsq(design, dst, rcond=None)
  if rank < 3:
    raise ValueError("degenerate face: the landmarks do not span two dimensions")
  return coef.T


def frame_points(src_lm: np.ndarray, dst_lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """8 extra (source, target) point pairs around the face: see the module docstring (step 1).

  Target: corners and edge midpoints of the target landmark box grown by FRAME_MARGIN of its
  longer side; source: the same points through the least-squares affine fit target -> source.
  """
  (x0, y0), (x1, y1) = dst_lm.min(0), dst_lm.max(0)
  pad = FRAME_MARGIN * max(x1 - x0, y1 - y0)
  x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad
  xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
  dst = np.array([[x0, y0], [xm, y0], [x1, y0], [x1, ym], [x1, y1], [xm, y1], [x0, y1], [x0, ym]])
  affine = _fit_affine(dst_lm, src_lm)
  src = dst @ affine[:, :2].T + affine[:, 2]
  return src, dst


def warp_maps(
  src_points: np.ndarray, dst_points: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Piecewise-affine backward maps for ``cv2.remap``: (map_x, map_y, valid), each [H, W].

  The plane is triangulated by Delaunay on `dst_points`; a pixel (x, y) of the output (pixel
  centres at integer coordinates, as dlib's landmarks and OpenCV) inside triangle (i, j, k) with
  barycentric coordinates (a, b, c) reads the source at a*src[i] + b*src[j] + c*src[k]. So
  dst_points[n] maps onto src_points[n] exactly, and each triangle is warped by one affine map.
  Pixels outside the triangulation get valid False and map -1 (remap then gives its border value).
  Coincident target points are merged by Qhull (one of them becomes the vertex).
  """
  src = np.asarray(src_points, np.float64)
  dst = np.asarray(dst_points, np.float64)
  if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 3:
    raise ValueError(f"need matching [N >= 3, 2] point sets, got {src.shape} and {dst.shape}")
  h, w = shape
  try:
    tri = Delaunay(dst)
  except Exception as e:  # scipy raises QhullError (a RuntimeError) on flat point sets
    raise ValueError(f"degenerate face: cannot triangulate the landmarks ({e})") from None
  map_x = np.full((h, w), -1.0, np.float32)
  map_y = np.full((h, w), -1.0, np.float32)
  valid = np.zeros((h, w), bool)
  # Triangle by triangle over its bounding box (much faster than find_simplex on every pixel):
  # a pixel is in the triangle when its barycentric coordinates are all >= -eps; pixels on a
  # shared edge are written by both triangles, whose affine maps agree there.
  # Barycentric matrices in closed form (scipy's `Delaunay.transform` costs a slow first LAPACK
  # call); Qhull's simplices are never flat, but slivers below 1e-12 px^2 are skipped.
  eps = 1e-9
  for simplex in tri.simplices:
    corners = dst[simplex]
    offset = corners[2]
    (a, b), (c, d) = (corners[0] - offset), (corners[1] - offset)  # columns of the edge matrix
    det = a * d - b * c
    if abs(det) < 1e-12:
      continue
    t_inv = np.array([[d, -c], [-b, a]]) / det
    x0, y0 = np.maximum(np.ceil(corners.min(0) - 1e-6), 0).astype(int)
    x1, y1 = np.minimum(np.floor(corners.max(0) + 1e-6), [w - 1, h - 1]).astype(int)
    if x1 < x0 or y1 < y0:
      continue
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    rel = np.stack([xs - offset[0], ys - offset[1]], -1).astype(np.float64)
    b01 = rel @ t_inv.T  # [h, w, 2]
    bary = np.concatenate([b01, 1.0 - b01.sum(-1, keepdims=True)], -1)  # [h, w, 3]
    inside = (bary >= -eps).all(-1)
    if not inside.any():
      continue
    source = bary[inside] @ src[simplex]  # [P, 2]
    rows, cols = ys[inside], xs[inside]
    map_x[rows, cols] = source[:, 0]
    map_y[rows, cols] = source[:, 1]
    valid[rows, cols] = True
  return map_x, map_y, valid


def warp_face(
  image: np.ndarray, src_lm: np.ndarray, dst_lm: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
  """`image` (the source, landmarks `src_lm`) warped onto `dst_lm` in an [H, W] = `shape` frame.

  The triangulation is the 68 landmarks plus the 8 ``frame_points``. Returns (warped, valid):
  warped has `image`'s dtype and channels (0 where not valid); the source is sampled bilinearly
  with reflected borders, so a source face near its image edge still gives defined pixels.
  """
  fsrc, fdst = frame_points(np.asarray(src_lm, np.float64), np.asarray(dst_lm, np.float64))
  map_x, map_y, valid = warp_maps(np.vstack([src_lm, fsrc]), np.vstack([dst_lm, fdst]), shape)
  warped = cv2.remap(
    image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
  )
  warped[~valid] = 0
  return warped, valid


def _smoothstep(t: np.ndarray) -> np.ndarray:
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def hull_raster(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """uint8 [H, W] (1 inside) convex hull of the landmarks, no anti-aliasing, sub-pixel vertices."""
  canvas = np.zeros(shape, np.uint8)
  hull = cv2.convexHull(np.round(np.asarray(landmarks) * 16).astype(np.int32))
  cv2.fillConvexPoly(canvas, hull, 1, lineType=cv2.LINE_8, shift=4)
  return canvas


def blend_mask(
  landmarks: np.ndarray, shape: tuple[int, int], erode: float, feather: float
) -> np.ndarray:
  """float32 [H, W] mask: smoothstep((d - erode) / feather) of the distance d to the hull edge.

  d is the Euclidean distance transform of the hull raster (distance to the nearest pixel outside
  it), so the mask is 0 within `erode` px of the hull edge and outside, 1 deeper than
  erode + feather px (module docstring, step 2). `erode` must be >= 1, `feather` > 0.
  """
  if erode < 1 or feather <= 0:
    raise ValueError(f"need erode >= 1 and feather > 0 (pixels), got {erode}, {feather}")
  hull = hull_raster(landmarks, shape)
  # distanceTransform treats pixels beyond the array as inside, so where the image edge cuts the
  # hull the mask is not eroded along it: the image edge is not an edge of the face.
  dist = cv2.distanceTransform(hull, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
  mask = _smoothstep((dist - erode) / feather).astype(np.float32)
  mask[hull == 0] = 0.0
  return mask


def _weighted_stats(lab: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of `lab` [H, W, 3] weighted by `weight` [H, W]."""
  keep = weight > 0
  x = lab[keep].astype(np.float64)
  w = weight[keep].astype(np.float64)[:, None]
  mean = (x * w).sum(0) / w.sum()
  std = np.sqrt(((x - mean) ** 2 * w).sum(0) / w.sum())
  return mean, std


def color_transfer(
  face: np.ndarray,
  target: np.ndarray,
  weight: np.ndarray,
  *,
  mean_shift: np.ndarray | None = None,
) -> np.ndarray:
  """`face` (uint8 RGB) with the LAB mean/std of `target` where `weight` > 0 (Reinhard 2001).

  Both statistics are weighted by `weight` (the blend mask), per LAB channel:
  out = (x - mean_face) * clip(std_target / std_face, STD_RATIO_BOUNDS) + mean_target + shift.
  Returns uint8 RGB of `face`'s shape (LAB values outside the RGB gamut are clipped).
  """
  if not (weight > 0).any():
    raise ValueError("colour transfer needs a non-empty mask")
  lab_face = cv2.cvtColor(face.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB).astype(np.float64)
  lab_target = cv2.cvtColor(target.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
  mean_f, std_f = _weighted_stats(lab_face, weight)
  mean_t, std_t = _weighted_stats(lab_target, weight)
  ratio = np.clip(std_t / np.maximum(std_f, 1e-6), *STD_RATIO_BOUNDS)
  if mean_shift is not None:
    mean_t = mean_t + mean_shift
  lab = ((lab_face - mean_f) * ratio + mean_t).astype(np.float32)
  rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
  return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _poisson(face: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """`face` cloned into `target` by cv2.seamlessClone over mask > 0, aligned pixel for pixel."""
  clone = (mask > 0).astype(np.uint8) * 255
  # seamlessClone zeroes the mask's outermost pixels itself; do it first so that the bounding box
  # used for the alignment below is the one it uses.
  clone[0, :] = clone[-1, :] = 0
  clone[:, 0] = clone[:, -1] = 0
  if not clone.any():
    return target.copy()
  x, y, w, h = cv2.boundingRect(clone)
  # OpenCV places the clone at [p.x - w/2, p.y - h/2) with integer division: this p makes that
  # rectangle the mask's own, so the face is not shifted by a pixel.
  centre = (x + w // 2, y + h // 2)
  out = cv2.seamlessClone(
    np.ascontiguousarray(face[..., ::-1]),
    np.ascontiguousarray(target[..., ::-1]),
    clone,
    centre,
    cv2.NORMAL_CLONE,
  )
  return out[..., ::-1]


def face_swap(
  target: np.ndarray,
  target_lm: np.ndarray,
  source: np.ndarray,
  source_lm: np.ndarray,
  rng: np.random.Generator,
  *,
  blend: str = "alpha",
  config: SwapConfig = SwapConfig(),
) -> SwapResult:
  """The source's face on the target: warp, colour transfer, blend (module docstring).

  target, source: uint8 RGB [H, W, 3] (sizes may differ); target_lm, source_lm: their 68 dlib
  landmarks [68, 2] in pixel coordinates; rng: the only source of randomness (draws: erode,
  feather, colour jitter, in that order). Returns a SwapResult whose image equals the target
  exactly wherever its mask is 0. ValueError on malformed input or a degenerate face (hull under
  MIN_FACE_AREA, flat landmarks, or no mask pixel left inside the image after erosion).
  """
  target = _check_image(target, "target")
  source = _check_image(source, "source")
  t_lm = _check_landmarks(target_lm, "target landmarks")
  s_lm = _check_landmarks(source_lm, "source landmarks")
  if blend not in BLENDS:
    raise ValueError(f"unknown blend {blend!r}: use one of {BLENDS}")
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
  _check_face(t_lm, "target landmarks")
  _check_face(s_lm, "source landmarks")
  shape = target.shape[:2]

  size = np.sqrt(_hull_area(t_lm))
  erode = max(1.0, rng.uniform(*config.erode) * size)
  feather = max(1.0, rng.uniform(*config.feather) * size)
  shift = rng.uniform(-config.color_jitter, config.color_jitter, 3)

  mask = blend_mask(t_lm, shape, erode, feather)
  warped, valid = warp_face(source, s_lm, t_lm, shape)
  mask[~valid] = 0.0  # never blend where the warp is undefined (cannot happen inside the hull)
  if not (mask > 0).any():
    raise ValueError(
      "degenerate face: no blend-mask pixel inside the target image (face too small for the "
      f"erosion of {erode:.1f} px, or the target landmarks lie outside the image)"
    )
  corrected = color_transfer(warped, target, mask, mean_shift=shift)
  corrected[~valid] = 0
  face = _poisson(corrected, target, mask) if blend == "poisson" else corrected

  alpha = mask[..., None]
  out = alpha * face.astype(np.float32) + (1.0 - alpha) * target.astype(np.float32)
  image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
  untouched = mask == 0
  image[untouched] = target[untouched]
  return SwapResult(image, mask, t_lm.astype(np.float32), corrected, valid)


def pair_sources(n: int, per_target: int, seed: int) -> list[list[int]]:
  """For each of n identities, `per_target` distinct source indices, none its own; seeded.

  The identities are put in a random order; in round r, the identity at position j takes its
  source from position (j + shift_r) mod n, with distinct random shifts in 1..n-1. Each round is
  thus a derangement, a target's sources are distinct, and every identity is a source exactly
  `per_target` times (balanced: no identity dominates the fakes).
  """
  if n < 2:
    raise ValueError(f"need at least 2 identities to swap, got {n}")
  if not 1 <= per_target <= n - 1:
    raise ValueError(f"per_target must be in 1..{n - 1} for {n} identities, got {per_target}")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A4B]))
  order = rng.permutation(n)
  shifts = rng.choice(np.arange(1, n), size=per_target, replace=False)
  position = np.empty(n, np.int64)
  position[order] = np.arange(n)
  return [[int(order[(position[i] + s) % n]) for s in shifts] for i in range(n)]


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def make_swaps(
  faces: Sequence[tuple[str, np.ndarray, np.ndarray]],
  out_dir: str | os.PathLike,
  *,
  seed: int,
  per_target: int = 1,
  quality: int = JPEG_QUALITY,
  blend: str = "alpha",
  config: SwapConfig = SwapConfig(),
  masks: bool = True,
) -> list[dict]:
  """Swaps between identities, written as `out_dir/<target>__<source>.jpg`; one dict per swap.

  faces: (name, uint8 RGB image, 68 landmarks) per identity; names must be unique, made of
  letters, digits, '.', '_' and '-' and contain no '__' (the file name separator). Each target
  gets `per_target` different sources (``pair_sources``: never itself). The swap of (target,
  source) uses a generator seeded by (seed, target index, source index), so every file depends
  only on the seed and its pair, and the same inputs and seed give byte-identical files. Images are
  JPEG of `quality` (92 by default, as the FFHQ reals: module docstring); with `masks`, the blend
  mask is saved losslessly as `out_dir/masks/<target>__<source>.png` (uint8, 255 = full weight).
  Returns dicts with keys path, target, source and mask (the mask's path or None), targets in input
  order.
  """
  if not 1 <= int(quality) <= 100:
    raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
  names = [face[0] for face in faces]
  for name in names:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or "__" in name:
      raise ValueError(
        f"bad identity name {name!r}: use letters, digits, '.', '_', '-' (no '__', no path)"
      )
  if len(set(names)) != len(names):
    raise ValueError("identity names must be unique (they name the files)")
  pairs = pair_sources(len(faces), per_target, seed)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if masks:
    (out / "masks").mkdir(exist_ok=True)
  records = []
  for t, sources in enumerate(pairs):
    t_name, t_img, t_lm = faces[t]
    for s in sources:
      s_name, s_img, s_lm = faces[s]
      rng = np.random.default_rng(np.random.SeedSequence([int(seed), t, s]))
      try:
        result = face_swap(t_img, t_lm, s_img, s_lm, rng, blend=blend, config=config)
      except ValueError as e:
        raise ValueError(f"swap {s_name} -> {t_name}: {e}") from None
      stem = f"{t_name}__{s_name}"
      path = out / f"{stem}.jpg"
      ok, buf = cv2.imencode(
        ".jpg", result.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
      )
      if not ok:
        raise RuntimeError(f"JPEG encoding of {path} failed")
      path.write_bytes(buf.tobytes())
      mask_path = None
      if masks:
        mask_path = out / "masks" / f"{stem}.png"
        ok, buf = cv2.imencode(".png", np.rint(result.mask * 255).astype(np.uint8))
        if not ok:
          raise RuntimeError(f"PNG encoding of {mask_path} failed")
        mask_path.write_bytes(buf.tobytes())
      records.append(
        {
          "path": str(path),
          "target": t_name,
          "source": s_name,
          "mask": None if mask_path is None else str(mask_path),
        }
      )
  return records


def load_faces(
  paths: Iterable[str | os.PathLike], extractor=None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(file stem, RGB image, 68 landmarks) of the largest dlib face of each image, for make_swaps.

  Detection and landmarks are the project's pipeline (``csdfd_jax.data.faces.FaceExtractor``;
  one is built with the default predictor when `extractor` is None). Images without a face are
  left out, so the result can be shorter than `paths`.
  """
  from csdfd_jax.data.video import read_image

  if extractor is None:
    from csdfd_jax.data.faces import FaceExtractor

    extractor = FaceExtractor()
  faces = []
  for path in paths:
    rgb = read_image(path)
    detections = extractor.detect(rgb)
    if detections:
      faces.append((Path(path).stem, rgb, detections[0].landmarks[:N_LANDMARKS].copy()))
  return faces
