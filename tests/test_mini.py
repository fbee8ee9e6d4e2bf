"""The FFHQ mini protocol: split assignment, root checks, and a small real run read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from csdfd_jax.data import mini, pipeline
from csdfd_jax.data.store import read_index, read_media_headers

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
  not all((DATA / name).is_dir() for name in mini.REQUIRED), reason=f"{DATA} absent or incomplete"
)
LIMIT, FRAMES = 3, 2


def test_assign_splits_sizes_disjoint_and_order_free() -> None:
  names = [f"img_{i:03d}.jpg" for i in range(50)]
  splits, left = mini.assign_splits(names, (30, 5, 10), seed=0, label=0)
  assert [sum(s == k for s in splits.values()) for k in mini.SPLITS] == [30, 5, 10]
  assert len(left) == 5 and not set(left) & set(splits)
  assert set(splits) | set(left) == set(names)
  again, _ = mini.assign_splits(list(reversed(names)), (30, 5, 10), seed=0, label=0)
  assert again == splits  # the listing order does not matter
  other, _ = mini.assign_splits(names, (30, 5, 10), seed=1, label=0)
  fake, _ = mini.assign_splits(names, (30, 5, 10), seed=0, label=1)
  assert other != splits and fake != splits
  # not simply the sorted order cut in three
  assert [splits.get(n) for n in names[:30]] != ["train"] * 30


def test_assign_splits_too_few_files() -> None:
  with pytest.raises(ValueError, match="needs 45 files, found 3"):
    mini.assign_splits(["a", "b", "c"], (30, 5, 10), seed=0, label=0)


def test_missing_folders_are_named(tmp_path: Path) -> None:
  (tmp_path / "ffhq_real_384").mkdir()
  (tmp_path / "dfdc_sample").mkdir()
  with pytest.raises(FileNotFoundError) as e:
    mini.prepare_ffhq_mini(str(tmp_path), str(tmp_path / "out"), progress=False)
  lacks = str(e.value).split("lacks ")[1].split(" (")[0]
  assert lacks == "stylegan2_fake_384/, dfdc_face_crops/"
  assert mini.main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
  assert not (tmp_path / "out").exists()


@needs_data
def test_protocol_split_sizes_and_determinism() -> None:
  records, left_out = mini.protocol_records(DATA, seed=0)
  again, _ = mini.protocol_records(DATA, seed=0)
  assert records == again
  other, _ = mini.protocol_records(DATA, seed=1)
  assert {r.media_id: r.split for r in other} != {r.media_id: r.split for r in records}
  source = [r for r in records if r.dataset == mini.SOURCE]
  counts = {
    (s, lab): sum(r.split == s and r.label == lab for r in source)
    for s in mini.SPLITS
    for lab in (0, 1)
  }
  assert counts == {
    ("train", 0): 400,
    ("val", 0): 50,
    ("test", 0): 50,
    ("train", 1): 160,
    ("val", 1): 20,
    ("test", 1): 20,
  }
  assert all(r.media_id.startswith("ffhq_") == (r.label == 0) for r in source)
  assert {r.domain for r in source if r.label == 1} == {"stylegan2"}
  unseen = [r for r in records if r.dataset == mini.UNSEEN]
  assert {r.split for r in unseen} == {"test"} and {r.label for r in unseen} == {0, 1}
  assert sum(r.kind == "video" for r in unseen) == len(list(DATA.glob("dfdc_sample/*/*.mp4")))
  assert len(left_out["missing_from_dfdc_metadata"]) == 3  # metadata.json lists 5, 2 shipped
  # The swap set's identities: held out from every source split, test only, reals only until
  # the swaps are passed in.
  swap_set = [r for r in records if r.dataset == mini.SWAP]
  assert len(swap_set) == mini.SWAP_IDENTITIES and {r.split for r in swap_set} == {"test"}
  assert {r.label for r in swap_set} == {0}
  assert not {r.media_id for r in swap_set} & {r.media_id for r in source}
  held = mini.swap_identities(DATA, seed=0)
  assert [p.stem for p in held] == sorted(r.media_id for r in swap_set)
  assert mini.swap_identities(DATA, seed=1) != held
  assert "ffhq_real_384" not in left_out["unused_files"]  # 500 in the splits + 100 held out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
  out = tmp_path_factory.mktemp("mini")
  kw = dict(frames=FRAMES, workers=1, seed=0, progress=False, limit=LIMIT)
  return mini.prepare_ffhq_mini(str(DATA), str(out), **kw), out


@needs_data
def test_small_run_counts_labels_and_splits(built: tuple[dict, Path]) -> None:
  result, out = built
  store = out / "store"
  faces = read_index(store)
  headers = read_media_headers(store)
  full, _ = mini.protocol_records(DATA, seed=0)
  full_split = {(r.dataset, r.media_id): r.split for r in full}
  full_label = {(r.dataset, r.media_id): r.label for r in full}
  for h in headers:  # the subset keeps the full protocol's assignment and labels
    if h["dataset"] == mini.SWAP and h["label"] == 1:
      continue  # the swaps themselves: checked against their manifest below
    assert full_split[(h["dataset"], h["media_id"])] == h["split"]
    assert full_label[(h["dataset"], h["media_id"])] == h["label"]
  splits_of: dict[str, set[str]] = {}
  for f in faces:
    splits_of.setdefault(f.media_id, set()).add(f.split)
    assert (f.domain == "real") == (f.label == 0)
    assert f.landmarks is not None and len(f.landmarks) == 68
  assert all(len(s) == 1 for s in splits_of.values())  # each medium in one split only
  media = result["summary"]["media"]
  per_class = {"real": LIMIT, "fake": LIMIT}
  assert media[mini.SOURCE] == {s: per_class for s in mini.SPLITS}
  assert set(media[mini.UNSEEN]) == {"test"}
  n_videos = len(list(DATA.glob("dfdc_sample/*/*.mp4")))
  assert media[mini.UNSEEN]["test"] == {"real": LIMIT, "fake": LIMIT + min(LIMIT, n_videos)}
  assert media[mini.SWAP] == {"test": per_class}
  face_counts = result["summary"]["faces"]
  assert sum(c for d in face_counts.values() for s in d.values() for c in s.values()) == len(faces)
  # FFHQ and StyleGAN2 images are aligned faces: dlib finds every one
  assert face_counts[mini.SOURCE] == media[mini.SOURCE]
  skipped = result["summary"]["skipped"]
  assert any(m.startswith(f"{mini.UNSEEN}/abofeumbvv:") for m in skipped["media_without_face"])
  assert skipped["unreadable"] == [] and skipped["failed"] == []
  assert result["sets"][mini.UNSEEN]["splits"] == ["test"]
  assert result["sets"][mini.SWAP]["splits"] == ["test"]
  # The swaps: among the held-out identities only, never of an identity with itself, and their
  # faces found again by dlib in preprocessing (they are aligned FFHQ faces).
  manifest = json.loads((out / "swaps" / "swaps.json").read_text())
  held = {p.stem for p in mini.swap_identities(DATA, seed=0, limit=LIMIT)}
  assert len(manifest["swaps"]) == len(held) * mini.SWAPS_PER_TARGET
  assert all(m["target"] in held and m["source"] in held - {m["target"]} for m in manifest["swaps"])
  assert face_counts[mini.SWAP] == media[mini.SWAP]
  swap_faces = [f for f in faces if f.dataset == mini.SWAP and f.label == 1]
  assert {f.domain for f in swap_faces} == {mini.SWAP_DOMAIN}
  assert "real" in mini.format_summary(result)


@needs_data
def test_records_read_back_with_eval_iterator(built: tuple[dict, Path]) -> None:
  result, out = built
  faces = read_index(out / "store")
  for name, info in result["sets"].items():
    for split in info["splits"]:
      expected = sorted(
        (f.media_id, f.frame_index, f.label)
        for f in faces
        if f.dataset == name and f.split == split
      )
      got = []
      it = pipeline.eval_iterator(
        info["records"], split, batch_size=4, image_size=32, datasets=info["datasets"]
      )
      for batch in it:
        v = batch["valid"]
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"][v].std() > 0
        assert set(batch["dataset"][v].tolist()) <= {name}
        ids, frames, labels = batch["media_id"][v], batch["frame_index"][v], batch["label"][v]
        got += [(m, int(f), int(lab)) for m, f, lab in zip(ids, frames, labels, strict=True)]
      assert sorted(got) == expected, (name, split)
  assert len(expected) > 0


@needs_data
def test_second_call_reuses_store_and_records(built: tuple[dict, Path]) -> None:
  result, out = built
  png = sorted((out / "store" / "faces").rglob("*.png"))
  shards = sorted(Path(result["records"]).glob("*.array_record*"))
  stamps = [os.stat(p).st_mtime_ns for p in png + shards]
  again = mini.prepare_ffhq_mini(
    str(DATA), str(out), frames=FRAMES, workers=1, progress=False, limit=LIMIT
  )
  assert [os.stat(p).st_mtime_ns for p in png + shards] == stamps
  assert again["records"] == result["records"]
  for key in ("media", "faces", "skipped"):
    assert again["summary"][key] == result["summary"][key]
  stored = json.loads((out / "store" / "summary.json").read_text())["mini_protocol"]
  assert stored["faces"] == result["summary"]["faces"]
  assert np.isfinite(again["summary"]["seconds"])
  with pytest.raises(ValueError, match="another split assignment"):
    mini.prepare_ffhq_mini(str(DATA), str(out), frames=FRAMES, seed=1, progress=False, limit=LIMIT)
