"""DeepFakeDetection (DFD, Google/Jigsaw 2019), shipped inside the FaceForensics++ download.

    <root>/original_sequences/actors/{raw,c23,c40}/videos/<actor>__<scene>.mp4           363 reals
    <root>/manipulated_sequences/DeepFakeDetection/{raw,c23,c40}/videos/<a>_<b>__<scene>__<x>.mp4
    <root>/manipulated_sequences/DeepFakeDetection/masks/videos/...                 (optional)

``root`` is the same FaceForensics++ folder. DFD has no official split: every video goes to
``split`` (default "test", its use as a cross-dataset benchmark).
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
from csdfd_jax.data.layouts.ffpp import masks_dir, normalise_compression

DATASET = "dfd"
DOMAIN = "DeepFakeDetection"


def index(
  root: str, *, compression: str = "c23", split: str = "test", masks: bool = True
) -> LayoutIndex:
  """Indexes DFD's actor reals and DeepFakeDetection fakes at one compression level."""
  top = require_dir(root, "DeepFakeDetection (FaceForensics++) root")
  comp = normalise_compression(compression)
  check_split(split)
  real_dir = require_dir(
    top / "original_sequences" / "actors" / comp / "videos", f"DFD real videos ({comp})"
  )
  fake_dir = require_dir(
    top / "manipulated_sequences" / DOMAIN / comp / "videos", f"DFD fake videos ({comp})"
  )
  records = [
    MediaRecord(f"real/{p.stem}", str(p), REAL, split, DATASET, "real", "video")
    for p in list_videos(real_dir)
  ]
  mask_videos = {p.stem: str(p) for p in list_videos(masks_dir(top, DOMAIN))} if masks else {}
  records += [
    MediaRecord(
      f"{DOMAIN}/{p.stem}",
      str(p),
      FAKE,
      split,
      DATASET,
      DOMAIN,
      "video",
      mask_path=mask_videos.get(p.stem),
    )
    for p in list_videos(fake_dir)
  ]
  return finish(DATASET, records, [], [f"no official split: all videos in {split!r}"])
