"""DFDC preview (Dolhansky et al., 2019; "DFDC-P" / "DFDCP" in papers).

    <root>/dataset.json
    <root>/original_videos/<id>/<video>.mp4
    <root>/method_A/<id>/<id>_A/<video>.mp4
    <root>/method_B/<id>/<id>_B/<video>.mp4

dataset.json maps each video's path relative to root to ``{"label": "real"|"fake",
"set": "train"|"test", ...}``. Fakes take the first path component as domain (method_A,
method_B: the preview's two unnamed face-swap methods). Entries whose file is absent are
counted as missing.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from csdfd_jax.data.layouts.base import (
  FAKE,
  REAL,
  SPLITS,
  LayoutIndex,
  MediaRecord,
  finish,
  read_json,
  require_dir,
  require_file,
)

DATASET = "dfdc_preview"
LABELS = {"real": REAL, "fake": FAKE}


def index(root: str) -> LayoutIndex:
  """Indexes the DFDC preview from its dataset.json."""
  top = require_dir(root, "DFDC-preview root")
  meta_path = require_file(top / "dataset.json", "DFDC-preview index")
  meta = read_json(meta_path, "DFDC-preview index")
  records, missing = [], []
  for key, info in sorted(meta.items()):
    label = LABELS.get(str(info.get("label", "")).lower())
    split = info.get("set")
    if label is None or split not in SPLITS:
      raise ValueError(
        f"{meta_path}: entry {key!r} needs label real/fake and set in {SPLITS}, got {info!r}"
      )
    rel = PurePosixPath(key.replace("\\", "/"))
    path = top.joinpath(*rel.parts)
    if not path.is_file():
      missing.append(str(path))
      continue
    domain = "real" if label == REAL else rel.parts[0]
    media_id = str(rel.with_suffix(""))
    records.append(MediaRecord(media_id, str(path), label, split, DATASET, domain, "video"))
  return finish(DATASET, records, missing)
