"""UADFV (Li, Chang & Lyu, "In Ictu Oculi", WIFS 2018): 49 real and 49 FakeApp videos.

    <root>/real/NNNN.mp4
    <root>/fake/NNNN_fake.mp4

(each class folder may hold its videos one level down in ``videos/``). UADFV has no official
split: every video goes to ``split`` (default "test", its use as a cross-dataset benchmark).
Fakes have domain "fake" (all made with FakeApp).
"""

from __future__ import annotations

from csdfd_jax.data.layouts.base import (
  FAKE,
  REAL,
  LayoutIndex,
  MediaRecord,
  check_split,
  finish,
  list_videos,
  require_dir,
)

DATASET = "uadfv"


def index(root: str, *, split: str = "test") -> LayoutIndex:
  """Indexes UADFV's real/ and fake/ videos, all in ``split``."""
  top = require_dir(root, "UADFV root")
  check_split(split)
  records = []
  for folder, label in (("real", REAL), ("fake", FAKE)):
    d = require_dir(top / folder, f"UADFV {folder} videos")
    videos = list_videos(d) or list_videos(d / "videos")
    if not videos:
      raise FileNotFoundError(f"UADFV: no video files in {d} (nor in {d / 'videos'})")
    domain = "real" if label == REAL else "fake"
    records += [
      MediaRecord(f"{folder}/{p.stem}", str(p), label, split, DATASET, domain, "video")
      for p in videos
    ]
  return finish(DATASET, records, [], [f"no official split: all videos in {split!r}"])
