"""Face store: FaceRecord fields (SPEC contract 3), atomic per-media commits, index and summary."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from csdfd_jax.data import store as store_lib
from csdfd_jax.data.store import FaceCrop, FaceRecord, StoreWriter, done_media, read_index


def _crop(frame: int, value: int, *, mask: bool = False) -> FaceCrop:
  image = np.full((16, 16, 3), value, np.uint8)
  image[0, 0] = (255, 0, 0)  # red top-left: checks RGB order survives the PNG round trip
  landmarks = np.stack([np.arange(68) % 16, np.arange(68) // 5], 1).astype(np.float32) + 0.25
  return FaceCrop(image, frame, 0, landmarks, np.full((16, 16), 255, np.uint8) if mask else None)


def _save(writer: StoreWriter, media_id: str, frames: list[int], **kw) -> list[FaceRecord]:
  return writer.save_media(
    dataset="ds",
    media_id=media_id,
    label=1,
    split="train",
    domain="Deepfakes",
    crops=[_crop(f, 10 * f, mask=kw.pop("mask", False)) for f in frames],
    **kw,
  )


def test_face_record_has_the_contract_fields():
  names = [f.name for f in dataclasses.fields(FaceRecord)]
  assert names == [
    "path",
    "media_id",
    "frame_index",
    "face_index",
    "label",
    "dataset",
    "split",
    "domain",
    "landmarks",
    "mask_path",
  ]


def test_round_trip_index_images_landmarks_and_masks(tmp_path):
  writer = StoreWriter(tmp_path)
  written = _save(writer, "Deepfakes/000_003", [7, 2], mask=True, frames_read=2)
  _save(writer, "a", [0])
  summary = writer.finish()
  records = read_index(tmp_path)
  assert len(records) == 3
  # sorted by (dataset, media_id, frame, face), whatever the writing order
  assert [(r.media_id, r.frame_index) for r in records] == [
    ("Deepfakes/000_003", 2),
    ("Deepfakes/000_003", 7),
    ("a", 0),
  ]
  assert sorted(written, key=lambda r: r.frame_index) == records[:2]
  r = records[1]
  image = cv2.cvtColor(cv2.imread(str(tmp_path / r.path)), cv2.COLOR_BGR2RGB)
  assert image[0, 0].tolist() == [255, 0, 0] and image[5, 5].tolist() == [70, 70, 70]
  assert r.landmarks[3] == [3.25, 0.25] and len(r.landmarks) == 68
  assert r.mask_path is not None and cv2.imread(str(tmp_path / r.mask_path), 0).min() == 255
  assert records[2].mask_path is None
  assert (r.label, r.split, r.domain, r.dataset) == (1, "train", "Deepfakes", "ds")
  assert summary["media"] == 2 and summary["faces"] == 3 and summary["frames_read"] == 2
  assert json.loads((tmp_path / "summary.json").read_text())["faces"] == 3


def test_done_media_counts_only_committed_media(tmp_path):
  writer = StoreWriter(tmp_path)
  _save(writer, "x", [0, 1])
  writer.save_media(
    dataset="ds",
    media_id="broken",
    label=0,
    split="test",
    domain="real",
    status=store_lib.UNREADABLE,
    error="truncated",
  )
  # what a run killed while writing leaves behind: crops and a temporary JSONL, never renamed
  (tmp_path / "media" / "ds" / ".y.jsonl.123.tmp").write_text('{"media_id": "y"}\n')
  (tmp_path / "faces" / "ds" / "y").mkdir(parents=True)
  assert done_media(tmp_path) == {("ds", "x"), ("ds", "broken")}
  summary = writer.finish()
  assert summary["media_unreadable"] == 1 and summary["unreadable"][0]["error"] == "truncated"
  assert {r.media_id for r in read_index(tmp_path)} == {"x"}


def test_rewriting_a_media_replaces_it(tmp_path):
  writer = StoreWriter(tmp_path)
  _save(writer, "x", [0, 1, 2])
  _save(writer, "x", [5])
  writer.finish()
  assert [r.frame_index for r in read_index(tmp_path)] == [5]


def test_media_keys_are_safe_and_distinct():
  ids = ["a/b", "a_b", "..", "x y", "ok-1.2"]
  keys = [store_lib.media_key(i) for i in ids]
  assert len(set(keys)) == len(ids)
  assert store_lib.media_key("ok-1.2") == "ok-1.2"
  assert all("/" not in k and not k.startswith(".") for k in keys)


def test_read_index_of_a_missing_store_says_how_to_build_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="csdfd_jax.data.preprocess"):
    read_index(tmp_path / "nope")
