"""The protocol's open choices (CS-DFD Sec. V-A is silent on them), each a config value:
faces per frame, videos without a face, validation fakes and model selection, training frames,
the FF++ five-method protocol, and the projection phi."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_builder import face_landmarks

from csdfd_jax import train_lib
from csdfd_jax.data import builder, pipeline, store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import effnet  # noqa: E402

SIZE = 32
FRAMES = 6


def _crop(k: int, frame: int, face: int) -> store.FaceCrop:
  image = np.empty((SIZE, SIZE, 3), np.uint8)
  image[...] = (k % 256, face * 100, frame * 20)
  return store.FaceCrop(image, frame_index=frame, face_index=face, landmarks=face_landmarks(SIZE))


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
  """train: 2 real and 3 fake videos (Deepfakes, Face2Face, FaceShifter) of 6 frames, each frame
  with a second face; val: 1 real + 1 fake video; test: the same, plus a real video where no
  frame had a face and an unreadable fake."""
  root = tmp_path_factory.mktemp("protocol")
  writer = store.StoreWriter(root / "store")
  k = 0
  videos = [
    ("train", 0, "real", 2),
    ("train", 1, "Deepfakes", 1),
    ("train", 1, "Face2Face", 1),
    ("train", 1, "FaceShifter", 1),
    ("val", 0, "real", 1),
    ("val", 1, "Deepfakes", 1),
    ("test", 0, "real", 1),
    ("test", 1, "Deepfakes", 1),
  ]
  for split, label, domain, n in videos:
    for m in range(n):
      crops = []
      for f in range(FRAMES):
        crops += [_crop(k, f, 0), _crop(k, f, 1)]
        k += 1
      writer.save_media(dataset="toy", media_id=f"{domain}/{split}{m}", label=label,
                        split=split, domain=domain, crops=crops)  # fmt: skip
  writer.save_media(dataset="toy", media_id="real/dark", label=0, split="test", domain="real",
                    frames_sampled=FRAMES, frames_without_face=FRAMES)  # fmt: skip
  writer.save_media(dataset="toy", media_id="Deepfakes/broken", label=1, split="test",
                    domain="Deepfakes", status=store.UNREADABLE, error="moov atom")  # fmt: skip
  writer.finish()
  return builder.build_records(root / "store", root / "records")


def test_training_reads_the_largest_face_of_train_frames_per_video(records):
  rec = pipeline.Records(records, "train")
  for frames, per_video in ((0, FRAMES), (2, 2), (8, FRAMES)):
    plan = pipeline.TrainBatches(rec, streams=("o", "s"), batch_size=4, image_size=SIZE, seed=0,
                                 frames_per_video=frames)  # fmt: skip
    for pool in ("o_real", "o_fake", "s_real"):
      idx = plan.pools[pool]
      assert (rec.meta["face_index"][idx] == 0).all()
      videos = {v: np.sum(rec.meta["media_id"][idx] == v) for v in set(rec.meta["media_id"][idx])}
      assert set(videos.values()) == {per_video}, (frames, pool, videos)
  chosen = pipeline.uniform_frames(np.array(["a"] * 6), np.arange(6) * 5, 3)
  assert (np.arange(6)[chosen] == [0, 2, 5]).all()  # spread over the video, ends included


def test_eval_scores_every_face_or_the_largest(records):
  every = pipeline.eval_batches(records, "test", batch_size=8, image_size=SIZE)
  largest = pipeline.eval_batches(records, "test", batch_size=8, image_size=SIZE, faces="largest")
  assert len(every.indices) == 2 * len(largest.indices) == 2 * 2 * FRAMES
  with pytest.raises(ValueError, match="faces"):
    pipeline.eval_batches(records, "test", batch_size=8, image_size=SIZE, faces="max")


def test_videos_without_a_face_are_listed_with_their_reason(records):
  faceless = pipeline.faceless_media(records, "test")
  got = sorted(zip(faceless["media_id"], faceless["label"], faceless["reason"], strict=True))
  assert got == [("Deepfakes/broken", 1, "unreadable"), ("real/dark", 0, "no face")]
  assert len(pipeline.faceless_media(records, "train")["media_id"]) == 0
  assert len(pipeline.faceless_media(records, "test", fake_domains="Face2Face")["media_id"]) == 1
  text = builder.summary(records)
  assert "test: 1 media with no record (no face)" in text
  assert "test: 1 media with no record (unreadable)" in text


def test_sbi_validation_fakes_are_fixed_and_labelled(records):
  def items(fakes):
    plan = pipeline.eval_batches(records, "val", batch_size=64, image_size=SIZE, fakes=fakes)
    return plan(0)

  stored, sbi, both = items("stored"), items("sbi"), items("both")
  n = stored["valid"].sum()
  real = stored["label"][stored["valid"]] == 0
  assert sbi["valid"].sum() == 2 * real.sum() and both["valid"].sum() == n + real.sum()
  fakes = sbi["valid"] & (sbi["label"] == 1)
  assert set(sbi["domain"][fakes]) == {"sbi"}
  assert all(m.startswith("sbi/real/") for m in sbi["media_id"][fakes])
  np.testing.assert_array_equal(items("sbi")["image"], sbi["image"])  # the same every time
  assert not np.array_equal(sbi["image"][fakes][0], sbi["image"][~fakes & sbi["valid"]][0])


def test_ffpp_protocol_names_select_the_fakes(records):
  rec = pipeline.Records(records, "train")
  is_fake = rec.meta["label"] == 1

  def fakes(spec):
    return set(rec.meta["domain"][rec.select(fake_domains=spec) & is_fake])

  assert fakes(None) == fakes("") == {"Deepfakes", "Face2Face", "FaceShifter"}
  assert fakes("Deepfakes+Face2Face") == {"Deepfakes", "Face2Face"}
  with pytest.raises(ValueError, match="FaceSwap"):  # "five" needs every method present
    rec.select(fake_domains="five")


def test_default_config_is_the_paper_protocol():
  config = effnet.get_config()
  assert config.data.fake_domains == "five" and config.data.train_frames == 8
  assert config.eval.frames_per_video == 32 and config.eval.faces_per_frame == "all"
  assert config.eval.no_face == "chance" and config.train.select == "last"


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("data.val_split", "test", "test split"),
    ("data.val_fakes", "stylegan", "val_fakes"),
    ("train.select", "best_val", "select"),
    ("eval.no_face", "zero", "no_face"),
    ("reduction", "max", "reduction"),
    ("optim.learning_rate", -1e-3, "gradient ascent"),
    ("train.eval_every", 0, "eval_every"),
    ("train.log_every", 0, "log_every"),
    ("data.image_size", 0, "image_size"),
  ],
)
def test_protocol_values_are_checked_before_training(key, value, match):
  config = effnet.get_config("demo")
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=match):
    train_lib.check_config(config)


def test_default_projection_can_change_the_representation():
  """phi has two layers with a GELU between them: phi followed by the classifier is not affine
  in the features (with one Dense layer it would be a single linear map)."""
  config = effnet.get_config()
  assert len(config.model.projection_dims) >= 2
  from csdfd_jax.models.heads import Projection

  phi = Projection(tuple(config.model.projection_dims))
  f = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
  params = phi.init(jax.random.PRNGKey(1), f)
  out = lambda x: phi.apply(params, x)  # noqa: E731
  a, b = f[0], f[1]
  gap = out(a + b) - out(a) - out(b) + out(jnp.zeros_like(a))
  assert float(jnp.abs(gap).max()) > 1e-3
