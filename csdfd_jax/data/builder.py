"""Face store → ArrayRecord shards, written through a TFDS builder (no TensorFlow needed).

A face store (SPEC contract 3: ``index.jsonl`` + PNG crops) becomes one TFDS dataset directory
``<out>/<name>/1.0.0/`` holding ``<name>-<split>.array_record-NNNNN-of-MMMMM`` shards, the TFDS
``dataset_info.json``/``features.json`` and a ``metadata.json`` with per-record columns (label,
landmark flag, dataset, domain, media id) so the pipeline can plan class-balanced sampling without
reading a single image. ``tfds.builder_from_directory(path).as_data_source(split)`` and grain
read it.

TFDS writes ArrayRecord without TensorFlow as long as images arrive already encoded: its
``tf.train.Example`` serializer is a vendored protobuf, and only the numpy → PNG/JPEG path of
``tfds.features.Image`` calls TensorFlow. The store's PNG bytes therefore go in unchanged (lossless,
no re-encode); ``image_format="jpeg"`` re-encodes them with OpenCV first.

Records are written in a fixed order (split, dataset, media id, frame, face) with TFDS's
shuffling disabled: record ``i`` of a split is entry ``i`` of the metadata columns, and the eval
pipeline reads whole videos contiguously.

CLI: ``python -m csdfd_jax.data.builder --store DIR --out DIR [--name NAME] [--num_shards N]``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import re
import tempfile
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds

from csdfd_jax.data import store as store_lib

RECORDS_VERSION = "1.0.0"
CLASS_NAMES = ("real", "fake")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_METADATA_COLUMNS = (
  "label",
  "has_landmarks",
  "dataset",
  "domain",
  "media_id",
  "frame_index",
  "face_index",
)
# Version of what metadata.json holds: 2 added frame_index/face_index and the faceless media.
METADATA_LAYOUT = 2

log = logging.getLogger(__name__)


def features(with_mask: bool, image_format: str = "png") -> tfds.features.FeaturesDict:
  """The record layout. ``landmarks`` is [N,2] crop-pixel (x, y), [0,2] when ``has_landmarks`` is
  False; ``mask`` (with ``has_mask``) exists only when some store record carries one."""
  spec: dict[str, Any] = {
    "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
    "landmarks": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
    "has_landmarks": np.bool_,
    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
    "media_id": tfds.features.Text(),
    "frame_index": np.int32,
    "face_index": np.int32,
    "dataset": tfds.features.Text(),
    "split": tfds.features.Text(),
    "domain": tfds.features.Text(),
  }
  if with_mask:
    spec["mask"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
    spec["has_mask"] = np.bool_
  return tfds.features.FeaturesDict(spec)


def default_name(store_dir: str | Path) -> str:
  """TFDS-valid dataset name from the store folder name ("FF++ c23" → "ff_c23")."""
  name = re.sub(r"[^0-9a-z]+", "_", Path(store_dir).resolve().name.lower()).strip("_")
  if not name or name[0].isdigit():
    name = f"faces_{name}".rstrip("_")
  return name


def _is_rgb8_png(data: bytes) -> bool:
  """True for an 8-bit truecolour PNG (IHDR bit depth 8, colour type 2): decodes to [H,W,3]."""
  return data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[24] == 8 and data[25] == 2


def _encode_image(path: Path, image_format: str, jpeg_quality: int) -> bytes:
  """Encoded RGB bytes for the record: the store's PNG as is when it already decodes to 3 channels,
  else decoded and re-encoded with OpenCV (BGR in, so TFDS's OpenCV decoder gives back RGB)."""
  data = path.read_bytes()
  try:  # a full decode: a truncated PNG has a valid header and fails only here
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
  except cv2.error:
    bgr = None
  if bgr is None:
    raise ValueError(f"undecodable image {path} (empty, truncated or corrupt)")
  if image_format == "png" and _is_rgb8_png(data):
    return data
  params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpeg" else []
  return cv2.imencode(".jpg" if image_format == "jpeg" else ".png", bgr, params)[1].tobytes()


def _encode_mask(path: Path) -> bytes:
  gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
  if gray is None:
    raise ValueError(f"undecodable mask {path}")
  return cv2.imencode(".png", gray)[1].tobytes()


_EMPTY_MASK = cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()


def _landmarks(value: Any) -> np.ndarray | None:
  if value is None:
    return None
  points = np.asarray(value, np.float32).reshape(-1, 2)
  return points if len(points) else None


class _FaceRecordsBase(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the face store ``self.store_dir`` (records pre-grouped per split)."""

  VERSION = tfds.core.Version(RECORDS_VERSION)
  RELEASE_NOTES = {RECORDS_VERSION: "Face crops + landmarks from a csdfd_jax face store."}

  def __init__(
    self, *, store_dir: Path, by_split: dict, image_format: str, jpeg_quality: int, **kw
  ):
    self.store_dir = store_dir
    self.by_split = by_split
    self.image_format = image_format
    self.jpeg_quality = jpeg_quality
    self.with_mask = any(r.mask_path for recs in by_split.values() for r in recs)
    self.skipped: collections.Counter = collections.Counter()
    super().__init__(**kw)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"Face crops of the csdfd_jax face store {self.store_dir}.",
      features=features(self.with_mask, self.image_format),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    del dl_manager
    self.info.metadata["_store"] = {
      "index_sha256": index_fingerprint(self.store_dir),
      "layout": METADATA_LAYOUT,
    }
    self.info.metadata["_faceless"] = faceless_media(self.store_dir, list(self.by_split))
    return {split: self._generate_examples(split) for split in self.by_split}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    columns: dict[str, list] = {c: [] for c in _METADATA_COLUMNS}
    self.info.metadata[split] = columns
    for rec in self.by_split[split]:
      if not _inside(self.store_dir, rec.path) or (
        rec.mask_path and not _inside(self.store_dir, rec.mask_path)
      ):
        self.skipped[f"{split}: path outside the store (refused)"] += 1
        log.warning("skipping %s: the index names a file outside %s", rec.path, self.store_dir)
        continue
      try:
        image = _encode_image(self.store_dir / rec.path, self.image_format, self.jpeg_quality)
      except (OSError, ValueError) as e:
        self.skipped[f"{split}: unreadable image"] += 1
        log.warning("skipping %s: %s", rec.path, e)
        continue
      points = _landmarks(rec.landmarks)
      example = {
        "image": image,
        "landmarks": np.zeros((0, 2), np.float32) if points is None else points,
        "has_landmarks": points is not None,
        "label": int(rec.label),
        "media_id": rec.media_id,
        "frame_index": int(rec.frame_index),
        "face_index": int(rec.face_index),
        "dataset": rec.dataset,
        "split": split,
        "domain": rec.domain,
      }
      if self.with_mask:
        mask = _EMPTY_MASK
        if rec.mask_path:
          try:
            mask = _encode_mask(self.store_dir / rec.mask_path)
          except (OSError, ValueError) as e:
            self.skipped[f"{split}: unreadable mask (kept without)"] += 1
            log.warning("mask of %s: %s", rec.path, e)
        example["mask"] = mask
        example["has_mask"] = mask is not _EMPTY_MASK
      for c in _METADATA_COLUMNS:
        columns[c].append(example[c])
      yield len(columns["label"]) - 1, example


def _inside(root: Path, relative: str) -> bool:
  """True when ``root / relative`` stays inside ``root`` (no ``..``, no absolute path)."""
  full = os.path.normpath(os.path.join(root, relative))
  return os.path.commonpath([full, os.path.normpath(root)]) == os.path.normpath(root)


# The only feature classes a records build may name in its features.json (TFDS imports the
# module a name points to when it reads a build).
_FEATURE_PACKAGE = "tensorflow_datasets.core.features."


def check_features(build_dir: str | Path) -> None:
  """Refuses a build whose ``features.json`` names a class outside TFDS's feature package:
  reading it would import that module (any installed module, by name)."""
  path = Path(build_dir) / "features.json"
  if not path.is_file():
    return
  names: list[str] = []

  def walk(node: Any) -> None:
    if isinstance(node, dict):
      for k, v in node.items():
        if k == "pythonClassName":
          names.append(v)
        walk(v)
    elif isinstance(node, list):
      for v in node:
        walk(v)

  walk(json.loads(path.read_text()))
  bad = sorted({n for n in names if not (isinstance(n, str) and n.startswith(_FEATURE_PACKAGE))})
  if bad:
    raise ValueError(
      f"{path} names feature classes outside {_FEATURE_PACKAGE}*: {bad}. Reading this build "
      "would import those modules; it was not written by csdfd_jax.data.builder. Rebuild it."
    )


def faceless_media(store_dir: Path, splits: Sequence[str]) -> dict[str, dict[str, list]]:
  """Per split, the columns (media_id, label, dataset, domain, reason) of the store's media
  that gave no face: videos where no frame had a face ("no face") and unreadable media
  ("unreadable"). Evaluation counts them and scores them (SBI's rule: 0.5) or drops them."""
  out = {split: {c: [] for c in ("media_id", "label", "dataset", "domain", "reason")}
         for split in splits}  # fmt: skip
  for h in store_lib.read_media_headers(store_dir):
    if h.get("faces", 0) or h["split"] not in out:
      continue
    cols = out[h["split"]]
    reason = "unreadable" if h["status"] == store_lib.UNREADABLE else "no face"
    for c, v in zip(cols, (h["media_id"], int(h["label"]), h["dataset"], h["domain"], reason),
                    strict=True):  # fmt: skip
      cols[c].append(v)
  return out


def index_fingerprint(store_dir: Path) -> str:
  """sha256 of the store's index.jsonl: tells a build made from this exact store state."""
  return hashlib.sha256((Path(store_dir) / "index.jsonl").read_bytes()).hexdigest()


def _sort_key(rec: Any) -> tuple:
  return (rec.dataset, rec.media_id, int(rec.frame_index), int(rec.face_index), rec.path)


def build_records(
  store_dir: str | Path,
  out_dir: str | Path,
  *,
  name: str | None = None,
  num_shards: int | None = None,
  image_format: str = "png",
  jpeg_quality: int = 95,
  overwrite: bool = False,
) -> Path:
  """Writes the face store as ArrayRecord shards per split and returns the dataset directory
  ``<out_dir>/<name>/1.0.0`` (what ``pipeline.train_iterator``/``eval_iterator`` take).

  ``num_shards`` per split (None: TFDS sizes shards, ≤1 GiB each). An existing build of the same
  store state is reused; one of another state is an error unless ``overwrite``. Unreadable crops
  are skipped and counted in the summary, never silently.
  """
  if image_format not in ("png", "jpeg"):
    raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
  store_dir = Path(store_dir).resolve()
  records = store_lib.read_index(store_dir)
  if not records:
    raise ValueError(f"face store {store_dir} has no records in index.jsonl: run preprocess first")
  by_split: dict[str, list] = collections.defaultdict(list)
  for rec in records:
    by_split[rec.split].append(rec)
  for split in by_split:
    if not re.fullmatch(r"\w+", split):
      raise ValueError(f"split name {split!r} must be alphanumeric/underscore for TFDS")
    by_split[split].sort(key=_sort_key)
  name = name or default_name(store_dir)
  cls = types.new_class(
    "FaceRecords_" + name,
    (_FaceRecordsBase,),
    {"skip_registration": True},
    lambda ns: ns.update(name=name),
  )
  builder = cls(
    store_dir=store_dir,
    by_split=dict(sorted(by_split.items())),
    image_format=image_format,
    jpeg_quality=jpeg_quality,
    data_dir=str(out_dir),
    file_format="array_record",
  )
  mode = tfds.download.GenerateMode
  with tempfile.TemporaryDirectory() as downloads:
    builder.download_and_prepare(
      download_dir=downloads,
      download_config=tfds.download.DownloadConfig(
        num_shards=num_shards,
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
      ),
    )
  out = Path(builder.data_dir).resolve()
  built_from = json.loads((out / "metadata.json").read_text()).get("_store", {})
  if built_from.get("layout") != METADATA_LAYOUT:
    raise ValueError(
      f"{out} was written by an older csdfd_jax (metadata layout {built_from.get('layout', 1)}, "
      f"now {METADATA_LAYOUT}: frame/face columns and faceless media): rebuild it with "
      "overwrite=True (CLI: --overwrite)"
    )
  if built_from.get("index_sha256") != index_fingerprint(store_dir):
    raise ValueError(
      f"{out} was built from another state of {store_dir} (index.jsonl changed): "
      "rebuild with overwrite=True (CLI: --overwrite) or choose another --name/--out"
    )
  if builder.skipped:
    (out / "skipped.json").write_text(json.dumps(dict(builder.skipped), indent=1))
  return out


def read_metadata(records_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
  """Per-split metadata columns of a build, as numpy arrays aligned with record indices."""
  raw = json.loads((Path(records_dir) / "metadata.json").read_text())
  return {
    split: {c: np.asarray(v) for c, v in cols.items()}
    for split, cols in raw.items()
    if not split.startswith("_")
  }


def summary(records_dir: str | Path) -> str:
  """Table of records per split × label and per split × dataset/domain, plus the skips: crops
  without landmarks (unusable for SBI) and unreadable files."""
  meta = read_metadata(records_dir)
  lines = [f"records in {records_dir}", f"{'split':<8}{'real':>9}{'fake':>9}{'no lmk':>9}"]
  for split, cols in meta.items():
    label = cols["label"].astype(int)
    no_lmk = int((~cols["has_landmarks"].astype(bool)).sum())
    lines.append(f"{split:<8}{(label == 0).sum():>9}{(label == 1).sum():>9}{no_lmk:>9}")
  lines.append(f"{'split':<8}{'dataset':<20}{'domain':<20}{'records':>9}")
  for split, cols in meta.items():
    pairs = collections.Counter(zip(cols["dataset"].tolist(), cols["domain"].tolist(), strict=True))
    for (dataset, domain), n in sorted(pairs.items()):
      lines.append(f"{split:<8}{dataset:<20}{domain:<20}{n:>9}")
  raw = json.loads((Path(records_dir) / "metadata.json").read_text())
  for split, cols in raw.get("_faceless", {}).items():
    reasons = collections.Counter(cols["reason"])
    for reason, n in sorted(reasons.items()):
      lines.append(f"{split}: {n} media with no record ({reason}); eval counts and scores them")
  skipped = Path(records_dir) / "skipped.json"
  if skipped.exists():
    for what, n in json.loads(skipped.read_text()).items():
      lines.append(f"skipped {n} ({what})")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--store", required=True, help="face store directory (index.jsonl)")
  parser.add_argument("--out", required=True, help="records root (TFDS data_dir)")
  parser.add_argument("--name", default=None, help="dataset name (default: from --store)")
  parser.add_argument("--num_shards", type=int, default=None, help="shards per split")
  parser.add_argument("--image_format", choices=("png", "jpeg"), default="png")
  parser.add_argument("--jpeg_quality", type=int, default=95)
  parser.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  out = build_records(
    args.store,
    args.out,
    name=args.name,
    num_shards=args.num_shards,
    image_format=args.image_format,
    jpeg_quality=args.jpeg_quality,
    overwrite=args.overwrite,
  )
  print(summary(out))
  print(f"\nrecords: {out}")


if __name__ == "__main__":
  main()
