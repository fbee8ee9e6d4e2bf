"""Dataset layout indexers on miniature on-disk trees of every official layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csdfd_jax.data import layouts
from csdfd_jax.data.layouts import base, deepfakebench
from csdfd_jax.data.layouts.__main__ import main as cli_main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def touch(root: Path, *names: str) -> None:
  for name in names:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")


def by_id(idx: base.LayoutIndex) -> dict[str, base.MediaRecord]:
  return {r.media_id: r for r in idx.records}


# ---- base + registry ----


def test_record_validation(tmp_path):
  ok = dict(media_id="a", path=str(tmp_path), label=1, split="train", dataset="d")
  base.MediaRecord(**ok, domain="x", kind="video")
  for bad in (
    dict(ok, label=2, domain="x", kind="video"),
    dict(ok, split="dev", domain="x", kind="video"),
    dict(ok, kind="audio", domain="x"),
    dict(ok, path="rel/path", domain="x", kind="video"),
    dict(ok, domain="real", kind="video"),  # label 1 with domain real
  ):
    with pytest.raises(ValueError):
      base.MediaRecord(**bad)
  r = base.MediaRecord(**ok, domain="x", kind="video")
  with pytest.raises(ValueError, match="not unique"):
    base.LayoutIndex("d", [r, r], [])


def test_summary_and_json_round_trip(tmp_path):
  recs = [
    base.MediaRecord("r1", "/r1", 0, "train", "d", "real", "video"),
    base.MediaRecord("f1", "/f1", 1, "train", "d", "A", "video", mask_path="/m1"),
    base.MediaRecord("f2", "/f2", 1, "test", "d", "B", "image"),
  ]
  idx = base.LayoutIndex("d", recs, ["/gone"], ["a note"])
  s = idx.summary()
  assert s["total"] == 3 and s["missing"] == 1 and s["with_mask"] == 1
  assert s["by_split"]["train"] == {"real": 1, "fake": 1}
  assert s["by_split"]["test"] == {"real": 0, "fake": 1}
  assert s["by_domain"]["B"] == {"train": 0, "val": 0, "test": 1}
  assert s["by_kind"] == {"image": 1, "video": 2}
  text = idx.format_summary()
  assert "a note" in text and "/gone" in text
  assert base.LayoutIndex.load_json(idx.save_json(tmp_path / "i.json")) == idx
  assert [r.media_id for r in idx.select(split="train", label=1)] == ["f1"]
  assert [r.media_id for r in idx.select(domain=("A", "B"))] == ["f1", "f2"]


def test_registry():
  assert layouts.get("ffpp").index is not None
  assert layouts.get("Celeb-DF-v2").__name__.endswith(".celebdf")
  with pytest.raises(ValueError, match="valid names:.*ffpp.*wilddeepfake"):
    layouts.get("imagenet")
  for name in layouts.NAMES:
    assert callable(layouts.get(name).index)


@pytest.mark.parametrize("name", layouts.NAMES)
def test_missing_root_raises(tmp_path, name):
  with pytest.raises(FileNotFoundError, match="expected"):
    layouts.index(name, str(tmp_path / "absent"))


# ---- FaceForensics++ and DFD ----

FF_SPLITS = {
  "train": [["000", "001"], ["002", "003"]],
  "val": [["004", "005"]],
  "test": [["006", "007"]],
}


def make_ffpp(root: Path, splits_in: str = "splits") -> None:
  for split, pairs in FF_SPLITS.items():
    (root / splits_in).mkdir(parents=True, exist_ok=True)
    (root / splits_in / f"{split}.json").write_text(json.dumps(pairs))
  reals = [f"{i:03d}" for i in range(7)] + ["999"]  # 007 absent; 999 in no split
  touch(root, *[f"original_sequences/youtube/c23/videos/{v}.mp4" for v in reals])
  touch(root, "original_sequences/youtube/c40/videos/000.mp4")
  df = "manipulated_sequences/Deepfakes/c23/videos"
  touch(root, *[f"{df}/{n}.mp4" for n in ("000_001", "003_002", "004_005", "007_006")])
  touch(root, "manipulated_sequences/Deepfakes/masks/videos/000_001.mp4")
  touch(root, "manipulated_sequences/Face2Face/c23/videos/001_000.mp4")
  touch(root, "manipulated_sequences/FaceShifter/c23/videos/000_001.mp4")
  touch(root, "original_sequences/actors/c23/videos/01__walking.mp4")
  touch(root, "manipulated_sequences/DeepFakeDetection/c23/videos/01_02__walking__ABC.mp4")
  touch(root, "manipulated_sequences/DeepFakeDetection/masks/videos/01_02__walking__ABC.mp4")


def test_ffpp_splits_labels_missing(tmp_path):
  make_ffpp(tmp_path)
  idx = layouts.index("ffpp", str(tmp_path))
  recs = by_id(idx)
  expected = {
    "real/000": (0, "train"),
    "real/001": (0, "train"),
    "real/002": (0, "train"),
    "real/003": (0, "train"),
    "real/004": (0, "val"),
    "real/005": (0, "val"),
    "real/006": (0, "test"),
    "Deepfakes/000_001": (1, "train"),
    "Deepfakes/003_002": (1, "train"),  # pair listed as [002, 003]: reversed order
    "Deepfakes/004_005": (1, "val"),
    "Deepfakes/007_006": (1, "test"),  # reversed order again
    "Face2Face/001_000": (1, "train"),
    "FaceShifter/000_001": (1, "train"),  # all five methods by default (CS-DFD Sec. V-A)
  }
  assert {k: (r.label, r.split) for k, r in recs.items()} == expected
  assert recs["Deepfakes/000_001"].domain == "Deepfakes"
  assert recs["Deepfakes/000_001"].mask_path.endswith("masks/videos/000_001.mp4")
  assert recs["Deepfakes/003_002"].mask_path is None
  assert recs["real/000"].path == str(tmp_path / "original_sequences/youtube/c23/videos/000.mp4")
  # missing: real 007; Deepfakes 8 named - 4 present; Face2Face, FaceShifter 8 named - 1 present.
  assert len(idx.missing) == 1 + 4 + 7 + 7
  assert str(tmp_path / "original_sequences/youtube/c23/videos/007.mp4") in idx.missing
  notes = " ".join(idx.notes)
  assert "FaceSwap" in notes and "NeuralTextures" in notes  # default methods absent on disk
  assert "FaceShifter" not in notes
  assert "999" in notes  # in no split
  four = layouts.index("ffpp", str(tmp_path), manipulations="four")  # the FF++ paper's protocol
  assert {r.domain for r in four.records} == {"real", "Deepfakes", "Face2Face"}
  assert "present but not selected (pass manipulations=...): FaceShifter" in " ".join(four.notes)
  assert len(four.missing) == 1 + 4 + 7


def test_ffpp_options_and_errors(tmp_path):
  make_ffpp(tmp_path, splits_in="elsewhere")
  with pytest.raises(FileNotFoundError, match="train.json"):
    layouts.index("ffpp", str(tmp_path))
  idx = layouts.index(
    "ffpp",
    str(tmp_path),
    splits_dir=str(tmp_path / "elsewhere"),
    manipulations="FaceShifter",  # one name, as the CLI passes it
    masks=False,
  )
  assert {r.domain for r in idx.records} == {"real", "FaceShifter"}
  assert all(r.mask_path is None for r in idx.records)
  with pytest.raises(FileNotFoundError, match="FaceSwap"):
    layouts.index("ffpp", str(tmp_path), splits_dir=str(tmp_path / "elsewhere"),
                  manipulations=["FaceSwap"])  # fmt: skip
  c40 = layouts.index("ffpp", str(tmp_path), compression="c40", manipulations=[],
                      splits_dir=str(tmp_path / "elsewhere"))  # fmt: skip
  assert [r.media_id for r in c40.records] == ["real/000"]
  with pytest.raises(FileNotFoundError, match="raw"):
    layouts.index("ffpp", str(tmp_path), compression="c0", splits_dir=str(tmp_path / "elsewhere"))
  with pytest.raises(ValueError, match="compression"):
    layouts.index("ffpp", str(tmp_path), compression="c99")
  # Splits at the root (SBI / DeepfakeBench placement) are found too, and an id in two
  # splits is an error.
  (tmp_path / "elsewhere").rename(tmp_path / "tmp")
  for f in (tmp_path / "tmp").iterdir():
    f.rename(tmp_path / f.name)
  assert (
    len(layouts.index("ffpp", str(tmp_path)).records) == 13
  )  # 12 + FaceShifter (five by default)
  (tmp_path / "val.json").write_text(json.dumps([["004", "000"]]))
  with pytest.raises(ValueError, match="both"):
    layouts.index("ffpp", str(tmp_path))


def test_dfd(tmp_path):
  make_ffpp(tmp_path)
  idx = layouts.index("dfd", str(tmp_path))
  recs = by_id(idx)
  assert set(recs) == {"real/01__walking", "DeepFakeDetection/01_02__walking__ABC"}
  assert {r.split for r in idx.records} == {"test"}
  assert recs["real/01__walking"].label == 0
  assert recs["DeepFakeDetection/01_02__walking__ABC"].mask_path is not None
  assert {r.split for r in layouts.index("dfd", str(tmp_path), split="train").records} == {"train"}


# ---- Celeb-DF ----


def make_celebdf(root: Path, test_lines: list[str]) -> None:
  touch(root, "Celeb-real/id0_0000.mp4", "Celeb-real/id0_0001.mp4", "YouTube-real/00001.mp4")
  touch(root, "Celeb-synthesis/id0_id1_0000.mp4", "Celeb-synthesis/id0_id1_0001.mp4")
  (root / "List_of_testing_videos.txt").write_text("\n".join(test_lines) + "\n")


def test_celebdf_label_inversion_and_split(tmp_path):
  make_celebdf(
    tmp_path,
    [
      "1 YouTube-real/00001.mp4",
      "1 Celeb-real/id0_0000.mp4",
      "0 Celeb-synthesis/id0_id1_0000.mp4",
      "0 Celeb-synthesis/id9_id9_0009.mp4",  # listed, absent
    ],
  )
  idx = layouts.index("celebdf", str(tmp_path))
  assert idx.dataset == "celebdf_v2"
  got = {k: (r.label, r.split, r.domain) for k, r in by_id(idx).items()}
  assert got == {
    "YouTube-real/00001": (0, "test", "real"),  # Celeb-DF flag 1 = real -> our label 0
    "Celeb-real/id0_0000": (0, "test", "real"),
    "Celeb-real/id0_0001": (0, "train", "real"),
    "Celeb-synthesis/id0_id1_0000": (1, "test", "Celeb-synthesis"),  # flag 0 -> fake
    "Celeb-synthesis/id0_id1_0001": (1, "train", "Celeb-synthesis"),
  }
  assert idx.missing == [str(tmp_path / "Celeb-synthesis/id9_id9_0009.mp4")]
  assert layouts.index("celebdf_v1", str(tmp_path)).dataset == "celebdf_v1"


def test_celebdf_rejects_our_convention(tmp_path):
  # A list written with 1 = fake contradicts the folders: refused, not silently inverted.
  make_celebdf(tmp_path, ["0 YouTube-real/00001.mp4", "1 Celeb-synthesis/id0_id1_0000.mp4"])
  with pytest.raises(ValueError, match="1 = real"):
    layouts.index("celebdf", str(tmp_path))
  (tmp_path / "List_of_testing_videos.txt").unlink()
  with pytest.raises(FileNotFoundError, match="List_of_testing_videos.txt"):
    layouts.index("celebdf", str(tmp_path))


# ---- DFDC and DFDC preview ----


def test_dfdc_parts_and_test_set(tmp_path):
  part = tmp_path / "dfdc_train_part_3"
  meta = {
    "aaa.mp4": {"label": "FAKE", "split": "train", "original": "bbb.mp4"},
    "bbb.mp4": {"label": "REAL", "split": "train", "original": None},
    "ccc.mp4": {"label": "FAKE", "split": "train", "original": "bbb.mp4"},  # absent
  }
  touch(part, "aaa.mp4", "bbb.mp4")
  (part / "metadata.json").write_text(json.dumps(meta))
  touch(tmp_path, "test/videos/t1.mp4", "test/videos/t2.mp4")
  (tmp_path / "test/labels.csv").write_text("filename,label\nt1.mp4,1\nt2.mp4,0\nt3.mp4,1\n")
  idx = layouts.index("dfdc", str(tmp_path))
  got = {k: (r.label, r.split, r.domain) for k, r in by_id(idx).items()}
  assert got == {
    "aaa": (1, "train", "fake"),
    "bbb": (0, "train", "real"),
    "t1": (1, "test", "fake"),  # labels.csv: 1 = fake
    "t2": (0, "test", "real"),
  }
  assert sorted(Path(m).name for m in idx.missing) == ["ccc.mp4", "t3.mp4"]
  assert len(layouts.index("dfdc", str(tmp_path), test=False).records) == 2
  assert len(layouts.index("dfdc", str(part)).records) == 2  # root = one part
  with pytest.raises(FileNotFoundError, match="dfdc_train_part_7"):
    layouts.index("dfdc", str(tmp_path), parts=[7])
  assert len(layouts.index("dfdc", str(tmp_path), parts=3, test=False).records) == 2
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="metadata.json"):
    layouts.index("dfdc", str(empty))


def test_dfdc_preview(tmp_path):
  meta = {
    "original_videos/1/1_A_001.mp4": {"label": "real", "set": "train"},
    "method_A/1/1_A/2_A_001.mp4": {"label": "fake", "set": "train"},
    "method_B/1/1_B/3_B_001.mp4": {"label": "fake", "set": "test"},
    "method_B/1/1_B/4_B_001.mp4": {"label": "fake", "set": "test"},  # absent
  }
  touch(tmp_path, *list(meta)[:3])
  (tmp_path / "dataset.json").write_text(json.dumps(meta))
  idx = layouts.index("dfdc_preview", str(tmp_path))
  got = {k: (r.label, r.split, r.domain) for k, r in by_id(idx).items()}
  assert got == {
    "original_videos/1/1_A_001": (0, "train", "real"),
    "method_A/1/1_A/2_A_001": (1, "train", "method_A"),
    "method_B/1/1_B/3_B_001": (1, "test", "method_B"),
  }
  assert len(idx.missing) == 1
  (tmp_path / "dataset.json").unlink()
  with pytest.raises(FileNotFoundError, match="dataset.json"):
    layouts.index("dfdc_preview", str(tmp_path))


# ---- UADFV, WildDeepfake, generic folder ----


def test_uadfv(tmp_path):
  cv2 = pytest.importorskip("cv2")
  import numpy as np

  touch(tmp_path, "real/0001.mp4", "fake/0000_fake.mp4", "fake/notes.txt")
  (tmp_path / "real").mkdir(exist_ok=True)
  writer = cv2.VideoWriter(
    str(tmp_path / "real/0000.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32)
  )
  for i in range(3):
    writer.write(np.full((32, 32, 3), 40 * i, np.uint8))
  writer.release()
  idx = layouts.index("uadfv", str(tmp_path))
  assert sorted(by_id(idx)) == ["fake/0000_fake", "real/0000", "real/0001"]
  cap = cv2.VideoCapture(by_id(idx)["real/0000"].path)  # the record points at the real file
  assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
  cap.release()
  assert idx.summary()["by_split"]["test"] == {"real": 2, "fake": 1}
  (tmp_path / "fake/0000_fake.mp4").unlink()
  with pytest.raises(FileNotFoundError, match="no video files"):
    layouts.index("uadfv", str(tmp_path))


def test_wilddeepfake_frames(tmp_path):
  top = tmp_path / "deepfake_in_the_wild"
  touch(top, "real_train/0/real/1/0.png", "real_train/0/real/1/1.png", "real_train/0.tar.gz")
  touch(top, "real_train/0/real/2/0.png", "fake_train/3/fake/1/0.png", "fake_train/3.tar.gz")
  touch(top, "fake_test/5.tar.gz")  # not extracted
  touch(top, "real test/7/real/4/0.jpg")  # the README spelling, with a space
  idx = layouts.index("wilddeepfake", str(tmp_path))
  got = {k: (r.label, r.split, r.kind) for k, r in by_id(idx).items()}
  assert got == {
    "real_train/0/real/1": (0, "train", "frames"),
    "real_train/0/real/2": (0, "train", "frames"),
    "fake_train/3/fake/1": (1, "train", "frames"),
    "real test/7/real/4": (0, "test", "frames"),
  }
  assert by_id(idx)["real_train/0/real/1"].path == str(top / "real_train/0/real/1")
  assert idx.missing == [str(top / "fake_test/5.tar.gz")]


def test_folder_layouts(tmp_path):
  flat = tmp_path / "flat"
  touch(flat, "Real/a.png", "Real/b.jpg", "real_notes.txt", "fake/v.mp4", "fake/seq/0.png")
  touch(flat, "fake/readme.txt", "fake/deeper/x/0.png")
  idx = layouts.index("folder", str(flat), fake_domain="gan")
  assert idx.dataset == "flat"
  assert idx.notes == [f"2 entries of {flat / 'fake'} are not media, skipped (e.g. deeper)"]
  got = {k: (r.label, r.split, r.kind, r.domain) for k, r in by_id(idx).items()}
  assert got == {
    "Real/a": (0, "test", "image", "real"),
    "Real/b": (0, "test", "image", "real"),
    "fake/v": (1, "test", "video", "gan"),
    "fake/seq": (1, "test", "frames", "gan"),
  }
  split = tmp_path / "split"
  touch(split, "train/real/a.png", "train/fake/b.png", "val/fake/c.png", "test/real/d.mp4")
  idx = layouts.index("folder", str(split), dataset="mine")
  got = {k: (r.label, r.split) for k, r in by_id(idx).items()}
  assert got == {"train/real/a": (0, "train"), "train/fake/b": (1, "train"),
                 "val/fake/c": (1, "val"), "test/real/d": (0, "test")}  # fmt: skip
  assert idx.dataset == "mine" and len(idx.notes) == 2  # val/ has no real/, test/ no fake/
  with pytest.raises(FileNotFoundError, match="real/ and/or fake/"):
    layouts.index("folder", str(tmp_path))


# ---- DeepfakeBench JSON ----


def test_deepfakebench_native_import(tmp_path):
  rgb = tmp_path / "rgb"
  frames = "FaceForensics++\\original_sequences\\youtube\\c23\\frames"
  fakes = "FaceForensics++/manipulated_sequences/Deepfakes/c23/frames"
  touch(rgb, "FaceForensics++/original_sequences/youtube/c23/frames/000/000.png")
  touch(rgb, f"{fakes}/000_001/000.png", f"{fakes}/000_001/001.png")

  def entry(label, *paths):
    return {"label": label, "frames": list(paths)}

  real = entry("FF-real", f"{frames}\\000\\000.png")
  data = {
    "FaceForensics++": {
      "FF-real": {
        "train": {"c23": {"000": real}, "c40": {}},
        "val": {"c23": {}},
        "test": {"c23": {"001": entry("FF-real", f"{frames}\\001\\000.png")}},
      },
      "FF-DF": {
        "train": {
          "c23": {
            "000_001": entry("FF-DF", f"./{fakes}/000_001/000.png", f"{fakes}/000_001/001.png")
          }
        },  # fmt: skip
        "val": {"c23": {"000_001": entry("FF-DF", f"{fakes}/000_001/000.png")}},  # duplicate
        "test": {"c23": {}},
      },
    }
  }
  path = tmp_path / "json" / "FaceForensics++.json"
  path.parent.mkdir()
  path.write_text(json.dumps(data))
  idx = layouts.index(
    "deepfakebench", str(path.parent), dataset="FaceForensics++", rgb_dir=str(rgb)
  )
  assert idx.dataset == "ffpp"
  got = {k: (r.label, r.split, r.domain, r.kind) for k, r in by_id(idx).items()}
  assert got == {
    "real/000": (0, "train", "real", "frames"),
    "Deepfakes/000_001": (1, "train", "Deepfakes", "frames"),  # kept train over val
  }
  assert by_id(idx)["real/000"].path == str(
    rgb / "FaceForensics++/original_sequences/youtube/c23/frames/000"
  )
  assert idx.missing == [str(rgb / "FaceForensics++/original_sequences/youtube/c23/frames/001")]
  assert any("another split" in n for n in idx.notes)
  with pytest.raises(ValueError, match="c99"):
    layouts.index("deepfakebench", str(path), compression="c99", rgb_dir=str(rgb))
  data["FaceForensics++"]["Mystery"] = {"train": {"c23": {}}}
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="label_map"):
    layouts.index("deepfakebench", str(path), rgb_dir=str(rgb))
  assert layouts.index("deepfakebench", str(path), rgb_dir=str(rgb), label_map={"Mystery": 1})


def test_deepfakebench_dfdc_quirks(tmp_path):
  # DeepfakeBench's DFDC JSON: no compression level, and a "val" node that holds one bare
  # entry instead of a {video: entry} mapping (a bug of its rearrange script).
  touch(tmp_path, "DFDC/test/frames/aaa/0.png", "DFDC/test/frames/bbb/0.png")
  entry = {"label": "DFDC_Fake", "frames": ["DFDC/test/frames/aaa/0.png"]}
  data = {
    "DFDC": {
      "DFDC_Fake": {"train": {}, "val": entry, "test": {"aaa": entry}},
      "DFDC_Real": {
        "train": {},
        "val": {},
        "test": {"bbb": {"label": "DFDC_Real", "frames": ["DFDC/test/frames/bbb/0.png"]}},
      },
    }
  }
  (tmp_path / "DFDC.json").write_text(json.dumps(data))
  idx = layouts.index("deepfakebench", str(tmp_path / "DFDC.json"))
  got = {k: (r.label, r.split, r.dataset) for k, r in by_id(idx).items()}
  assert got == {"fake/aaa": (1, "test", "dfdc"), "real/bbb": (0, "test", "dfdc")}
  assert any("bare entry" in n for n in idx.notes)


def test_deepfakebench_round_trip(tmp_path):
  data = tmp_path / "data"
  touch(data, "ff/real/000/000.png", "ff/real/000/001.png", "ff/df/000_001/000.png")
  touch(data, "ff/masks/000_001/000.png", "ff/real/002/000.png")
  recs = [
    base.MediaRecord("real/000", str(data / "ff/real/000"), 0, "train", "ffpp", "real", "frames"),
    base.MediaRecord("real/002", str(data / "ff/real/002"), 0, "test", "ffpp", "real", "frames"),
    base.MediaRecord(
      "Deepfakes/000_001",
      str(data / "ff/df/000_001"),
      1,
      "val",
      "ffpp",
      "Deepfakes",
      "frames",
      mask_path=str(data / "ff/masks/000_001"),
    ),  # fmt: skip
  ]
  original = base.finish("ffpp", recs, [])
  out = deepfakebench.export(original, tmp_path / "out" / "ff.json")
  raw = json.loads(out.read_text())
  node = raw["FaceForensics++"]["FF-DF"]["val"]["c23"]["000_001"]  # DeepfakeBench's structure
  assert node["label"] == "FF-DF" and node["frames"] == [str(data / "ff/df/000_001/000.png")]
  assert node["masks"] == [str(data / "ff/masks/000_001/000.png")]
  assert raw["FaceForensics++"]["FF-real"]["val"] == {"c23": {}}
  # Absolute paths outside the JSON's folder: the data root must be named (or opted into).
  assert layouts.index("deepfakebench", str(out)).records == []
  back = layouts.index("deepfakebench", str(out), rgb_dir=str(data))
  assert back.records == original.records and back.missing == []

  # Generic dataset (no compression level), images and videos given their frames.
  touch(data, "g/fake/7.png", "g/real/v.mp4", "g/crops/v/0.png", "g/crops/v/1.png")
  recs = [
    base.MediaRecord("fake/7", str(data / "g/fake/7.png"), 1, "test", "mine", "gan", "image"),
    base.MediaRecord("real/v", str(data / "g/real/v.mp4"), 0, "test", "mine", "real", "video"),
  ]
  original = base.finish("mine", recs, [])
  with pytest.raises(ValueError, match="frames"):
    deepfakebench.export(original, tmp_path / "g.json")
  crops = {"real/v": [str(data / "g/crops/v/0.png"), str(data / "g/crops/v/1.png")]}
  out = deepfakebench.export(original, tmp_path / "g.json", frames=crops, relative_to=str(data))
  raw = json.loads(out.read_text())
  assert raw["mine"]["mine_real"]["test"]["v"]["frames"] == ["g/crops/v/0.png", "g/crops/v/1.png"]
  assert set(raw["mine"]) == {"mine_real", "mine_fake_gan"}
  assert layouts.index("deepfakebench", str(out), rgb_dir=str(data)).records == original.records
  touch(data, "g/fake/x.png")
  bad = base.MediaRecord("fake/x", str(data / "g/fake/x.png"), 1, "test", "mine", "gan", "image")
  with pytest.raises(ValueError, match="int"):
    deepfakebench.export(base.LayoutIndex("mine", [bad], []), tmp_path / "b.json")
  assert deepfakebench.export(
    base.LayoutIndex("mine", [bad], []), tmp_path / "b.json", strict=False
  )


# ---- CLI ----


def test_cli(tmp_path, capsys):
  touch(tmp_path / "d", "real/a.png", "fake/b.png", "fake/c.png")
  out = tmp_path / "index.json"
  assert cli_main(["folder", str(tmp_path / "d"), "--set", "split=train", "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "d: 3 media (3 image), 0 missing" in text
  assert json.loads(out.read_text())["summary"]["by_split"]["train"] == {"real": 1, "fake": 2}
  assert cli_main(["folder", str(tmp_path / "d"), "--json", str(tmp_path / "d" / "x.json")]) == 2
  assert not (tmp_path / "d" / "x.json").exists()
  assert cli_main(["nope", str(tmp_path)]) == 2
  assert "valid names" in capsys.readouterr().err


# ---- the real samples in ../shared/data ----


@pytest.mark.skipif(not (SHARED / "dfdc_sample").is_dir(), reason="../shared/data absent")
def test_real_dfdc_sample():
  idx = layouts.index("dfdc", str(SHARED / "dfdc_sample"))
  assert sorted(by_id(idx)) == ["abofeumbvv", "abqwwspghj"]
  assert all(r.label == 1 and r.split == "train" for r in idx.records)
  assert len(idx.missing) == 3 and idx.summary()["missing"] == 3


@pytest.mark.skipif(not (SHARED / "dfdc_face_crops").is_dir(), reason="../shared/data absent")
def test_real_face_crops_folder():
  root = SHARED / "dfdc_face_crops"
  idx = layouts.index("folder", str(root))
  n_real = len([p for p in (root / "real").iterdir() if p.suffix == ".png"])
  n_fake = len([p for p in (root / "fake").iterdir() if p.suffix == ".png"])
  assert idx.summary()["by_split"]["test"] == {"real": n_real, "fake": n_fake}
  assert {r.kind for r in idx.records} == {"image"} and n_real > 0 and n_fake > 0
  assert "fake/abofeumbvv-008-00" in by_id(idx)
