"""One face framing for every stream: measured with dlib on real FFHQ faces, end to end.

The store crops real FFHQ photos (dlib), the records and the grain pipelines then make stream O's
reals, stream S's reals and self-blended fakes, and the eval batches; dlib finds the 68 landmarks
again on each output image and the landmark box's width, height and aspect must agree across the
four kinds of image within 3 %. A second check watches the SBI synthesis: it runs at the output
resolution or above, and nothing after it enlarges the blended face.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csdfd_jax.data import builder, framing, pipeline, preprocess, sbi
from csdfd_jax.data.layouts import MediaRecord

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REALS, FAKES = DATA / "ffhq_real_384", DATA / "stylegan2_fake_384"
N = 64  # samples per kind of image
STEPS = 8  # train steps of batch 16 per stream: 8 x 8 = 64 O reals, 64 S reals, 64 S fakes

needs_data = pytest.mark.skipif(
  not (REALS.is_dir() and FAKES.is_dir()), reason=f"{REALS} or {FAKES} absent"
)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
  pytest.importorskip("dlib")
  root = tmp_path_factory.mktemp("framing")
  reals = sorted(REALS.glob("*.jpg"))
  fakes = sorted(FAKES.glob("*.jpg"))
  media = [MediaRecord(f"r{i}", str(p), 0, "train", "ffhq", "real", "image") for i, p in
           enumerate(reals[:N])]  # fmt: skip
  media += [MediaRecord(f"f{i}", str(p), 1, "train", "ffhq", "gan", "image") for i, p in
            enumerate(fakes[:8])]  # fmt: skip
  media += [MediaRecord(f"t{i}", str(p), 0, "test", "ffhq", "real", "image") for i, p in
            enumerate(reals[N : N + N // 2])]  # fmt: skip
  media += [MediaRecord(f"u{i}", str(p), 1, "test", "ffhq", "gan", "image") for i, p in
            enumerate(fakes[8 : 8 + N // 2])]  # fmt: skip
  preprocess.run_records(media, root / "store", frames=1, workers=1, progress=False)
  return builder.build_records(root / "store", root / "records")


def _box_stats(images: list[np.ndarray]) -> np.ndarray:
  """[n, 3] landmark-box (width, height, aspect) fractions, found by dlib on each image."""
  from csdfd_jax.data.faces import FaceExtractor

  extractor = FaceExtractor()
  stats = []
  for image in images:
    found = extractor.detect(np.ascontiguousarray(image))
    if found:
      w, h, _, _ = framing.landmark_box_fractions(found[0].landmarks, image.shape)
      stats.append((w, h, w / h))
  assert len(stats) >= 0.9 * len(images), f"dlib found only {len(stats)} of {len(images)} faces"
  return np.asarray(stats)


@needs_data
def test_every_stream_and_eval_share_one_framing(records):
  it = pipeline.train_iterator(records, batch_size=16, image_size=256, seed=0)
  steps = [next(it) for _ in range(STEPS)]
  it.close()
  kinds = {
    "O reals": [im for b in steps for im in b["o"]["image"][b["o"]["label"] == 0]],
    "S reals": [im for b in steps for im in b["s"]["image"][0::2]],
    "S fakes": [im for b in steps for im in b["s"]["image"][1::2]],
    "eval": [
      im
      for b in pipeline.eval_iterator(records, "test", batch_size=16, image_size=256)
      for im in b["image"][b["valid"]]
    ],
  }
  assert {k: len(v) for k, v in kinds.items()} == dict.fromkeys(kinds, N)
  means = {k: _box_stats(v).mean(0) for k, v in kinds.items()}
  for name, (w, h, aspect) in means.items():
    ref_w, ref_h, ref_aspect = means["eval"]
    msg = f"{name}: box {w:.3f} x {h:.3f} (aspect {aspect:.3f}) vs eval {ref_w:.3f} x {ref_h:.3f}"
    assert abs(w / ref_w - 1) < 0.03 and abs(h / ref_h - 1) < 0.03, msg
  aspects = [m[2] for m in means.values()]
  assert max(aspects) / min(aspects) - 1 < 0.03, means


@needs_data
@pytest.mark.parametrize("image_size", [128, 256, 320])
def test_sbi_synthesis_is_never_enlarged(records, monkeypatch, image_size):
  """The blend runs on >= image_size pixels and every later resize shrinks or keeps them (320:
  the stored 256 px square is enlarged before the synthesis, as stream O enlarges it)."""
  calls = []
  synthesize, resize = sbi.synthesize, sbi.resize_face

  def watched_synthesize(image, *args, **kw):
    calls.append(("synthesize", image.shape[0], image.shape[1]))
    return synthesize(image, *args, **kw)

  def watched_resize(image, size):
    calls.append(("resize", image.shape[0], size))
    return resize(image, size)

  monkeypatch.setattr(sbi, "synthesize", watched_synthesize)
  monkeypatch.setattr(sbi, "resize_face", watched_resize)
  batches = pipeline.TrainBatches(
    pipeline.Records(records, "train"), streams=("s",), batch_size=8, image_size=image_size, seed=1
  )
  batch = batches(0)  # in this thread: a sample's calls are contiguous
  assert batch["s"]["image"].shape == (8, image_size, image_size, 3)
  synths = [c for c in calls if c[0] == "synthesize"]
  assert len(synths) == 4 and all(min(h, w) >= image_size for _, h, w in synths), synths
  for i, call in enumerate(calls):
    if call[0] == "synthesize":
      later = calls[i + 1 : i + 4]  # real, fake and mask to the output size
      assert [c[0] for c in later] == ["resize"] * 3, later
      assert all(side >= size for _, side, size in later), f"blended image enlarged: {later}"
