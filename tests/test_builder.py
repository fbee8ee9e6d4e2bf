"""Face store → ArrayRecord: real shards written by the TFDS builder (no TensorFlow), read back."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader

from csdfd_jax.data import builder, store


def face_landmarks(size: int) -> np.ndarray:
  """68 points on an ellipse around the crop centre: a stand-in face outline for SBI hulls."""
  t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
  return np.stack([0.5 + 0.25 * np.cos(t), 0.55 + 0.3 * np.sin(t)], 1) * size


def write_store(
  root: Path,
  groups: list[tuple[str, str, int, str, int, int]],
  *,
  size: int = 32,
  solid: bool = True,
  no_landmarks_every: int = 0,
  masks: bool = False,
  seed: int = 0,
) -> dict[int, store.FaceRecord]:
  """Writes a face store with StoreWriter. ``groups``: (dataset, split, label, domain, media,
  frames). Crop ``k`` (running over the store) is solid colour (R, G) = (k % 256, k // 256) when
  ``solid`` (identity survives flips and resizes), a smooth random texture otherwise; every
  ``no_landmarks_every``-th crop has no landmarks. Returns crop number → FaceRecord."""
  rng = np.random.default_rng(seed)
  writer = store.StoreWriter(root)
  out, k = {}, 0
  for dataset, split, label, domain, n_media, n_frames in groups:
    for m in range(n_media):
      crops, ks = [], []
      for f in range(n_frames):
        if solid:
          image = np.empty((size, size, 3), np.uint8)
          image[...] = (k % 256, k // 256, 60 + 120 * label)
        else:
          coarse = rng.integers(0, 256, (4, 4, 3), np.uint8)
          image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        no_lmk = no_landmarks_every and k % no_landmarks_every == no_landmarks_every - 1
        lmk = None if no_lmk else face_landmarks(size) + rng.normal(0, 0.5, (68, 2))
        mask = (rng.random((size, size)) * 255).astype(np.uint8) if masks and f == 0 else None
        crops.append(store.FaceCrop(image, frame_index=5 * f, landmarks=lmk, mask=mask))
        ks.append(k)
        k += 1
      recs = writer.save_media(
        dataset=dataset,
        media_id=f"{domain}/{split}{m:03d}",
        label=label,
        split=split,
        domain=domain,
        crops=crops,
      )
      out.update(zip(ks, recs, strict=True))
  writer.finish()
  return out


GROUPS = [
  ("toy", "train", 0, "real", 3, 2),
  ("toy", "train", 1, "swap", 3, 2),
  ("toy", "test", 0, "real", 2, 3),
  ("toy", "test", 1, "swap", 1, 3),
  ("other", "test", 1, "reenact", 1, 2),
]


def _key(r) -> tuple:
  return (r["dataset"], r["media_id"], int(r["frame_index"]), int(r["face_index"]))


def test_round_trip_fields_equal_the_store(tmp_path):
  written = write_store(
    tmp_path / "st", GROUPS, solid=False, no_landmarks_every=4, masks=True, seed=1
  )
  # An RGBA PNG (4 channels when decoded) must be re-encoded to RGB, not passed through.
  rgba_path = tmp_path / "st" / written[2].path
  cv2.imwrite(str(rgba_path), cv2.cvtColor(cv2.imread(str(rgba_path)), cv2.COLOR_BGR2BGRA))
  out = builder.build_records(tmp_path / "st", tmp_path / "rec", num_shards=2)
  assert out == tmp_path / "rec" / "st" / builder.RECORDS_VERSION

  # Real ArrayRecord files, 2 shards per split, holding every record of the split.
  index = store.read_index(tmp_path / "st")
  for split in ("train", "test"):
    shards = sorted(out.glob(f"st-{split}.array_record-*"))
    assert len(shards) == 2
    total = 0
    for shard in shards:
      reader = ArrayRecordReader(str(shard))
      total += reader.num_records()
      reader.close()
    assert total == sum(r.split == split for r in index)

  by_key = {(r.dataset, r.media_id, r.frame_index, r.face_index): r for r in index}
  assert len(by_key) == len(index) == len(written)
  meta = builder.read_metadata(out)
  seen = set()
  for split in ("train", "test"):
    source = tfds.builder_from_directory(str(out)).as_data_source(split)
    for i in range(len(source)):
      rec = source[i]
      key = (rec["dataset"].decode(), rec["media_id"].decode(), rec["frame_index"], 0)
      want = by_key[key]
      seen.add(key)
      png = cv2.cvtColor(cv2.imread(str(tmp_path / "st" / want.path)), cv2.COLOR_BGR2RGB)
      np.testing.assert_array_equal(rec["image"], png)
      assert rec["has_landmarks"] == (want.landmarks is not None)
      want_lmk = np.zeros((0, 2)) if want.landmarks is None else np.array(want.landmarks)
      np.testing.assert_array_equal(rec["landmarks"], want_lmk.astype(np.float32))
      assert rec["landmarks"].dtype == np.float32
      assert rec["label"] == want.label and rec["face_index"] == want.face_index
      assert (rec["split"].decode(), rec["domain"].decode()) == (want.split, want.domain)
      assert rec["has_mask"] == (want.mask_path is not None)
      if want.mask_path:
        mask = cv2.imread(str(tmp_path / "st" / want.mask_path), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(rec["mask"][..., 0], mask)
      # metadata.json is aligned with the record order.
      assert meta[split]["label"][i] == want.label
      assert meta[split]["has_landmarks"][i] == (want.landmarks is not None)
      assert meta[split]["media_id"][i] == want.media_id
      assert meta[split]["domain"][i] == want.domain
  assert seen == set(by_key)

  text = builder.summary(out)
  assert "train" in text and "reenact" in text
  no_lmk = {s: sum(r.landmarks is None and r.split == s for r in index) for s in ("train", "test")}
  assert any(n > 0 for n in no_lmk.values())
  for split in ("train", "test"):
    real = sum(r.split == split and r.label == 0 for r in index)
    fake = sum(r.split == split and r.label == 1 for r in index)
    assert f"{split:<8}{real:>9}{fake:>9}{no_lmk[split]:>9}" in text


def test_records_are_ordered_by_media_then_frame(tmp_path):
  write_store(tmp_path / "st", GROUPS)
  out = builder.build_records(tmp_path / "st", tmp_path / "rec", name="ordered")
  source = tfds.builder_from_directory(str(out)).as_data_source("test")
  keys = [_key(source[i]) for i in range(len(source))]
  assert keys == sorted(keys)


def test_jpeg_records_and_unreadable_crops(tmp_path):
  written = write_store(tmp_path / "st", GROUPS[:2], solid=False)
  # JPEG records of a grayscale crop stay grey; a truncated file is skipped and counted.
  gray_rec, bad_rec = written[0], written[1]
  gray = cv2.imread(str(tmp_path / "st" / gray_rec.path), cv2.IMREAD_GRAYSCALE)
  cv2.imwrite(str(tmp_path / "st" / gray_rec.path), gray)
  (tmp_path / "st" / bad_rec.path).write_bytes(b"\x89PNG\r\n\x1a\n broken")
  out = builder.build_records(tmp_path / "st", tmp_path / "rec", image_format="jpeg")
  source = tfds.builder_from_directory(str(out)).as_data_source("train")
  assert len(source) == len(written) - 1
  assert json.loads((out / "skipped.json").read_text()) == {"train: unreadable image": 1}
  assert "skipped 1 (train: unreadable image)" in builder.summary(out)
  by_media = {(r.media_id, r.frame_index): r for r in written.values()}
  for i in range(len(source)):
    rec = source[i]
    want = by_media[(rec["media_id"].decode(), rec["frame_index"])]
    png = cv2.cvtColor(cv2.imread(str(tmp_path / "st" / want.path)), cv2.COLOR_BGR2RGB)
    assert rec["image"].shape == png.shape
    err = np.abs(rec["image"].astype(float) - png).mean()
    assert 0 < err < 4  # lossy, but the same picture
    if want is gray_rec:
      spread = np.ptp(rec["image"].astype(int), axis=-1)
      assert spread.max() <= 3  # grey in, grey out: three (near) equal channels


def test_cli_prints_summary(tmp_path, capsys):
  write_store(tmp_path / "my store", GROUPS)
  builder.main(["--store", str(tmp_path / "my store"), "--out", str(tmp_path / "rec")])
  text = capsys.readouterr().out
  assert "my_store" in text and f"{'test':<8}{6:>9}{5:>9}" in text
  assert (tmp_path / "rec" / "my_store" / builder.RECORDS_VERSION / "metadata.json").exists()


def test_empty_store_fails_loudly(tmp_path):
  (tmp_path / "st").mkdir()
  (tmp_path / "st" / "index.jsonl").write_text("")
  with pytest.raises(ValueError, match="no records"):
    builder.build_records(tmp_path / "st", tmp_path / "rec")


def test_stale_build_is_refused_until_overwrite(tmp_path):
  write_store(tmp_path / "st", GROUPS)
  out = builder.build_records(tmp_path / "st", tmp_path / "rec")
  assert builder.build_records(tmp_path / "st", tmp_path / "rec") == out  # same state: reused
  (tmp_path / "st" / "index.jsonl").write_text(
    "".join(line + "\n" for line in (tmp_path / "st" / "index.jsonl").read_text().splitlines()[:3])
  )
  with pytest.raises(ValueError, match="overwrite"):
    builder.build_records(tmp_path / "st", tmp_path / "rec")
  out = builder.build_records(tmp_path / "st", tmp_path / "rec", overwrite=True)
  assert sum(len(c["label"]) for c in builder.read_metadata(out).values()) == 3


def test_a_truncated_png_with_a_valid_header_is_skipped_and_counted(tmp_path):
  """The header check alone passed it, and training crashed at step 1 naming no record."""
  written = write_store(tmp_path / "st", GROUPS[:2], solid=False)
  path = tmp_path / "st" / written[3].path
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # IHDR intact, image data cut
  out = builder.build_records(tmp_path / "st", tmp_path / "rec")
  assert json.loads((out / "skipped.json").read_text()) == {"train: unreadable image": 1}
  assert len(tfds.builder_from_directory(str(out)).as_data_source("train")) == len(written) - 1


def test_a_corrupt_index_line_is_named(tmp_path):
  write_store(tmp_path / "st", GROUPS[:1])
  index = tmp_path / "st" / "index.jsonl"
  lines = index.read_text().splitlines()
  index.write_text("\n".join([lines[0], '{"path": "faces/x.png", "media_id": ', *lines[1:]]) + "\n")
  with pytest.raises(ValueError, match=r"index.jsonl, line 2: .*re-run preprocess"):
    store.read_index(tmp_path / "st")
