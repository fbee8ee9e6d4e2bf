"""WildDeepfake (Zi et al., ACM MM 2020): 7,314 face sequences from 707 internet videos.

    <root>/real_train/N.tar.gz   ->  extracted beside it: <root>/real_train/N/.../<seq>/*.png
    <root>/fake_train/...        <root>/real_test/...        <root>/fake_test/...

(folder names with a space, "real train", as in the project's README, are accepted too).
The dataset ships face *frames*, not videos: each medium is a sequence folder, a folder that
directly holds the frame images, with kind "frames" and ``path`` the folder. Its media id is
the folder's path relative to root. Archives are never extracted here (indexing is
read-only): an ``N.tar.gz`` without an ``N`` folder beside it is counted as missing.
Splits are the official train/test; fakes have domain "fake".
"""

from __future__ import annotations

from pathlib import Path

from csdfd_jax.data.layouts.base import (
  FAKE,
  REAL,
  LayoutIndex,
  MediaRecord,
  finish,
  frame_dirs,
  relative_id,
  require_dir,
)

DATASET = "wilddeepfake"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _split_dir(top: Path, cls: str, split: str) -> Path | None:
  for name in (f"{cls}_{split}", f"{cls} {split}"):
    if (top / name).is_dir():
      return top / name
  return None


def _unextracted(folder: Path) -> list[str]:
  out = []
  for p in sorted(folder.iterdir()):
    suffix = next((s for s in ARCHIVE_SUFFIXES if p.name.endswith(s)), None)
    if suffix and p.is_file() and not (folder / p.name[: -len(suffix)]).is_dir():
      out.append(str(p))
  return out


def index(root: str) -> LayoutIndex:
  """Indexes the extracted WildDeepfake sequences (root may also be a folder holding
  deepfake_in_the_wild/)."""
  top = require_dir(root, "WildDeepfake root")
  if (top / "deepfake_in_the_wild").is_dir():
    top = top / "deepfake_in_the_wild"
  records, missing, notes = [], [], []
  found_any = False
  for cls, label in (("real", REAL), ("fake", FAKE)):
    for split in ("train", "test"):
      d = _split_dir(top, cls, split)
      if d is None:
        notes.append(f"no folder {cls}_{split} in {top}")
        continue
      found_any = True
      archives = _unextracted(d)
      missing += archives
      seqs = frame_dirs(d)
      if not seqs and not archives:
        notes.append(f"{d} holds no frame folders")
      domain = "real" if label == REAL else "fake"
      records += [
        MediaRecord(relative_id(s, top), str(s), label, split, DATASET, domain, "frames")
        for s in seqs
      ]
  if not found_any:
    raise FileNotFoundError(
      f"WildDeepfake: expected real_train/, fake_train/, real_test/, fake_test/ in {top}"
    )
  if missing:
    notes.append(f"{len(missing)} archives not extracted (extract each N.tar.gz into N/)")
  return finish(DATASET, records, missing, notes)
