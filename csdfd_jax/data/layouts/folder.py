"""A generic layout: a folder of real and fake media, for data that has no indexer.

    <root>/real/...   <root>/fake/...                        everything in ``split``
  or
    <root>/{train,val,test}/real/...   <root>/{train,val,test}/fake/...

Inside a class folder, every video file is a "video", every image file an "image", and every
sub-folder that directly holds images a "frames" medium (one video's extracted frames);
anything else (other files, deeper folders) is skipped and counted in the notes. Class and
split folder names are matched case-insensitively. The media id is the path relative to root
without extension; fakes have domain ``fake_domain`` (default "fake"). The dataset name
defaults to the root folder's name.
"""

from __future__ import annotations

from pathlib import Path

from csdfd_jax.data.layouts.base import (
  FAKE,
  REAL,
  SPLITS,
  LayoutIndex,
  MediaRecord,
  check_split,
  finish,
  list_media,
  relative_id,
  require_dir,
)


def _child(folder: Path, name: str) -> Path | None:
  """The sub-folder of ``folder`` called ``name``, ignoring case (None if absent)."""
  if not folder.is_dir():
    return None
  return next((p for p in sorted(folder.iterdir()) if p.is_dir() and p.name.lower() == name), None)


def index(
  root: str, *, split: str = "test", dataset: str | None = None, fake_domain: str = "fake"
) -> LayoutIndex:
  """Indexes real/ and fake/ (optionally under train/, val/, test/) of ``root``.

  Args:
    split: the split of a flat real/ + fake/ layout (ignored when split folders exist).
    dataset: the dataset name (default: the root folder's name).
    fake_domain: the domain given to the fakes.
  """
  top = require_dir(root, "folder-layout root")
  check_split(split)
  name = dataset or top.name
  if fake_domain == "real":
    raise ValueError("fake_domain cannot be 'real'")
  split_dirs = {s: d for s in SPLITS if (d := _child(top, s)) is not None}
  groups = split_dirs if split_dirs else {split: top}
  records, notes = [], []
  for sp, base in groups.items():
    classes = [(c, _child(base, c)) for c in ("real", "fake")]
    if all(d is None for _, d in classes):
      raise FileNotFoundError(f"folder layout: expected real/ and/or fake/ in {base}")
    for cls, d in classes:
      if d is None:
        notes.append(f"no {cls}/ folder in {base}")
        continue
      label = REAL if cls == "real" else FAKE
      domain = "real" if label == REAL else fake_domain
      media = list_media(d)
      if not media:
        notes.append(f"{d} holds no videos, images or frame folders")
      used = {p for p, _ in media}
      other = sorted(p.name for p in d.iterdir() if p not in used and not p.name.startswith("."))
      if other:
        notes.append(f"{len(other)} entries of {d} are not media, skipped (e.g. {other[0]})")
      records += [
        MediaRecord(relative_id(p, top), str(p), label, sp, name, domain, kind) for p, kind in media
      ]
  return finish(name, records, [], notes)
