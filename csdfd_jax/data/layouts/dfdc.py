"""Deepfake Detection Challenge (Dolhansky et al., 2020): training parts and the test set.

    <root>/dfdc_train_part_N/metadata.json   (or <root>/train/dfdc_train_part_N/, or root is a part)
    <root>/dfdc_train_part_N/*.mp4
    <root>/test/labels.csv                   (or <root>/labels.csv): filename,label with 1 = fake
    <root>/test/**/*.mp4                     the test videos, found by name anywhere under test/

metadata.json maps ``"x.mp4": {"label": "FAKE"|"REAL", "split": "train", "original": ...}``.
Training-part videos keep the metadata's split (always "train" in the release); test-set
videos are "test". DFDC does not name the manipulation: fakes have domain "fake". Entries of
metadata.json or labels.csv whose file is absent are counted as missing (the shared sample
lists 5 videos and ships 2). File names are unique across DFDC, so the media id is the stem.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from csdfd_jax.data.layouts.base import (
  FAKE,
  REAL,
  SPLITS,
  LayoutIndex,
  MediaRecord,
  finish,
  is_video,
  read_json,
  require_dir,
)

DATASET = "dfdc"
PART_PREFIX = "dfdc_train_part_"
METADATA_LABELS = {"REAL": REAL, "FAKE": FAKE}


def find_parts(top: Path) -> list[Path]:
  """The training-part folders: root itself, or its dfdc_train_part_* (maybe under train/)."""
  if (top / "metadata.json").is_file():
    return [top]
  parts = [p for base in (top, top / "train") for p in base.glob(f"{PART_PREFIX}*") if p.is_dir()]
  return sorted(parts, key=lambda p: (len(p.name), p.name))


def _part_records(part: Path) -> tuple[list[MediaRecord], list[str], list[str]]:
  meta_path = part / "metadata.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"DFDC: expected {meta_path} (the part's metadata), not found")
  meta = read_json(meta_path, "DFDC metadata")
  records, missing, odd = [], [], []
  for name, info in sorted(meta.items()):
    label = METADATA_LABELS.get(str(info.get("label", "")).upper())
    if label is None:
      raise ValueError(f"{meta_path}: {name} has label {info.get('label')!r}, not REAL/FAKE")
    split = info.get("split", "train")
    if split not in SPLITS:
      odd.append(f"{name}: split {split!r}")
      split = "train"
    path = part / name
    if not path.is_file():
      missing.append(str(path))
      continue
    domain = "real" if label == REAL else "fake"
    records.append(MediaRecord(Path(name).stem, str(path), label, split, DATASET, domain, "video"))
  return records, missing, odd


def _test_records(labels_csv: Path) -> tuple[list[MediaRecord], list[str]]:
  test_dir = labels_csv.parent
  on_disk = {}
  for dirpath, _, filenames in os.walk(test_dir):
    for f in filenames:
      if is_video(Path(f)):
        on_disk.setdefault(f, Path(dirpath) / f)
  records, missing = [], []
  with labels_csv.open(newline="") as fh:
    reader = csv.DictReader(fh)
    if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
      raise ValueError(f"{labels_csv}: expected a header 'filename,label', got {reader.fieldnames}")
    for row in reader:
      name, flag = row["filename"].strip(), row["label"].strip()
      if flag not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"{labels_csv}: label {flag!r} of {name} is not 0/1 (1 = fake)")
      label = FAKE if flag.startswith("1") else REAL
      path = on_disk.get(name)
      if path is None:
        missing.append(str(test_dir / name))
        continue
      domain = "real" if label == REAL else "fake"
      records.append(
        MediaRecord(Path(name).stem, str(path), label, "test", DATASET, domain, "video")
      )
  return records, missing


def index(
  root: str, *, parts: int | list[int] | tuple[int, ...] | None = None, test: bool = True
) -> LayoutIndex:
  """Indexes DFDC training parts (all, or the numbers in ``parts``) and the test set.

  Args:
    root: the DFDC folder (or one dfdc_train_part_N folder).
    parts: part numbers to include (default: every part found).
    test: include the test set when its labels.csv is present.
  """
  top = require_dir(root, "DFDC root")
  found = find_parts(top)
  if parts is not None:
    wanted = {f"{PART_PREFIX}{n}" for n in ([parts] if isinstance(parts, int) else parts)}
    absent = sorted(wanted - {p.name for p in found})
    if absent:
      raise FileNotFoundError(f"DFDC: requested parts not found under {top}: {absent}")
    found = [p for p in found if p.name in wanted]
  labels_csv = next(
    (c for c in (top / "test" / "labels.csv", top / "labels.csv") if c.is_file()), None
  )
  if not found and labels_csv is None:
    raise FileNotFoundError(
      f"DFDC: expected dfdc_train_part_N/metadata.json (in {top} or {top / 'train'}) "
      f"or the test set's labels.csv (in {top / 'test'}); found neither"
    )
  records, missing, notes, odd = [], [], [], []
  for part in found:
    r, m, o = _part_records(part)
    records += r
    missing += m
    odd += o
  if test and labels_csv is not None:
    r, m = _test_records(labels_csv)
    records += r
    missing += m
  if odd:
    notes.append(f"{len(odd)} metadata splits not in {SPLITS}, used 'train' ({odd[0]}, ...)")
  seen: dict[str, MediaRecord] = {}
  for r in records:
    if r.media_id in seen:
      notes.append(f"duplicate file name {r.media_id}: kept {seen[r.media_id].path}, not {r.path}")
    else:
      seen[r.media_id] = r
  return finish(DATASET, list(seen.values()), missing, notes)
