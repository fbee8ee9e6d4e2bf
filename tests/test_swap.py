"""The graphics face swap (csdfd_jax.data.swap) on real FFHQ faces with real dlib landmarks, and
its piecewise-affine warp on synthetic landmark sets where the expected result is exact."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial import ConvexHull, Delaunay

from csdfd_jax.data import swap
from csdfd_jax.data.faces import FaceExtractor

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FFHQ = DATA / "ffhq_real_384"
FFHQ_FILES = [FFHQ / f"ffhq_{n:05d}.jpg" for n in (0, 1, 2)]
INNER = slice(17, 68)  # brows, nose, eyes, mouth: the inner face


@pytest.fixture(scope="module")
def extractor() -> FaceExtractor:
  return FaceExtractor()


@pytest.fixture(scope="module")
def faces(request):
  """(name, rgb, 68 landmarks) of 3 real FFHQ photos, read in place, landmarks from real dlib."""
  if not all(p.is_file() for p in FFHQ_FILES):
    pytest.skip(f"real FFHQ photos absent under {FFHQ}")
  found = swap.load_faces(FFHQ_FILES, request.getfixturevalue("extractor"))
  assert [f[0] for f in found] == [p.stem for p in FFHQ_FILES], "dlib missed a face"
  return found


def template(
  scale: float, angle_deg: float, centre, rng: np.random.Generator, noise: float, bend: float = 0
):
  """A synthetic 68-point face in dlib order (ellipse arcs), smoothly bent, rotated, scaled and
  jittered. The bend is an orientation-preserving smooth deformation: it changes the face's
  proportions without flipping any small triangle (noise of a pixel or more on the closely spaced
  nose and mouth points does flip slivers, and the piecewise-affine warp then folds)."""
  pts = []
  phi = np.linspace(np.pi, 0, 17)
  pts += list(zip(np.cos(phi), -0.1 + 1.2 * np.sin(phi), strict=True))  # jaw 0-16
  t = np.linspace(0, 1, 5)
  for x0, x1 in ((-0.8, -0.15), (0.15, 0.8)):  # brows 17-26
    pts += list(zip(x0 + (x1 - x0) * t, -0.55 - 0.1 * np.sin(np.pi * t), strict=True))
  pts += [(0.0, y) for y in np.linspace(-0.35, 0.15, 4)]  # nose bridge 27-30
  pts += list(zip(np.linspace(-0.2, 0.2, 5), 0.3 - 0.05 * np.sin(np.pi * t), strict=True))
  eye = np.array([np.pi, 4 * np.pi / 3, 5 * np.pi / 3, 0, np.pi / 3, 2 * np.pi / 3])
  for cx in (-0.45, 0.45):  # eyes 36-47
    pts += list(zip(cx + 0.18 * np.cos(eye), -0.3 + 0.08 * np.sin(eye), strict=True))
  for n, rx, ry in ((12, 0.4, 0.2), (8, 0.25, 0.1)):  # mouth 48-59, 60-67
    a = np.pi + 2 * np.pi * np.arange(n) / n
    pts += list(zip(rx * np.cos(a), 0.6 + ry * np.sin(a), strict=True))
  pts = np.array(pts)
  assert pts.shape == (68, 2)
  x, y = pts[:, 0].copy(), pts[:, 1].copy()
  pts = np.column_stack([x + bend * np.sin(1.5 * y), y + 0.6 * bend * np.sin(2 * x)])
  c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
  pts = pts @ np.array([[c, s], [-s, c]]) * scale + centre
  return pts + rng.normal(0, noise, pts.shape)


def synthetic_pair(seed: int = 0):
  rng = np.random.default_rng(seed)
  source_lm = template(70, 8, (120, 126), rng, 0.3)
  target_lm = template(85, -5, (130, 118), rng, 0.3, bend=0.1)
  return source_lm, target_lm


def test_warp_sends_source_landmarks_onto_target_landmarks():
  """A dot drawn at each source landmark lands at the matching target landmark (< 1 px).

  One channel per landmark (remap warps all 68 at once), so dots never overlap. Hull landmarks
  (jaw, brows) are interior vertices thanks to the frame points, so their dots are not clipped.
  """
  source_lm, target_lm = synthetic_pair()
  shape = (256, 256)
  ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
  dots = np.stack(
    [np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 2.0) for x, y in source_lm],
    -1,  # sigma 1 px
  ).astype(np.float32)
  warped, valid = swap.warp_face(dots, source_lm, target_lm, shape)
  weight = warped.reshape(-1, 68)
  assert (weight.sum(0) > 1.0).all(), "a dot vanished in the warp"
  centroids = (
    np.stack([(weight * xs.reshape(-1, 1)).sum(0), (weight * ys.reshape(-1, 1)).sum(0)], -1)
    / weight.sum(0)[:, None]
  )
  error = np.linalg.norm(centroids - target_lm, axis=1)
  assert error.max() < 1.0, f"landmark {error.argmax()} off by {error.max():.2f} px"
  # The two shapes differ by much more than the tolerance, so an identity warp would fail.
  assert np.linalg.norm(source_lm - target_lm, axis=1).min() > 3
  assert valid[np.round(target_lm[:, 1]).astype(int), np.round(target_lm[:, 0]).astype(int)].all()


def test_warp_maps_are_exact_at_vertices_and_affine_inside_triangles():
  """At integer target vertices the backward map reads exactly the source landmark; elsewhere it
  is the barycentric interpolation of the Delaunay triangle holding the pixel (reference: scipy's
  find_simplex + transform, on a sample of pixels), and nothing outside the hull is valid."""
  source_lm, target_lm = synthetic_pair(1)
  target_lm = np.round(target_lm)  # integer pixels, so a map entry sits exactly on a vertex
  map_x, map_y, valid = swap.warp_maps(source_lm, target_lm, (256, 256))
  rows, cols = target_lm[:, 1].astype(int), target_lm[:, 0].astype(int)
  assert valid[rows, cols].all()
  np.testing.assert_allclose(map_x[rows, cols], source_lm[:, 0], atol=1e-3)
  np.testing.assert_allclose(map_y[rows, cols], source_lm[:, 1], atol=1e-3)

  tri = Delaunay(target_lm)
  pix = np.random.default_rng(0).integers(0, 256, (4000, 2)).astype(np.float64)
  simplex = tri.find_simplex(pix)
  inside = simplex >= 0
  assert 500 < inside.sum() < 4000
  t = tri.transform[simplex[inside]]
  b = np.einsum("pij,pj->pi", t[:, :2], pix[inside] - t[:, 2])
  bary = np.column_stack([b, 1 - b.sum(1)])
  expected = np.einsum("pk,pkd->pd", bary, source_lm[tri.simplices[simplex[inside]]])
  px, py = pix[inside, 0].astype(int), pix[inside, 1].astype(int)
  assert valid[py, px].all()
  np.testing.assert_allclose(map_x[py, px], expected[:, 0], atol=1e-3)
  np.testing.assert_allclose(map_y[py, px], expected[:, 1], atol=1e-3)
  # Outside the hull (no frame points here) nothing is valid.
  hull = ConvexHull(target_lm)
  yy, xx = np.nonzero(valid)
  dist = np.column_stack([xx, yy]) @ hull.equations[:, :2].T + hull.equations[:, 2]
  assert dist.max(1).max() < 1e-6


def hull_distance(landmarks: np.ndarray, mask: np.ndarray) -> float:
  """Largest signed distance (px, > 0 outside) from the landmark hull of a pixel with mask > 0."""
  eq = ConvexHull(landmarks).equations  # unit normals: the offset is the signed distance
  ys, xs = np.nonzero(mask > 0)
  return float((np.column_stack([xs, ys]) @ eq[:, :2].T + eq[:, 2]).max(1).max())


@pytest.mark.parametrize("blend", swap.BLENDS)
def test_same_seed_same_swap_other_seed_other_swap(faces, blend):
  (_, t_img, t_lm), (_, s_img, s_lm) = faces[0], faces[1]
  a = swap.face_swap(t_img, t_lm, s_img, s_lm, np.random.default_rng(5), blend=blend)
  b = swap.face_swap(t_img, t_lm, s_img, s_lm, np.random.default_rng(5), blend=blend)
  c = swap.face_swap(t_img, t_lm, s_img, s_lm, np.random.default_rng(6), blend=blend)
  for field in ("image", "mask", "landmarks", "warped"):
    assert np.array_equal(getattr(a, field), getattr(b, field)), field
  assert not np.array_equal(a.mask, c.mask)
  assert not np.array_equal(a.image, c.image)
  assert a.image.dtype == np.uint8 and a.image.shape == t_img.shape
  assert a.mask.dtype == np.float32 and a.mask.shape == t_img.shape[:2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_lies_inside_the_target_landmark_hull(faces, seed):
  """Every pixel with mask > 0 is inside the hull of the target's 68 landmarks. Slack 1 px for the
  rasterisation of the hull (the erosion of >= 1 px keeps the actual maximum below 0)."""
  (_, t_img, t_lm), (_, s_img, s_lm) = faces[seed % 3], faces[(seed + 1) % 3]
  result = swap.face_swap(t_img, t_lm, s_img, s_lm, np.random.default_rng(seed))
  assert hull_distance(t_lm, result.mask) <= 1.0
  # Not vacuous: the mask covers most of the face and reaches full weight.
  hull_area = ConvexHull(t_lm).volume
  assert (result.mask > 0).sum() > 0.5 * hull_area
  assert result.mask.max() == pytest.approx(1.0)
  assert result.mask.min() == 0.0
  np.testing.assert_array_equal(result.landmarks, t_lm.astype(np.float32))


@pytest.mark.parametrize("blend", swap.BLENDS)
def test_pixels_outside_the_mask_are_the_targets(faces, blend):
  (_, t_img, t_lm), (_, s_img, s_lm) = faces[1], faces[2]
  result = swap.face_swap(t_img, t_lm, s_img, s_lm, np.random.default_rng(3), blend=blend)
  outside = result.mask == 0
  assert outside.sum() > 0.3 * outside.size
  np.testing.assert_array_equal(result.image[outside], t_img[outside])
  # ... while the face itself did change.
  inside = result.mask > 0.5
  changed = (result.image[inside] != t_img[inside]).any(-1).mean()
  assert changed > 0.8


def correlation(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
  """Pearson correlation of two images' grey levels over `region` (colour-shift invariant)."""
  ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)[region].astype(np.float64)
  gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)[region].astype(np.float64)
  return float(np.corrcoef(ga, gb)[0, 1])


@pytest.mark.parametrize("blend", swap.BLENDS)
def test_the_swap_carries_the_source_face(faces, blend):
  """On the inner face (full mask weight, inside the box of landmarks 17-67) the result matches
  the source warped onto the target's landmarks better than the target itself: by grey-level
  correlation against a warp of the raw source (not the module's colour-corrected one) and by
  mean absolute difference against the returned warped face."""
  for t, s in ((0, 1), (2, 0)):
    (_, t_img, t_lm), (_, s_img, s_lm) = faces[t], faces[s]
    result = swap.face_swap(t_img, t_lm, s_img, s_lm, np.random.default_rng(t), blend=blend)
    region = result.mask >= 0.999
    (x0, y0), (x1, y1) = t_lm[INNER].min(0).astype(int), t_lm[INNER].max(0).astype(int)
    box = np.zeros_like(region)
    box[y0 : y1 + 1, x0 : x1 + 1] = True
    region &= box
    assert region.sum() > 2000
    raw, _ = swap.warp_face(s_img, s_lm, t_lm, t_img.shape[:2])
    to_source = correlation(result.image, raw, region)
    to_target = correlation(result.image, t_img, region)
    assert to_source > 0.8 and to_source > to_target + 0.2, (to_source, to_target)
    image = result.image[region].astype(int)
    to_warped = np.abs(image - result.warped[region]).mean()
    assert to_warped < 0.5 * np.abs(image - t_img[region]).mean()
    if blend == "alpha":  # full weight: exactly the colour-corrected warped face
      np.testing.assert_array_equal(result.image[region], result.warped[region])


def lab_stats(image: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std of each CIE LAB channel of `image`, weighted by `weight`."""
  lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB).reshape(-1, 3)
  w = weight.reshape(-1, 1).astype(np.float64)
  mean = (lab * w).sum(0) / w.sum()
  return mean, np.sqrt(((lab - mean) ** 2 * w).sum(0) / w.sum())


def test_colour_is_matched_to_the_target_under_the_mask(faces):
  """Reinhard transfer: under the mask, the blended-in face has the target's LAB mean (within
  0.6 units without jitter, within the jitter bound with it) and nearly its std (gamut clipping
  can cut a stretched channel a little), while the raw warped source is far off."""
  for t, s in ((0, 1), (1, 2), (2, 0)):
    (_, t_img, t_lm), (_, s_img, s_lm) = faces[t], faces[s]
    for jitter in (0.0, 2.0):
      config = swap.SwapConfig(color_jitter=jitter)
      result = swap.face_swap(t_img, t_lm, s_img, s_lm, np.random.default_rng(0), config=config)
      mean_t, std_t = lab_stats(t_img, result.mask)
      mean_f, std_f = lab_stats(result.warped, result.mask)
      assert np.abs(mean_f - mean_t).max() < jitter + 0.6, (mean_f, mean_t)
      assert ((std_f / std_t > 0.8) & (std_f / std_t < 1.2)).all(), (std_f, std_t)
    raw, _ = swap.warp_face(s_img, s_lm, t_lm, t_img.shape[:2])
    mean_r, _ = lab_stats(raw, result.mask)
    assert np.abs(mean_r - mean_t).max() > 5.0


def test_dlib_sees_a_face_with_the_targets_geometry(faces, extractor):
  """The swap keeps the target's geometry: dlib finds one face in the result, with landmarks
  within 4 px (mean) of the target's, far closer than the source's own landmarks are."""
  for t, s in ((0, 1), (1, 2), (2, 0)):
    (_, t_img, t_lm), (_, s_img, s_lm) = faces[t], faces[s]
    result = swap.face_swap(t_img, t_lm, s_img, s_lm, np.random.default_rng(t))
    found = extractor.detect(result.image)
    assert len(found) == 1
    lm = found[0].landmarks[:68]
    error = np.linalg.norm(lm - t_lm, axis=1).mean()
    spread = np.linalg.norm(s_lm - t_lm, axis=1).mean()
    assert error < 4.0 and error < 0.5 * spread, (error, spread)


def synthetic_inputs():
  source_lm, target_lm = synthetic_pair(2)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
  return image, target_lm, image[::-1].copy(), source_lm


def test_synthetic_inputs_swap_cleanly():
  """The inputs the error cases below corrupt one at a time are valid as they are."""
  target, target_lm, source, source_lm = synthetic_inputs()
  result = swap.face_swap(target, target_lm, source, source_lm, np.random.default_rng(0))
  assert (result.mask > 0).any()
  poisson = swap.face_swap(
    target, target_lm, source, source_lm, np.random.default_rng(0), blend="poisson"
  )
  np.testing.assert_array_equal(poisson.mask, result.mask)


def _flat(lm):
  out = lm.copy()
  out[:, 1] = 100.0
  return out


BAD = {
  "grey target": (lambda a: {**a, "target": a["target"][..., 0]}, "RGB image"),
  "float source": (lambda a: {**a, "source": a["source"].astype(np.float32)}, "uint8"),
  "list target": (lambda a: {**a, "target": a["target"].tolist()}, "numpy array"),
  "67 landmarks": (lambda a: {**a, "target_lm": a["target_lm"][:67]}, r"\[68, 2\]"),
  "3d landmarks": (
    lambda a: {**a, "source_lm": np.pad(a["source_lm"], ((0, 0), (0, 1)))},
    r"\[68, 2\]",
  ),
  "nan landmark": (
    lambda a: {**a, "target_lm": np.where(np.arange(68)[:, None] == 5, np.nan, a["target_lm"])},
    "non-finite",
  ),
  "inf landmark": (lambda a: {**a, "source_lm": a["source_lm"] * np.inf}, "non-finite"),
  "collapsed face": (lambda a: {**a, "target_lm": np.full((68, 2), 50.0)}, "degenerate"),
  "collinear face": (lambda a: {**a, "source_lm": _flat(a["source_lm"])}, "degenerate"),
  "face outside image": (lambda a: {**a, "target_lm": a["target_lm"] + 5000}, "degenerate"),
  "unknown blend": (lambda a: {**a, "blend": "median"}, "unknown blend"),
  "no generator": (lambda a: {**a, "rng": 0}, "Generator"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_clear_value_error(case):
  target, target_lm, source, source_lm = synthetic_inputs()
  args = dict(
    target=target,
    target_lm=target_lm,
    source=source,
    source_lm=source_lm,
    rng=np.random.default_rng(0),
  )
  corrupt, message = BAD[case]
  with pytest.raises(ValueError, match=message):
    swap.face_swap(**corrupt(args))


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_pairing_is_a_seeded_balanced_set_of_derangements(n):
  for k in range(1, n):
    pairs = swap.pair_sources(n, k, seed=11)
    assert pairs == swap.pair_sources(n, k, seed=11)
    assert all(len(set(p)) == k and i not in p for i, p in enumerate(pairs))
    counts = np.bincount(np.concatenate(pairs), minlength=n)
    assert (counts == k).all()
  if n >= 4:  # several derangements exist: some seed gives another pairing
    assert any(swap.pair_sources(n, 1, s) != swap.pair_sources(n, 1, 11) for s in range(5))
  with pytest.raises(ValueError, match="per_target"):
    swap.pair_sources(n, n, seed=0)
  with pytest.raises(ValueError, match="at least 2"):
    swap.pair_sources(1, 1, seed=0)


def jpeg_segments(data: bytes) -> dict[int, list[bytes]]:
  """Marker -> payloads of a JPEG's header segments, up to the start of scan."""
  assert data[:2] == b"\xff\xd8", "not a JPEG (no SOI marker)"
  segments, i = {}, 2
  while True:
    assert data[i] == 0xFF
    marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
    segments.setdefault(marker, []).append(data[i + 4 : i + 2 + length])
    if marker == 0xDA:
      return segments
    i += 2 + length


def test_make_swaps_writes_deterministic_jpegs_like_the_reals(faces, tmp_path):
  records = swap.make_swaps(faces, tmp_path / "a", seed=3)
  names = [f[0] for f in faces]
  assert [r["target"] for r in records] == names
  assert sorted(r["source"] for r in records) == sorted(names)
  assert all(r["source"] != r["target"] for r in records)
  real = jpeg_segments(FFHQ_FILES[0].read_bytes())
  for r in records:
    path = Path(r["path"])
    assert path.name == f"{r['target']}__{r['source']}.jpg"
    data = path.read_bytes()
    header = jpeg_segments(data)
    # Same quantisation tables (quality 92) and chroma subsampling (4:2:0) as the real FFHQ file.
    assert header[0xDB] == real[0xDB]
    assert header[0xC0][0][5:] == real[0xC0][0][5:]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (384, 384, 3)
    mask = cv2.imread(r["mask"], cv2.IMREAD_UNCHANGED)
    assert mask.dtype == np.uint8 and mask.shape == (384, 384) and mask.max() == 255
  assert sorted(p.name for p in (tmp_path / "a").glob("*.jpg")) == sorted(
    Path(r["path"]).name for r in records
  )
  again = swap.make_swaps(faces, tmp_path / "b", seed=3)
  other = swap.make_swaps(faces, tmp_path / "c", seed=4, masks=False)
  for r, s in zip(records, again, strict=True):
    assert Path(r["path"]).read_bytes() == Path(s["path"]).read_bytes()
    assert Path(r["mask"]).read_bytes() == Path(s["mask"]).read_bytes()
  assert all(r["mask"] is None for r in other)
  first = {(r["target"], r["source"]): Path(r["path"]).read_bytes() for r in records}
  second = {(r["target"], r["source"]): Path(r["path"]).read_bytes() for r in other}
  assert first != second


def test_make_swaps_rejects_bad_names_and_settings(faces, tmp_path):
  (_, img, lm) = faces[0]
  with pytest.raises(ValueError, match="unique"):
    swap.make_swaps([("a", img, lm), ("a", img, lm)], tmp_path, seed=0)
  for name in ("a__b", "../x", "", "a/b"):
    with pytest.raises(ValueError, match="bad identity name"):
      swap.make_swaps([(name, img, lm), ("c", img, lm)], tmp_path, seed=0)
  with pytest.raises(ValueError, match="quality"):
    swap.make_swaps(faces, tmp_path, seed=0, quality=0)
  with pytest.raises(ValueError, match="per_target"):
    swap.make_swaps(faces, tmp_path, seed=0, per_target=3)
  assert not list(tmp_path.glob("*.jpg"))
