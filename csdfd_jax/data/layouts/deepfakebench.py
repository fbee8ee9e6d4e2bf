"""Import and export of DeepfakeBench's JSON dataset index (SCLBD/DeepfakeBench), so that its
users can move their preprocessed data over, and back.

DeepfakeBench's ``preprocessing/rearrange.py`` writes one JSON per dataset:

    {"<dataset>": {"<label name>": {"train"|"val"|"test": {"<video>": {
        "label": "<label name>", "frames": ["<path>/000.png", ...], "masks": [...]}}}}}

with one more level, the compression ("c23", ...), between the split and the videos for the
FaceForensics family (``COMPRESSED``). Label names ("FF-DF", "CelebDFv2_real", ...) map to 0/1
through DeepfakeBench's ``label_dict`` (``LABELS`` below, with the domain each one means).
Frame paths in the released JSONs are relative to its ``rgb_dir`` and may use backslashes.
Datasets without a split list every video under train, val and test alike.

Import (``index``) gives one "frames" record per video: ``path`` is the folder of its frames,
the media id ``<domain>/<video>``. A video listed under several splits is kept once, in the
first of test, train, val (that is how DeepfakeBench marks "no official split": its test
copy), and the duplicates are noted. A video whose frame folder is absent is missing.

Export (``export``) writes the same structure. DeepfakeBench loads frames only, so a "video"
record needs its frames given (``frames={media_id: [image paths]}``, e.g. its face crops);
"image" records become one-frame videos. Each entry also carries a ``"csdfd"`` key with the
record's own fields (DeepfakeBench ignores unknown keys), which makes export -> import exact.
DeepfakeBench sorts frames by ``int(<file stem>)``: export refuses other names unless
``strict=False``.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from csdfd_jax.data.layouts.base import (
  FAKE,
  REAL,
  SPLITS,
  LayoutIndex,
  MediaRecord,
  finish,
  is_image,
  read_json,
  require_dir,
  require_file,
)

# DeepfakeBench dataset name -> this project's dataset name (others keep their name).
DATASET_NAMES = {
  "FaceForensics++": "ffpp",
  "FaceShifter": "ffpp",
  "FF-DF": "ffpp",
  "FF-F2F": "ffpp",
  "FF-FS": "ffpp",
  "FF-NT": "ffpp",
  "DeepFakeDetection": "dfd",
  "Celeb-DF-v1": "celebdf_v1",
  "Celeb-DF-v2": "celebdf_v2",
  "DFDCP": "dfdc_preview",
  "DFDC": "dfdc",
  "UADFV": "uadfv",
}
EXPORT_NAMES = {
  "ffpp": "FaceForensics++",
  "dfd": "DeepFakeDetection",
  "celebdf_v1": "Celeb-DF-v1",
  "celebdf_v2": "Celeb-DF-v2",
  "dfdc_preview": "DFDCP",
  "dfdc": "DFDC",
  "uadfv": "UADFV",
}
# Dataset names whose JSON has a compression level between split and videos.
COMPRESSED = frozenset(
  {"FaceForensics++", "DeepFakeDetection", "FaceShifter", "FF-DF", "FF-F2F", "FF-FS", "FF-NT"}
)
# DeepfakeBench label name -> (label, domain).
LABELS = {
  "FF-real": (REAL, "real"),
  "FF-DF": (FAKE, "Deepfakes"),
  "FF-F2F": (FAKE, "Face2Face"),
  "FF-FS": (FAKE, "FaceSwap"),
  "FF-NT": (FAKE, "NeuralTextures"),
  "FF-FH": (FAKE, "FaceShifter"),
  "DFD_real": (REAL, "real"),
  "DFD_fake": (FAKE, "DeepFakeDetection"),
  "CelebDFv1_real": (REAL, "real"),
  "CelebDFv1_fake": (FAKE, "Celeb-synthesis"),
  "CelebDFv2_real": (REAL, "real"),
  "CelebDFv2_fake": (FAKE, "Celeb-synthesis"),
  "DFDCP_Real": (REAL, "real"),
  "DFDCP_FakeA": (FAKE, "method_A"),
  "DFDCP_FakeB": (FAKE, "method_B"),
  "DFDC_Real": (REAL, "real"),
  "DFDC_Fake": (FAKE, "fake"),
  "UADFV_Real": (REAL, "real"),
  "UADFV_Fake": (FAKE, "fake"),
}
# (our dataset, domain) -> DeepfakeBench label name.
EXPORT_LABELS = {
  ("ffpp", "real"): "FF-real",
  ("ffpp", "Deepfakes"): "FF-DF",
  ("ffpp", "Face2Face"): "FF-F2F",
  ("ffpp", "FaceSwap"): "FF-FS",
  ("ffpp", "NeuralTextures"): "FF-NT",
  ("ffpp", "FaceShifter"): "FF-FH",
  ("dfd", "real"): "DFD_real",
  ("dfd", "DeepFakeDetection"): "DFD_fake",
  ("celebdf_v1", "real"): "CelebDFv1_real",
  ("celebdf_v1", "Celeb-synthesis"): "CelebDFv1_fake",
  ("celebdf_v2", "real"): "CelebDFv2_real",
  ("celebdf_v2", "Celeb-synthesis"): "CelebDFv2_fake",
  ("dfdc_preview", "real"): "DFDCP_Real",
  ("dfdc_preview", "method_A"): "DFDCP_FakeA",
  ("dfdc_preview", "method_B"): "DFDCP_FakeB",
  ("dfdc", "real"): "DFDC_Real",
  ("dfdc", "fake"): "DFDC_Fake",
  ("uadfv", "real"): "UADFV_Real",
  ("uadfv", "fake"): "UADFV_Fake",
}
SPLIT_PRIORITY = ("test", "train", "val")
EXTRA_KEY = "csdfd"


def _label_of(name: str, label_map: Mapping[str, int] | None) -> tuple[int, str]:
  """(label, domain) of a DeepfakeBench label name."""
  if label_map and name in label_map:
    label = int(label_map[name])
    return label, "real" if label == REAL else name
  if name in LABELS:
    return LABELS[name]
  low = name.lower()
  if "fake" in low:
    return FAKE, name
  if "real" in low:
    return REAL, "real"
  raise ValueError(
    f"DeepfakeBench label {name!r} is not known and says neither real nor fake; "
    f"pass label_map={{{name!r}: 0 or 1}}"
  )


def _local(p: str, base: Path) -> Path:
  """A JSON path as a local absolute path (backslashes, './' and relative paths handled)."""
  posix = PurePosixPath(p.replace("\\", "/"))
  if posix.is_absolute():
    return Path(os.path.abspath(str(posix)))
  return Path(os.path.abspath(base.joinpath(*[q for q in posix.parts if q != "."])))


def _videos(node: dict, where: str, compression: str, notes: list[str]) -> dict:
  """The {video: entry} mapping under one label/split node (choosing the compression level)."""
  if "frames" in node and not isinstance(node["frames"], dict):
    notes.append(f"{where}: a bare entry instead of a video mapping, ignored")
    return {}
  if all(isinstance(v, dict) and "frames" in v for v in node.values()):
    return node
  if compression not in node:
    raise ValueError(
      f"{where}: compression {compression!r} not in the JSON (has {sorted(node)}); "
      f"pass compression="
    )
  return _videos(node[compression], f"{where}/{compression}", compression, notes)


def index(
  root: str,
  *,
  dataset: str | None = None,
  compression: str = "c23",
  rgb_dir: str | None = None,
  label_map: Mapping[str, int] | None = None,
) -> LayoutIndex:
  """Imports a DeepfakeBench JSON index.

  Args:
    root: the JSON file, or the folder of JSON files (DeepfakeBench's dataset_json_folder)
      together with ``dataset`` naming ``<dataset>.json``.
    dataset: the DeepfakeBench dataset (top-level key) to read; needed when there are several.
    compression: for the FaceForensics family, the compression level to read.
    rgb_dir: base of relative frame paths (DeepfakeBench's rgb_dir; default the JSON's folder).
    label_map: {label name: 0/1} for label names unknown to DeepfakeBench's label_dict.
  """
  src = Path(os.path.abspath(root))
  if src.is_dir():
    if dataset is None:
      raise ValueError(f"{src} is a folder: pass dataset= to read <dataset>.json from it")
    src = src / f"{dataset}.json"
  data = read_json(require_file(src, "DeepfakeBench JSON index"), "DeepfakeBench JSON index")
  if dataset is None:
    if len(data) != 1:
      raise ValueError(f"{src} holds datasets {sorted(data)}: pass dataset= to choose one")
    dataset = next(iter(data))
  if dataset not in data:
    raise ValueError(f"{src} has no dataset {dataset!r} (has {sorted(data)})")
  base = require_dir(rgb_dir, "DeepfakeBench rgb_dir") if rgb_dir else src.parent
  ours = DATASET_NAMES.get(dataset, dataset)
  chosen: dict[tuple[str, str], MediaRecord] = {}
  order = {s: i for i, s in enumerate(SPLIT_PRIORITY)}
  missing, notes = [], []
  duplicates = unlisted = 0
  for label_name, by_split in data[dataset].items():
    label, domain = _label_of(label_name, label_map)
    for split in sorted(by_split, key=lambda s: order.get(s, len(order))):
      if split not in SPLITS:
        notes.append(f"{label_name}: split {split!r} ignored")
        continue
      where = f"{dataset}/{label_name}/{split}"
      for video, entry in _videos(by_split[split], where, compression, notes).items():
        extra = entry.get(EXTRA_KEY)
        if extra:
          rec = MediaRecord(
            extra["media_id"],
            extra["path"],
            label,
            split,
            extra["dataset"],
            extra["domain"],
            extra["kind"],
            mask_path=extra.get("mask_path"),
          )
        else:
          frames = [_local(f, base) for f in entry.get("frames") or []]
          if not frames:
            unlisted += 1
            continue
          folder = Path(os.path.commonpath([f.parent for f in frames]))
          masks = [_local(m, base) for m in entry.get("masks") or []]
          mask = str(Path(os.path.commonpath([m.parent for m in masks]))) if masks else None
          rec = MediaRecord(
            f"{domain}/{video}", str(folder), label, split, ours, domain, "frames", mask_path=mask
          )
        key = (rec.dataset, rec.media_id)
        if key in chosen:
          duplicates += 1
          continue
        if not os.path.exists(rec.path):
          missing.append(rec.path)
        chosen[key] = rec
  if duplicates:
    notes.append(
      f"{duplicates} listings of a video already listed in another split skipped "
      f"(kept the first of {', '.join(SPLIT_PRIORITY)})"
    )
  if unlisted:
    notes.append(f"{unlisted} videos with no frames listed, skipped")
  missing_set = set(missing)
  records = [r for r in chosen.values() if r.path not in missing_set]
  datasets = {r.dataset for r in records}
  name = datasets.pop() if len(datasets) == 1 else ours
  return finish(name, records, missing, notes)


def _frame_list(r: MediaRecord, frames: Mapping[str, Sequence[str]] | None) -> list[str] | None:
  if frames is not None and r.media_id in frames:
    return [os.path.abspath(f) for f in frames[r.media_id]]
  if r.kind == "frames":
    return sorted(str(p) for p in Path(r.path).iterdir() if is_image(p))
  if r.kind == "image":
    return [r.path]
  return None


def export(
  index: LayoutIndex,
  out: str | os.PathLike[str],
  *,
  name: str | None = None,
  compression: str = "c23",
  frames: Mapping[str, Sequence[str]] | None = None,
  relative_to: str | None = None,
  strict: bool = True,
) -> Path:
  """Writes ``index`` as a DeepfakeBench JSON file; returns its path.

  Args:
    index: the records to export.
    out: the JSON file to write (never inside a dataset folder: pick it yourself).
    name: the DeepfakeBench dataset name (default: its name for a known dataset, else ours).
    compression: the compression level written for the FaceForensics family.
    frames: {media_id: image paths} for records whose frames are not their path (videos).
    relative_to: write paths relative to this folder (DeepfakeBench's rgb_dir), "/"-separated;
      default absolute paths.
    strict: refuse frame names that DeepfakeBench cannot sort (stems must be integers).
  """
  dfb = name or EXPORT_NAMES.get(index.dataset, index.dataset)
  tree: dict[str, dict[str, dict]] = {}
  no_frames, bad_names = [], []

  def write_path(p: str) -> str:
    return Path(os.path.relpath(p, relative_to)).as_posix() if relative_to else p

  groups: dict[tuple[str, str], list[MediaRecord]] = {}
  for r in index.records:
    label_name = EXPORT_LABELS.get((r.dataset, r.domain))
    if label_name is None:
      label_name = f"{dfb}_real" if r.label == REAL else f"{dfb}_fake"
      if r.label == FAKE and r.domain != "fake":
        label_name += f"_{r.domain}"
    groups.setdefault((label_name, r.split), []).append(r)
  for (label_name, split), recs in sorted(groups.items()):
    empty = (lambda: {compression: {}}) if dfb in COMPRESSED else dict
    splits = tree.setdefault(label_name, {s: empty() for s in SPLITS})
    videos = splits[split][compression] if dfb in COMPRESSED else splits[split]
    short = [r.media_id.rsplit("/", 1)[-1] for r in recs]
    counts = collections.Counter(short)
    for r, key in zip(recs, short, strict=True):
      image_paths = _frame_list(r, frames)
      if not image_paths:
        no_frames.append(r.media_id)
        continue
      bad_names += [p for p in image_paths if not Path(p).stem.isdigit()]
      entry = {"label": label_name, "frames": [write_path(p) for p in image_paths]}
      if r.mask_path and os.path.isdir(r.mask_path):
        masks = sorted(str(p) for p in Path(r.mask_path).iterdir() if is_image(p))
        entry["masks"] = [write_path(p) for p in masks]
      entry[EXTRA_KEY] = {
        "media_id": r.media_id,
        "path": r.path,
        "dataset": r.dataset,
        "domain": r.domain,
        "kind": r.kind,
        "mask_path": r.mask_path,
      }
      videos[key if counts[key] == 1 else r.media_id.replace("/", "__")] = entry
  if no_frames:
    raise ValueError(
      f"{len(no_frames)} records have no frames to export (e.g. {no_frames[0]}): "
      f"DeepfakeBench loads extracted frames only; extract frames (face preprocessing) and "
      f"pass frames={{media_id: [image paths]}}"
    )
  if strict and bad_names:
    raise ValueError(
      f"{len(bad_names)} frame files are not named <integer>.<ext> (e.g. {bad_names[0]}): "
      f"DeepfakeBench sorts frames by int(stem) and would fail; pass strict=False to write anyway"
    )
  path = Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({dfb: tree}, indent=1) + "\n")
  return path
