"""Celeb-DF v1 / v2 (Li et al., CVPR 2020) in the official layout.

    <root>/Celeb-real/*.mp4          real celebrity videos
    <root>/YouTube-real/*.mp4        real YouTube videos
    <root>/Celeb-synthesis/*.mp4     fakes
    <root>/List_of_testing_videos.txt

(the videos may also sit one level down in a ``videos/`` folder, as some re-distributions do).

Each line of List_of_testing_videos.txt is ``<flag> <folder>/<name>.mp4`` where flag **1 means
REAL and 0 means fake**: the opposite of this project's labels (1 = fake). The flag is
converted and cross-checked against the folder; a disagreement is an error (the file was
edited or is from another convention). Listed videos are the test split (518 in v2); every
other video is train. Listed videos absent on disk are counted as missing.
"""

from __future__ import annotations

from pathlib import Path

from csdfd_jax.data.layouts.base import (
  FAKE,
  REAL,
  LayoutIndex,
  MediaRecord,
  finish,
  list_videos,
  require_dir,
  require_file,
)

REAL_FOLDERS = ("Celeb-real", "YouTube-real")
FAKE_FOLDER = "Celeb-synthesis"
TEST_LIST = "List_of_testing_videos.txt"
VERSIONS = ("v1", "v2")


def read_test_list(path: Path) -> dict[str, int]:
  """{"<folder>/<stem>": label in this project's convention (0 real, 1 fake)}."""
  out = {}
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2 or parts[0] not in ("0", "1"):
      raise ValueError(f"{path}:{n}: expected '<0|1> <folder>/<video>.mp4', got {line!r}")
    flag, rel = parts
    label = REAL if flag == "1" else FAKE  # Celeb-DF: 1 = real
    folder = rel.split("/")[0]
    expected = FAKE if folder == FAKE_FOLDER else REAL if folder in REAL_FOLDERS else None
    if expected is None:
      raise ValueError(f"{path}:{n}: unknown folder {folder!r} in {line!r}")
    if expected != label:
      raise ValueError(
        f"{path}:{n}: flag {flag} (Celeb-DF: 1 = real, 0 = fake) contradicts folder {folder!r}"
      )
    out[rel.rsplit(".", 1)[0]] = label
  return out


def index(root: str, *, version: str = "v2") -> LayoutIndex:
  """Indexes Celeb-DF; ``version`` ("v1" or "v2") only names the dataset."""
  if version not in VERSIONS:
    raise ValueError(f"Celeb-DF version must be one of {VERSIONS}, got {version!r}")
  dataset = f"celebdf_{version}"
  top = require_dir(root, f"Celeb-DF-{version} root")
  test = read_test_list(require_file(top / TEST_LIST, f"Celeb-DF-{version} test list"))
  records, notes = [], []
  found: set[str] = set()
  for folder in (*REAL_FOLDERS, FAKE_FOLDER):
    d = top / folder
    if not d.is_dir():
      notes.append(f"no folder {d}")
      continue
    videos = list_videos(d) or list_videos(d / "videos")
    label = FAKE if folder == FAKE_FOLDER else REAL
    domain = FAKE_FOLDER if label == FAKE else "real"
    for p in videos:
      media_id = f"{folder}/{p.stem}"
      found.add(media_id)
      split = "test" if media_id in test else "train"
      records.append(MediaRecord(media_id, str(p), label, split, dataset, domain, "video"))
  if not any((top / f).is_dir() for f in (*REAL_FOLDERS, FAKE_FOLDER)):
    raise FileNotFoundError(
      f"Celeb-DF-{version}: none of {REAL_FOLDERS + (FAKE_FOLDER,)} found in {top}"
    )
  missing = [str(top / f"{m}.mp4") for m in sorted(set(test) - found)]
  return finish(dataset, records, missing, notes)
