"""The face store: face crops as PNG files plus one JSON line per crop (SPEC contract 3).

Layout of a store directory::

  <store>/index.jsonl            one FaceRecord per line, sorted by (dataset, media_id, frame, face)
  <store>/summary.json           counts over the whole store (+ the last run's own counters)
  <store>/faces/<dataset>/<media>/<frame:06d>_<face>.png     RGB square crops
  <store>/masks/<dataset>/<media>/<frame:06d>_<face>.png     optional manipulation masks (grey)
  <store>/media/<dataset>/<media>.jsonl                      per-media results (see below)

Every media item (video, image or frame folder) is committed on its own: its crops are written
first, then one per-media JSONL file (a header line with the media's counters, then one line per
face) is written under a temporary name and renamed into place. A rename is atomic on POSIX file
systems, so a run killed at any moment leaves each media either complete or absent; `done_media`
lists the complete ones and a resumed run skips them. `StoreWriter.finish` concatenates the per-
media files into `index.jsonl` and writes `summary.json`; both are derived data and can be rebuilt
at any time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from csdfd_jax.data.layouts.base import check_name

INDEX = "index.jsonl"
SUMMARY = "summary.json"
MEDIA_DIR = "media"

# Media status values written in the per-media header.
OK = "ok"
UNREADABLE = "unreadable"

_COUNTERS = ("frames_sampled", "frames_read", "frames_without_face", "faces")


@dataclasses.dataclass(frozen=True)
class FaceRecord:
  """One face crop of the store (one line of `index.jsonl`).

  Attributes:
    path: PNG of the crop, relative to the store (RGB, square).
    media_id: id of the video/image, unique within `dataset`.
    frame_index: index of the frame in the video (0 for a still image).
    face_index: rank of the face within the frame (0 = largest).
    label: 0 real, 1 fake.
    dataset, split, domain: as in the layout's MediaRecord (domain: manipulation type or "real").
    landmarks: [[x, y]] * 68 (or 81) in crop pixel coordinates, or None when unknown.
    mask_path: PNG of the manipulation mask cropped like the face, relative to the store, or None.
  """

  path: str
  media_id: str
  frame_index: int
  face_index: int
  label: int
  dataset: str
  split: str
  domain: str
  landmarks: list[list[float]] | None = None
  mask_path: str | None = None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> FaceRecord:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class FaceCrop:
  """A face to store: the crop, where it came from, its landmarks in crop coordinates, its mask."""

  image: np.ndarray  # uint8 [S, S, 3] RGB
  frame_index: int
  face_index: int = 0
  landmarks: np.ndarray | None = None  # float [N, 2] in crop pixels
  mask: np.ndarray | None = None  # uint8 [S, S]


def media_key(media_id: str) -> str:
  """File-system-safe, collision-free name for a media id (ids may hold '/')."""
  safe = re.sub(r"[^A-Za-z0-9._-]", "_", media_id).lstrip(".")
  if safe != media_id or not safe:
    safe = f"{safe}-{hashlib.sha1(media_id.encode()).hexdigest()[:8]}"
  return safe


def read_index(store: str | os.PathLike) -> list[FaceRecord]:
  """Reads `<store>/index.jsonl` into FaceRecords (raises FileNotFoundError naming the store)."""
  path = Path(store) / INDEX
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} not found: is {store} a face store? "
      "Build one with `python -m csdfd_jax.data.preprocess`."
    )
  out = []
  with path.open() as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(FaceRecord.from_dict(json.loads(line)))
      except (ValueError, TypeError) as e:
        raise ValueError(
          f"{path}, line {number}: not a face record ({e}). The index is derived data: re-run "
          "preprocess on the same --out to rebuild it from the committed media"
        ) from None
  return out


def _media_files(store: Path) -> list[Path]:
  return sorted((store / MEDIA_DIR).glob("*/*.jsonl"))


def _read_media_file(path: Path) -> tuple[dict[str, Any], list[str]]:
  with path.open() as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  return json.loads(lines[0]), lines[1:]


def read_media_headers(store: str | os.PathLike) -> list[dict[str, Any]]:
  """The header of every committed media item (status, counters, error)."""
  return [_read_media_file(p)[0] for p in _media_files(Path(store))]


def done_media(store: str | os.PathLike) -> set[tuple[str, str]]:
  """(dataset, media_id) of every media committed to the store: what a resumed run skips."""
  return {(h["dataset"], h["media_id"]) for h in read_media_headers(store)}


def _write_png(path: Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
  if not cv2.imwrite(str(path), image):
    raise OSError(f"could not write {path}")


def _atomic_write_text(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with tmp.open("w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class StoreWriter:
  """Writes media items into a face store, each one atomically; safe to use from several processes.

  Typical use: `w = StoreWriter(store)`, then `w.save_media(...)` once per media (from any process),
  then `w.finish()` once at the end to (re)build `index.jsonl` and `summary.json`.
  """

  def __init__(self, store: str | os.PathLike):
    self.store = Path(store)
    self.store.mkdir(parents=True, exist_ok=True)

  def save_media(
    self,
    *,
    dataset: str,
    media_id: str,
    label: int,
    split: str,
    domain: str,
    crops: Sequence[FaceCrop] = (),
    status: str = OK,
    error: str | None = None,
    **counters: Any,
  ) -> list[FaceRecord]:
    """Writes the crops of one media, then commits the media (atomic rename of its JSONL file).

    `counters` are stored in the header (e.g. frames_sampled, frames_read, frames_without_face,
    frame_count); `faces` is set here. Returns the FaceRecords written. A `dataset` that is
    not a plain name (``../x``, ``/abs``) is refused: every output path stays in the store.
    """
    check_name(dataset, "dataset name")
    key = media_key(media_id)
    records = []
    for crop in crops:
      name = f"{crop.frame_index:06d}_{crop.face_index}.png"
      rel = Path("faces", dataset, key, name)
      _write_png(self.store / rel, np.asarray(crop.image, np.uint8))
      mask_rel = None
      if crop.mask is not None:
        mask_rel = Path("masks", dataset, key, name)
        _write_png(self.store / mask_rel, np.asarray(crop.mask, np.uint8))
      landmarks = None
      if crop.landmarks is not None:
        landmarks = [
          [round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(crop.landmarks)
        ]
      records.append(
        FaceRecord(
          path=rel.as_posix(),
          media_id=media_id,
          frame_index=int(crop.frame_index),
          face_index=int(crop.face_index),
          label=int(label),
          dataset=dataset,
          split=split,
          domain=domain,
          landmarks=landmarks,
          mask_path=None if mask_rel is None else mask_rel.as_posix(),
        )
      )
    header = {
      "dataset": dataset,
      "media_id": media_id,
      "label": int(label),
      "split": split,
      "domain": domain,
      "status": status,
      "error": error,
      **counters,
      "faces": len(records),
    }
    lines = [json.dumps(header)] + [r.to_json() for r in records]
    _atomic_write_text(self.store / MEDIA_DIR / dataset / f"{key}.jsonl", "\n".join(lines) + "\n")
    return records

  def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rebuilds `index.jsonl` from every committed media, writes and returns `summary.json`."""
    headers, faces = [], []
    for path in _media_files(self.store):
      header, lines = _read_media_file(path)
      headers.append(header)
      faces.extend(lines)
    faces.sort(key=_sort_key)
    _atomic_write_text(self.store / INDEX, "".join(line + "\n" for line in faces))
    summary = {**summarize(headers), **(extra or {})}
    _atomic_write_text(self.store / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _sort_key(line: str) -> tuple[str, str, int, int]:
  r = json.loads(line)
  return r["dataset"], r["media_id"], r["frame_index"], r["face_index"]


def summarize(headers: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Store-wide counts from media headers: media per status, frames, faces, per dataset/split."""
  headers = list(headers)
  summary: dict[str, Any] = {
    "media": len(headers),
    "media_ok": sum(h["status"] == OK for h in headers),
    "media_unreadable": sum(h["status"] == UNREADABLE for h in headers),
    "media_without_face": sum(h["status"] == OK and h.get("faces", 0) == 0 for h in headers),
  }
  for name in _COUNTERS:
    summary[name] = int(sum(h.get(name, 0) for h in headers))
  per_split: dict[str, dict[str, int]] = {}
  for h in headers:
    key = f"{h['dataset']}/{h['split']}"
    per_split.setdefault(key, {"media": 0, "faces": 0})
    per_split[key]["media"] += 1
    per_split[key]["faces"] += h.get("faces", 0)
  summary["per_split"] = dict(sorted(per_split.items()))
  summary["unreadable"] = [
    {"dataset": h["dataset"], "media_id": h["media_id"], "error": h.get("error")}
    for h in headers
    if h["status"] == UNREADABLE
  ]
  return summary
