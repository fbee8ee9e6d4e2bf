"""A dataset file must not steer the tool outside the folders the user named: write and read
traversal through dataset names and index paths, and module imports through features.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_builder import GROUPS, write_store
from test_layouts import touch

from csdfd_jax.data import builder, layouts, pipeline, store


@pytest.mark.parametrize("name", ["../../X", "/abs/X", "..", ".hidden", "a/b"])
def test_a_dataset_name_that_is_a_path_is_refused(tmp_path, name):
  writer = store.StoreWriter(tmp_path / "store")
  with pytest.raises(ValueError, match="not a plain name"):
    writer.save_media(dataset=name, media_id="m", label=0, split="train", domain="real")
  (tmp_path / "data" / "real").mkdir(parents=True)
  (tmp_path / "data" / "fake").mkdir()
  with pytest.raises(ValueError, match="not a plain name"):
    layouts.index("folder", str(tmp_path / "data"), dataset=name)
  written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
  assert all(str(p).startswith(("store", "data")) for p in written), written


def test_media_named_outside_the_dataset_root_are_refused_and_counted(tmp_path):
  root = tmp_path / "dfdc"
  part = root / "dfdc_train_part_0"
  touch(part, "aaa.mp4")
  touch(tmp_path, "secret.mp4", "other.mp4")  # they exist: would be ingested as training data
  meta = {
    "aaa.mp4": {"label": "REAL", "split": "train"},
    "../../secret.mp4": {"label": "FAKE", "split": "train"},
    str(tmp_path / "other.mp4"): {"label": "FAKE", "split": "train"},
  }
  (part / "metadata.json").write_text(json.dumps(meta))
  idx = layouts.index("dfdc", str(root), test=False)
  assert [Path(r.path).name for r in idx.records] == ["aaa.mp4"]
  assert any("2 entries name files outside the dataset root" in n for n in idx.notes), idx.notes
  opted = layouts.index("dfdc", str(root), test=False, allow_outside_root=True)
  assert len(opted.records) == 3  # the user's explicit choice


def test_the_builder_refuses_index_paths_outside_the_store(tmp_path):
  write_store(tmp_path / "st", GROUPS)
  (tmp_path / "secret.png").write_bytes((tmp_path / "st" / "index.jsonl").read_bytes()[:0])
  index = tmp_path / "st" / "index.jsonl"
  lines = index.read_text().splitlines()
  evil = json.loads(lines[0]) | {"path": "../secret.png", "media_id": "evil"}
  index.write_text("\n".join([*lines, json.dumps(evil)]) + "\n")
  out = builder.build_records(tmp_path / "st", tmp_path / "rec")
  assert "path outside the store (refused)" in builder.summary(out)
  meta = builder.read_metadata(out)
  assert "evil" not in {m for cols in meta.values() for m in cols["media_id"].tolist()}


def test_a_features_json_naming_another_module_is_refused(tmp_path):
  write_store(tmp_path / "st", GROUPS)
  out = builder.build_records(tmp_path / "st", tmp_path / "rec")
  features = out / "features.json"
  spec = json.loads(features.read_text())
  spec["featuresDict"]["features"]["dataset"]["pythonClassName"] = "os.system"
  features.write_text(json.dumps(spec))
  with pytest.raises(ValueError, match=r"outside tensorflow_datasets.core.features.*os.system"):
    pipeline.Records(out, "train")
