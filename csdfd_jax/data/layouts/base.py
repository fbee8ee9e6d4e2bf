"""Records shared by every dataset layout indexer.

An indexer reads a dataset in its official on-disk layout (read-only: it never writes into
the dataset folder) and returns a ``LayoutIndex``: one ``MediaRecord`` per medium (a video,
an image, or a folder of extracted frames) with its label, split and manipulation type.
Everything downstream (face preprocessing, record building, evaluation) starts from here.

Conventions, the same for every dataset:
* ``label``: 0 real, 1 fake (whatever the dataset's own convention is: Celeb-DF's test list
  and DFDC's labels.csv use opposite ones).
* ``split``: one of ``SPLITS``. Datasets without an official split put everything in the split
  given by the indexer's ``split`` option (default "test": they serve cross-dataset evaluation).
* ``domain``: the manipulation type of a fake ("Deepfakes", "method_A", ...; "fake" when the
  dataset does not say), always "real" for reals.
* ``kind``: "video" (a video file), "image" (one image file) or "frames" (a folder of frame
  images of one video, as WildDeepfake and DeepfakeBench ship them; ``path`` is the folder).
* ``media_id``: unique within the dataset and stable across runs: the path of the medium
  relative to the dataset root without extension, or ``<domain>/<name>`` where that is shorter
  and still unique. Video-level scores are aggregated over it.
* Files named by an index (a metadata file, a split list) but absent on disk go to ``missing``
  (absolute expected paths), are reported by ``summary()``, and are never fatal. Other skips
  (files that no split claims, duplicates) are explained in ``notes``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
KINDS = ("video", "image", "frames")
REAL, FAKE = 0, 1
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


@dataclasses.dataclass(frozen=True)
class MediaRecord:
  """One medium of a dataset (contract 2 of the project).

  ``mask_path`` (an extension of the contract, keyword with a default so positional use is
  unchanged) is the absolute path of the dataset's manipulation-mask medium for this fake
  (FaceForensics++ / DFD ``masks/videos``), or None.
  """

  media_id: str
  path: str
  label: int
  split: str
  dataset: str
  domain: str
  kind: str
  mask_path: str | None = None

  def __post_init__(self) -> None:
    if self.label not in (REAL, FAKE):
      raise ValueError(f"{self.media_id}: label must be 0 (real) or 1 (fake), got {self.label!r}")
    if self.split not in SPLITS:
      raise ValueError(f"{self.media_id}: split must be one of {SPLITS}, got {self.split!r}")
    if self.kind not in KINDS:
      raise ValueError(f"{self.media_id}: kind must be one of {KINDS}, got {self.kind!r}")
    if not os.path.isabs(self.path):
      raise ValueError(f"{self.media_id}: path must be absolute, got {self.path!r}")
    if (self.domain == "real") != (self.label == REAL):
      raise ValueError(f"{self.media_id}: domain 'real' iff label 0, got {self.domain!r}")


@dataclasses.dataclass
class LayoutIndex:
  """The result of indexing one dataset: its records, the missing files, and notes.

  ``notes`` (an extension of the contract, defaulted) holds one human-readable line per kind
  of skip or assumption, so that nothing is dropped silently.
  """

  dataset: str
  records: list[MediaRecord]
  missing: list[str]
  notes: list[str] = dataclasses.field(default_factory=list)

  def __post_init__(self) -> None:
    seen: dict[str, MediaRecord] = {}
    for r in self.records:
      if r.media_id in seen:
        raise ValueError(
          f"{self.dataset}: media_id {r.media_id!r} is not unique "
          f"({seen[r.media_id].path} and {r.path})"
        )
      seen[r.media_id] = r

  def select(
    self,
    *,
    split: str | Iterable[str] | None = None,
    label: int | None = None,
    domain: str | Iterable[str] | None = None,
  ) -> list[MediaRecord]:
    """The records matching every given filter (a name or a collection of names)."""

    def as_set(v: str | Iterable[str] | None) -> set[str] | None:
      return None if v is None else ({v} if isinstance(v, str) else set(v))

    splits, domains = as_set(split), as_set(domain)
    return [
      r
      for r in self.records
      if (splits is None or r.split in splits)
      and (label is None or r.label == label)
      and (domains is None or r.domain in domains)
    ]

  def summary(self) -> dict[str, Any]:
    """Counts per split x label, per domain x split and per kind, plus the missing count."""
    by_split = {s: {"real": 0, "fake": 0} for s in SPLITS}
    by_domain: dict[str, dict[str, int]] = collections.defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    by_kind: collections.Counter[str] = collections.Counter()
    for r in self.records:
      by_split[r.split]["fake" if r.label == FAKE else "real"] += 1
      by_domain[r.domain][r.split] += 1
      by_kind[r.kind] += 1
    return {
      "dataset": self.dataset,
      "total": len(self.records),
      "missing": len(self.missing),
      "by_split": by_split,
      "by_domain": {d: by_domain[d] for d in sorted(by_domain, key=lambda d: (d != "real", d))},
      "by_kind": dict(sorted(by_kind.items())),
      "with_mask": sum(r.mask_path is not None for r in self.records),
    }

  def format_summary(self, max_missing: int = 5) -> str:
    """The summary as a plain-text table (what the CLI prints)."""
    s = self.summary()
    kinds = ", ".join(f"{n} {k}" for k, n in s["by_kind"].items()) or "nothing"
    lines = [f"{self.dataset}: {s['total']} media ({kinds}), {s['missing']} missing"]
    cols = list(SPLITS) + ["total"]
    width = max([6] + [len(d) for d in s["by_domain"]])
    head = f"{'':<{width}}" + "".join(f"{c:>8}" for c in cols)
    lines += ["", head]
    for label in ("real", "fake"):
      counts = [s["by_split"][sp][label] for sp in SPLITS]
      lines.append(f"{label:<{width}}" + "".join(f"{n:>8}" for n in counts + [sum(counts)]))
    lines += ["", f"{'domain':<{width}}" + "".join(f"{c:>8}" for c in cols)]
    for domain, per in s["by_domain"].items():
      counts = [per[sp] for sp in SPLITS]
      lines.append(f"{domain:<{width}}" + "".join(f"{n:>8}" for n in counts + [sum(counts)]))
    if s["with_mask"]:
      lines += ["", f"{s['with_mask']} fakes have a mask"]
    if self.notes:
      lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
    if self.missing:
      shown = self.missing[:max_missing]
      more = len(self.missing) - len(shown)
      lines += ["", f"missing ({len(self.missing)}):"] + [f"  {m}" for m in shown]
      if more:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    return {
      "dataset": self.dataset,
      "summary": self.summary(),
      "records": [dataclasses.asdict(r) for r in self.records],
      "missing": list(self.missing),
      "notes": list(self.notes),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> LayoutIndex:
    return cls(
      dataset=d["dataset"],
      records=[MediaRecord(**r) for r in d["records"]],
      missing=list(d.get("missing", [])),
      notes=list(d.get("notes", [])),
    )

  def save_json(self, path: str | os.PathLike[str]) -> Path:
    """Writes the index (records, missing, notes, summary) as JSON; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
    return out

  @classmethod
  def load_json(cls, path: str | os.PathLike[str]) -> LayoutIndex:
    return cls.from_dict(json.loads(Path(path).read_text()))


# ---- helpers for the indexers ----


def require_dir(path: str | os.PathLike[str], what: str) -> Path:
  """``path`` as an absolute Path; FileNotFoundError saying what was expected there if absent."""
  p = Path(os.path.abspath(path))
  if not p.is_dir():
    raise FileNotFoundError(f"{what}: expected a directory at {p}, found nothing there")
  return p


def require_file(path: str | os.PathLike[str], what: str) -> Path:
  p = Path(os.path.abspath(path))
  if not p.is_file():
    raise FileNotFoundError(f"{what}: expected the file {p}, which does not exist")
  return p


def read_json(path: Path, what: str) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{what}: {path} is not valid JSON ({e})") from e


def media_kind(path: Path) -> str | None:
  """ "video" / "image" by extension, "frames" for a folder holding images, else None."""
  if path.is_dir():
    return "frames" if any(is_image(c) for c in path.iterdir()) else None
  ext = path.suffix.lower()
  return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def is_image(path: Path) -> bool:
  return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def is_video(path: Path) -> bool:
  return path.suffix.lower() in VIDEO_EXTS and not path.name.startswith(".")


def list_videos(folder: Path) -> list[Path]:
  """The video files directly inside ``folder`` (sorted; [] if the folder is absent)."""
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir() if p.is_file() and is_video(p))


def list_media(folder: Path) -> list[tuple[Path, str]]:
  """(path, kind) for every medium directly inside ``folder``: video and image files, and
  sub-folders that hold images (one "frames" medium each), sorted by name."""
  out = []
  for p in sorted(folder.iterdir()):
    if p.name.startswith("."):
      continue
    kind = media_kind(p)
    if kind is not None:
      out.append((p, kind))
  return out


def frame_dirs(top: Path) -> list[Path]:
  """Every folder under ``top`` (itself included) that directly contains image files."""
  out = []
  for dirpath, dirnames, filenames in os.walk(top):
    dirnames.sort()
    if any(is_image(Path(f)) for f in filenames):
      out.append(Path(dirpath))
  return sorted(out)


def relative_id(path: Path, root: Path) -> str:
  """``path`` relative to ``root``, POSIX separators, extension of a file dropped."""
  rel = path.relative_to(root)
  if path.suffix and not path.is_dir():
    rel = rel.with_suffix("")
  return rel.as_posix()


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return split


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_name(name: str, what: str) -> str:
  """``name`` if it can be one path component (letters, digits, ``._+-``, not starting with a
  dot: no ``..``, no ``/``, not absolute); ValueError naming it otherwise."""
  if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
    raise ValueError(
      f"{what} {name!r} is not a plain name (letters, digits and ._+- only, no '..'): it "
      "becomes a folder name, and must not lead outside the output folder"
    )
  return name


def finish(
  dataset: str, records: Sequence[MediaRecord], missing: Iterable[str], notes: Iterable[str] = ()
) -> LayoutIndex:
  """A LayoutIndex with records sorted by media id and missing paths sorted (stable output)."""
  return LayoutIndex(
    dataset=dataset,
    records=sorted(records, key=lambda r: r.media_id),
    missing=sorted(set(missing)),
    notes=list(notes),
  )
