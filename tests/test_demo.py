"""Procedural demo store: format, dlib-ordered exact landmarks, determinism, splits, SBI on it,
and the design of its fakes: the training fakes' fingerprint, the unseen fakes' blend boundary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from csdfd_jax.data import demo, framing, sbi, store

SMALL = dict(size=96, train=4, val=2, test=2, unseen=2, frames=2)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
  return demo.make_demo_store(tmp_path_factory.mktemp("demo") / "store", seed=1, **SMALL)


@pytest.fixture(scope="module")
def records(small_store):
  return store.read_index(small_store)


def _image(root: Path, rel: str) -> np.ndarray:
  img = cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED)
  assert img is not None, rel
  return img[..., ::-1] if img.ndim == 3 else img


def test_store_format(small_store, records):
  lines = (small_store / "index.jsonl").read_text().splitlines()
  assert len(lines) == len(records) == (4 + 2 + 2 + 2) * 2 * 2
  assert set(json.loads(lines[0])) >= {
    "path", "media_id", "frame_index", "face_index", "label", "dataset", "split", "domain",
    "landmarks", "mask_path",
  }  # fmt: skip
  for r in records:
    img = _image(small_store, r.path)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert np.asarray(r.landmarks).shape == (68, 2)
    assert (r.label == 0) == (r.domain == "real")
    assert r.domain in {"real", "gan" if r.dataset == "demo" else "swap"}
    if r.label:
      mask = _image(small_store, r.mask_path)
      assert mask.shape == (96, 96) and mask.max() == 255
    else:
      assert r.mask_path is None
  summary = json.loads((small_store / "summary.json").read_text())
  assert summary["per_split"] == {
    "demo/train": {"media": 8, "faces": 16},
    "demo/val": {"media": 4, "faces": 8},
    "demo/test": {"media": 4, "faces": 8},
    "demo_unseen/test": {"media": 4, "faces": 8},
  }
  assert summary["demo"] == {"seed": 1, **SMALL, "design": demo.DESIGN}


def test_landmarks_inside_image_and_in_dlib_order(records):
  for r in records:
    lm = np.asarray(r.landmarks)
    assert (lm >= 0).all() and (lm <= 95).all(), r.path
    x, y = lm[:, 0], lm[:, 1]
    assert x[36:42].mean() < x[42:48].mean() and x[17:22].mean() < x[22:27].mean()
    assert x[36] < x[39] < x[42] < x[45] and x[0] < x[8] < x[16] and x[48] < x[54] and x[31] < x[35]
    assert y[17:27].mean() < y[36:48].mean() < y[30] < y[48:68].mean() < y[8]
    assert y[27] < y[30] and y[51] < y[57] and y[62] <= y[66] + 1e-6
    assert y[8] >= np.sort(y[:17])[-3]  # the chin is among the lowest jaw points (roll)
    contour = np.concatenate([lm[0:17], lm[26:16:-1]]).astype(np.float32)
    for k in (*range(36, 48), *range(27, 36), *range(48, 68)):
      assert cv2.pointPolygonTest(contour, tuple(map(float, lm[k])), False) > 0, (r.path, k)


def test_deterministic_bytes(small_store, tmp_path):
  again = demo.make_demo_store(tmp_path / "again", seed=1, **SMALL)
  files = sorted(p.relative_to(small_store) for p in small_store.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
  for rel in files:
    assert (small_store / rel).read_bytes() == (again / rel).read_bytes(), rel
  other = demo.make_demo_store(tmp_path / "other", seed=2, **SMALL)
  assert (other / "index.jsonl").read_bytes() != (again / "index.jsonl").read_bytes()


def test_grain_and_fingerprint_factors_change_only_what_they_scale(small_store, tmp_path):
  strong = demo.make_demo_store(tmp_path / "fp", seed=1, fingerprint_scale=2.0, **SMALL)
  records = store.read_index(small_store)
  assert records == store.read_index(strong)  # same faces, landmarks and masks
  for r in records:
    same = (small_store / r.path).read_bytes() == (strong / r.path).read_bytes()
    assert same == (r.domain != "gan"), r.path  # only the gan fakes change
    if r.domain == "gan":
      diff = _image(strong, r.path).astype(int) - _image(small_store, r.path)
      assert np.abs(diff).max() >= 4  # the fingerprint's extra 8-12 grey levels
  summary = json.loads((strong / "summary.json").read_text())["demo"]
  assert summary == {"seed": 1, **SMALL, "design": demo.DESIGN, "fingerprint_scale": 2.0}
  grainy = demo.make_demo_store(tmp_path / "grain", seed=1, grain_scale=2.5, **SMALL)
  reals = [r for r in records if r.label == 0]
  assert all((small_store / r.path).read_bytes() != (grainy / r.path).read_bytes() for r in reals)
  with pytest.raises(ValueError, match="grain_scale=0"):
    demo.make_demo_store(tmp_path / "bad", grain_scale=0, **SMALL)

  import sys

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from configs import effnet
  from csdfd_jax.data import protocols

  config = effnet.get_config("demo")
  config.data.cache = str(tmp_path / "cache")
  assert protocols.data_dir(config, "w").endswith("demo_seed0_grain2.5_fingerprint2")
  config.data.demo_grain = config.data.demo_fingerprint = 1.0
  assert protocols.data_dir(config, "w").endswith("demo_seed0")
  config.data.demo_fingerprint = 2.0
  assert protocols.data_dir(config, "w").endswith("demo_seed0_fingerprint2")


def test_splits_disjoint(records):
  media = {}
  for r in records:
    media.setdefault(r.media_id, set()).add((r.dataset, r.split))
  assert all(len(v) == 1 for v in media.values())
  split_of = {r.media_id: (r.dataset, r.split) for r in records if r.label == 0}
  for r in records:
    if r.dataset == "demo_unseen":
      assert r.split == "test"
    if r.label == 1 and r.dataset == "demo":
      target, family = r.media_id.split("_")
      assert family == "gan" and split_of[target] == (r.dataset, r.split)
    if r.label == 1 and r.dataset == "demo_unseen":
      target, source = r.media_id.split("_")
      assert target != source and split_of[target] == split_of[source] == (r.dataset, r.split)
  frames = {}
  for r in records:
    frames.setdefault(r.media_id, []).append(r.frame_index)
  assert all(sorted(v) == [0, 1] for v in frames.values())


def test_fakes_are_local_manipulations(small_store, records):
  """Each swap fake differs from its real frame mostly inside its mask (camera noise elsewhere);
  the gan fakes' pixel change is small by design (see the fingerprint and seam tests)."""
  real = {(r.media_id, r.frame_index): r for r in records if r.label == 0}
  for r in records:
    if r.label == 0 or r.domain != "swap":
      continue
    twin = real[(r.media_id.split("_")[0], r.frame_index)]
    diff = np.abs(_image(small_store, r.path).astype(float) - _image(small_store, twin.path)).mean(
      -1
    )
    mask = _image(small_store, r.mask_path) / 255.0
    assert diff[mask > 0.9].mean() > 2.5 * diff[mask < 0.01].mean(), r.path


def test_sbi_pair_on_demo_faces(small_store, records):
  rng = np.random.default_rng(0)
  for r in records[:8]:
    real, fake = sbi.sbi_pair(_image(small_store, r.path), np.asarray(r.landmarks), rng, size=64)
    assert real.shape == fake.shape == (64, 64, 3) and real.dtype == np.uint8


def test_reuse_and_overwrite(small_store, tmp_path):
  stamp = (small_store / "index.jsonl").stat().st_mtime_ns
  assert demo.make_demo_store(small_store, seed=1, **SMALL) == small_store
  assert (small_store / "index.jsonl").stat().st_mtime_ns == stamp
  with pytest.raises(FileExistsError, match="overwrite"):
    demo.make_demo_store(small_store, seed=3, **SMALL)
  with pytest.raises(ValueError, match="at least 2"):
    demo.make_demo_store(tmp_path / "bad", train=1)
  target = tmp_path / "rebuilt"
  demo.make_demo_store(target, seed=3, **SMALL)
  demo.make_demo_store(target, seed=4, overwrite=True, **SMALL)
  assert json.loads((target / "summary.json").read_text())["demo"]["seed"] == 4


def test_dlib_finds_the_drawn_faces():
  """Independent check of geometry and landmark order: dlib's detector and 68-point predictor."""
  spec = importlib.util.find_spec("face_recognition_models")
  dlib = pytest.importorskip("dlib")
  if spec is None:
    pytest.skip("face_recognition_models not installed")
  path = (
    Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
  )
  detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path))
  found, errors = 0, []
  for seed in range(12):
    rng = np.random.default_rng(seed)
    scene = demo.sample_scene(rng, 128)
    image, lm = demo.draw_face(demo.sample_identity(rng), scene, demo.sample_frame(rng, scene), 128)
    boxes = detector(image, 1)
    if boxes:
      found += 1
      pred = np.array([[p.x, p.y] for p in predictor(image, boxes[0]).parts()], np.float64)
      errors.append(np.linalg.norm(pred - lm, axis=1).mean() / np.ptp(lm[:, 0]))
  print(
    f"dlib found {found}/12 drawn faces; mean landmark error {np.mean(errors):.3f} x face width"
  )
  assert found >= 3
  assert np.mean(errors) < 0.1


def test_similarity_fit_recovers_a_known_map():
  rng = np.random.default_rng(0)
  src = rng.normal(size=(20, 2)) * 30
  c, s = 1.2 * np.cos(0.3), 1.2 * np.sin(0.3)
  m = np.array([[c, -s, 5.0], [s, c, -3.0]])
  np.testing.assert_allclose(demo._fit_similarity(src, src @ m[:, :2].T + m[:, 2]), m, atol=1e-9)


def test_cli(tmp_path, capsys):
  argv = [
    "--size",
    "64",
    "--train",
    "2",
    "--val",
    "0",
    "--test",
    "2",
    "--unseen",
    "2",
    "--frames",
    "1",
  ]
  demo.main(["--out", str(tmp_path / "cli"), *argv])
  assert "demo face store" in capsys.readouterr().out
  params = json.loads((tmp_path / "cli" / "summary.json").read_text())["demo"]
  assert params == {
    "seed": 0,
    "size": 64,
    "train": 2,
    "val": 0,
    "test": 2,
    "unseen": 2,
    "frames": 1,
    "design": demo.DESIGN,
  }
  demo.main(["--out", str(tmp_path / "cli2"), *argv, "--families", "gan,reenact"])
  params = json.loads((tmp_path / "cli2" / "summary.json").read_text())["demo"]
  assert params["families"] == ["gan", "reenact"]


# ----------------------------------------------------------------------------- design of the fakes


def _clean_frames(seed: int, size: int):
  """One clean real frame and its three fakes, before the camera: (real, lm, {family: fake})."""
  rng = np.random.default_rng([seed, 0])
  scene = demo.sample_scene(rng, size)
  frame = demo.sample_frame(rng, scene)
  ident, other = demo.sample_identity(rng), demo.sample_identity(rng)
  real, lm = demo.draw_face(ident, scene, frame, size)
  phase = tuple(rng.uniform(0, demo.fingerprint_period(size), 2))
  fakes = {
    "gan": demo.gan_frame(real, lm, ident, scene, frame, size, np.random.default_rng(seed), phase),
    "swap": demo.swap_frame(real, lm, other, scene, frame, size, np.random.default_rng(seed)),
  }
  return real, lm, scene, fakes


def fingerprint_energy(image: np.ndarray, lm: np.ndarray, period: float) -> float:
  """Amplitude (grey levels) of the fingerprint's two diagonal frequencies (+-1/period) in the
  luminance of the face centre (Gaussian window over the inner landmarks, mean removed)."""
  lum = image.astype(np.float64).mean(-1)
  yy, xx = np.mgrid[0 : lum.shape[0], 0 : lum.shape[1]]
  c, r = lm[17:68].mean(0), np.ptp(lm[17:68, 0]) * 0.35
  w = np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * r * r))
  lum = (lum - (lum * w).sum() / w.sum()) * w
  f = 1 / period
  waves = [np.exp(-2j * np.pi * f * (xx + sign * yy)) for sign in (1, -1)]
  return float(sum(abs((lum * wave).sum()) for wave in waves) * 2 / w.sum())


@pytest.mark.parametrize("size", [128, 64])
def test_gan_fakes_carry_the_fingerprint_after_camera_and_resize(size):
  """The fingerprint stands out of the reals at the input size (64 px) after the camera pass,
  from a 128 px store (a 2x area shrink) and from the default 64 px store; the swap fakes (the
  unseen manipulation) do not carry it."""
  period = demo.fingerprint_period(size) * 64 / size
  energy = {"real": [], "gan": [], "swap": []}
  for seed in range(8):
    real, lm, scene, fakes = _clean_frames(seed, size)
    lm64 = framing.resize_landmarks(lm, size, 64)
    images = {"real": real} | {k: v[0] for k, v in fakes.items()}
    for k, img in images.items():
      shot = demo.camera(img, np.random.default_rng([seed, 1]), scene.jpeg_quality)
      energy[k].append(fingerprint_energy(framing.resize_face(shot, 64), lm64, period))
  real, gan, swap = (np.array(energy[k]) for k in ("real", "gan", "swap"))
  assert (gan > 1.5 * real).all(), (gan, real)
  assert np.median(gan) > 3 * np.median(real), (gan, real)
  assert (swap < gan / 2).all() and np.median(swap) < 1.5 * np.median(real), (swap, real)


def test_fingerprint_is_periodic_zero_mean_and_measured_where_it_is():
  fp = demo.fingerprint(48, (1.3, 4.2), 5.0)
  p = demo.fingerprint_period(48)
  np.testing.assert_allclose(fp[:-p], fp[p:], atol=1e-4)
  np.testing.assert_allclose(fp[:, :-p], fp[:, p:], atol=1e-4)
  assert abs(fp.mean()) < 0.1 and np.abs(fp).max() <= 5.0 + 1e-4
  flat = np.full((48, 48, 3), 128.0)
  lm = np.random.default_rng(0).uniform(14, 34, (68, 2))
  assert fingerprint_energy(flat + fp[..., None], lm, p) > 1.5
  assert fingerprint_energy(flat + fp[..., None], lm, p * 1.5) < 0.5
  assert fingerprint_energy(flat, lm, p) < 1e-9


def test_unseen_swap_has_a_soft_blend_boundary_and_gan_has_no_seam():
  """Before the camera: outside its mask every fake is the real frame exactly; the swap's mask
  has a soft edge inside the face and across it the colour changes (incomplete colour
  correction, another identity), while across the gan fake's soft mask only the fingerprint is
  added."""
  for seed in range(4):
    real, lm, _, fakes = _clean_frames(seed, 128)
    face = np.zeros(real.shape[:2], np.uint8)
    cv2.fillPoly(face, [np.round(np.concatenate([lm[0:17], lm[26:16:-1]])).astype(np.int32)], 1)
    for family, (fake, _, mask) in fakes.items():
      m = mask / 255.0
      outside = m == 0
      assert outside.mean() > 0.4, family
      assert (fake[outside] == real[outside]).all(), family
      band = (m > 0.1) & (m < 0.9)
      diff = np.abs(fake.astype(float) - real).max(-1)
      if family == "swap":
        assert (band & (face > 0)).sum() > 50  # the soft edge runs inside the face
        assert diff[band].mean() > 6, diff[band].mean()
      else:  # at most the fingerprint's amplitude (12 levels), plus rounding
        assert band.sum() > 200
        assert np.quantile(diff[band], 0.99) <= 12.5 and diff[band].mean() < 4, diff[band].mean()


def test_families(tmp_path):
  tiny = dict(size=64, train=2, val=0, test=0, unseen=2, frames=1)
  out = demo.make_demo_store(tmp_path / "k", families=("gan", "swap", "reenact"), **tiny)
  domains = {(r.dataset, r.domain) for r in store.read_index(out)}
  assert domains == {
    ("demo", "real"), ("demo", "gan"), ("demo", "swap"), ("demo", "reenact"),
    ("demo_unseen", "real"), ("demo_unseen", "swap"),
  }  # fmt: skip
  summary = json.loads((out / "summary.json").read_text())["demo"]
  assert summary["families"] == ["gan", "swap", "reenact"]
  with pytest.raises(ValueError, match="families"):
    demo.make_demo_store(tmp_path / "bad", families=("gan", "morph"), **tiny)
  with pytest.raises(ValueError, match="families"):
    demo.make_demo_store(tmp_path / "bad", families=("gan", "gan"), **tiny)
