"""The FFHQ mini protocol: real faces of ``../shared/data`` → one face store → one records build.

    python -m csdfd_jax.data.mini --root ../shared/data --out /tmp/ffhq_mini [--frames 8]

A tiny stand-in for the paper's protocol (CS-DFD Section IV-A: train on FF++, test on unseen
datasets) built from the four folders of the shared data (its README says which licences apply;
nothing is copied into the repository):

* dataset ``ffhq_mini`` (the source domain): reals = ``ffhq_real_384/*.jpg`` (400/50/50
  train/val/test), original fakes = ``stylegan2_fake_384/*.jpg`` (160/20/20, domain "stylegan2"):
  whole-face synthesis, no blending boundary. The synthetic stream of the train pipeline is SBI of
  the training reals (online, not stored).
* dataset ``ffhq_swap`` (an unseen domain, split "test" only): the next 100 FFHQ identities of the
  split permutation, held out from training and validation, as reals, and 300 classical face swaps
  between them (``csdfd_jax.data.swap``: each held-out identity is the target of 3 swaps from 3
  other held-out identities; piecewise-affine warp over the landmarks' Delaunay triangulation,
  Reinhard colour transfer, feathered landmark-hull alpha blend; JPEG q92 like the reals; domain
  "faceswap"): blending boundaries, no GAN texture. The swaps are made once under
  ``<out>/swaps`` from dlib's landmarks of the raw images, then go through preprocessing like
  every other image.
* dataset ``dfdc_sample`` (an unseen domain, split "test" only, fakes have domain "dfdc"):
  ``dfdc_sample/`` through the DFDC layout (its ``metadata.json`` lists 5 videos of which 2 are
  present: both FAKE, and ``abofeumbvv`` is too dark for dlib, so it gives no face) plus the small
  crops of ``dfdc_face_crops/{real,fake}`` through the folder layout (kind "image"), so that the
  unseen set holds both classes. dlib's detector, which upsamples images below 960 px once,
  finds the face on 20 of the 22 crops with the store's usual geometry (the crops are tight, so
  the 1.8x square around the landmarks is zero-filled beyond the crop's border); the other two
  (``fake/abofeumbvv-008-00``, 62x50 px, and ``fake/aapnvogymq-005-01``) are counted as media
  without a face, like any other skip, rather than cropped by a different rule. Some fake crops
  come from the two sample videos themselves (near-duplicates of their frames); each crop is its
  own media id (``real/<video>-<frame>-<face>``), so video-level scores treat it as a one-frame
  video.

Split assignment (deterministic, independent of the file system's listing order): the file names
of each class are sorted, permuted by ``numpy.random.default_rng([seed, label])``, and the first
n_train of the permutation go to train, the next n_val to val, the next n_test to test; files
beyond these counts are left out and reported; of the FFHQ reals, the first ``SWAP_IDENTITIES``
beyond them are the swap set's identities. ``limit`` keeps, per (source folder, split, label), the
first ``limit`` media by name: a subset of the full protocol with the same assignment (the swap
set then uses max(limit, 4) identities).

Faces go through the preprocessing machinery (``csdfd_jax.data.preprocess``: ``process_media`` in
``in_processes`` workers, dlib detection of the largest face, 68 landmarks, 256 px crops) into
``<out>/store``, and ``csdfd_jax.data.builder.build_records`` writes ``<out>/records/ffhq_mini/``
(splits train/val/test; the test split holds both datasets, selected by the pipeline's
``datasets=`` argument). A second call resumes: committed media are skipped and an up-to-date
records build is reused (a build of an older store state is rewritten). A store built with
other ``frames`` or another split assignment (``seed``) is an error, not a silent mix.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csdfd_jax.data import builder, layouts, preprocess
from csdfd_jax.data import store as store_lib
from csdfd_jax.data.layouts import SPLITS, MediaRecord
from csdfd_jax.data.layouts.base import FAKE, REAL, is_image

SOURCE = "ffhq_mini"
SWAP = "ffhq_swap"
UNSEEN = "dfdc_sample"
RECORDS_NAME = "ffhq_mini"
FAKE_DOMAIN = "stylegan2"
SWAP_DOMAIN = "faceswap"
UNSEEN_DOMAIN = "dfdc"
REAL_FOLDER = "ffhq_real_384"
SWAP_IDENTITIES = 100  # FFHQ identities held out for the swap set
SWAPS_PER_TARGET = 3
# folder -> (label, domain, split sizes train/val/test)
IMAGE_SOURCES = {
  REAL_FOLDER: (REAL, "real", (400, 50, 50)),
  "stylegan2_fake_384": (FAKE, FAKE_DOMAIN, (160, 20, 20)),
}
DFDC_VIDEOS = "dfdc_sample"
DFDC_CROPS = "dfdc_face_crops"
REQUIRED = (*IMAGE_SOURCES, DFDC_VIDEOS, DFDC_CROPS)


def check_root(root: str | Path) -> Path:
  """``root`` as an absolute path; FileNotFoundError naming every expected folder it lacks."""
  top = Path(root).resolve()
  if not top.is_dir():
    raise FileNotFoundError(f"mini protocol root {top} does not exist (--root ../shared/data)")
  missing = [name for name in REQUIRED if not (top / name).is_dir()]
  if missing:
    raise FileNotFoundError(
      f"mini protocol root {top} lacks {', '.join(f'{m}/' for m in missing)} "
      f"(expected {', '.join(f'{m}/' for m in REQUIRED)}): pass the shared data folder "
      "described by its README.md, e.g. --root ../shared/data"
    )
  return top


def assign_splits(
  names: Sequence[str], sizes: Sequence[int], seed: int, label: int
) -> tuple[dict[str, str], list[str]]:
  """{name: split} for the first sum(sizes) names of a seeded permutation of sorted(names), and the
  names left over. ValueError when there are fewer names than sizes ask for."""
  ordered = sorted(names)
  if len(ordered) < sum(sizes):
    raise ValueError(
      f"the split {dict(zip(SPLITS, sizes, strict=True))} needs {sum(sizes)} files, "
      f"found {len(ordered)}"
    )
  perm = np.random.default_rng([seed, label]).permutation(len(ordered))
  bounds = np.cumsum([0, *sizes])
  splits = {
    ordered[i]: split
    for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    for i in perm[lo:hi]
  }
  return splits, [ordered[i] for i in perm[bounds[-1] :]]


def _cap(records: list[MediaRecord], limit: int | None) -> list[MediaRecord]:
  """The first ``limit`` records (by media id) of each (split, label)."""
  if limit is None:
    return records
  groups: dict[tuple[str, int], list[MediaRecord]] = collections.defaultdict(list)
  for r in sorted(records, key=lambda r: r.media_id):
    groups[(r.split, r.label)].append(r)
  return [r for group in groups.values() for r in group[:limit]]


def swap_identities(root: str | Path, *, seed: int = 0, limit: int | None = None) -> list[Path]:
  """The FFHQ images of the swap set's identities: the first ``SWAP_IDENTITIES`` of the split
  permutation beyond the train/val/test reals (never in training or validation)."""
  top = check_root(root)
  files = {p.name: p for p in (top / REAL_FOLDER).iterdir() if p.is_file() and is_image(p)}
  _, unused = assign_splits(list(files), IMAGE_SOURCES[REAL_FOLDER][2], seed, REAL)
  if len(unused) < SWAP_IDENTITIES:
    raise ValueError(
      f"{top / REAL_FOLDER}: the swap set needs {SWAP_IDENTITIES} images beyond the splits, "
      f"found {len(unused)}"
    )
  held = sorted(unused[:SWAP_IDENTITIES])
  if limit is not None:
    held = held[: max(limit, SWAPS_PER_TARGET + 1)]
  return [files[n] for n in held]


def make_swap_set(
  identities: Sequence[Path], out: Path, *, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
  """Writes the swap set's face swaps under ``out`` once (reused when its manifest matches the
  identities and seed) and returns the manifest: {"seed", "identities", "per_target",
  "swaps": [{"path", "target", "source"}], "no_face": [identities dlib found no face on]}."""
  from csdfd_jax.data import swap

  manifest_path = out / "swaps.json"
  key = {"seed": seed, "identities": [p.name for p in identities], "per_target": SWAPS_PER_TARGET}
  if manifest_path.is_file():
    manifest = json.loads(manifest_path.read_text())
    if {k: manifest.get(k) for k in key} == key:
      return manifest
  start = time.perf_counter()
  faces = swap.load_faces(identities)
  found = {name for name, _, _ in faces}
  made = swap.make_swaps(faces, out, seed=seed, per_target=SWAPS_PER_TARGET)
  manifest = {
    **key,
    "swaps": [{k: str(m[k]) for k in ("path", "target", "source")} for m in made],
    "no_face": [p.name for p in identities if p.stem not in found],
  }
  tmp = manifest_path.with_suffix(".tmp")
  tmp.write_text(json.dumps(manifest, indent=1))
  tmp.replace(manifest_path)  # written last: a killed run makes the swaps again
  if progress:
    print(
      f"face swaps: {len(made)} from {len(faces)} held-out identities in "
      f"{time.perf_counter() - start:.0f} s ({out})"
    )
  return manifest


def protocol_records(
  root: str | Path,
  *,
  seed: int = 0,
  limit: int | None = None,
  swaps: Sequence[dict[str, str]] = (),
) -> tuple[list[MediaRecord], dict[str, Any]]:
  """The MediaRecords of the protocol (videos first) and what the indexing left out; the swap
  set's fakes are ``swaps`` (``make_swap_set``'s list; without them the set holds its reals)."""
  top = check_root(root)
  records: list[MediaRecord] = []
  unused: dict[str, list[str]] = {}
  for folder, (label, domain, sizes) in IMAGE_SOURCES.items():
    files = {p.name: p for p in (top / folder).iterdir() if p.is_file() and is_image(p)}
    splits, unused[folder] = assign_splits(list(files), sizes, seed, label)
    group = [
      MediaRecord(Path(n).stem, str(files[n]), label, s, SOURCE, domain, "image")
      for n, s in splits.items()
    ]
    records += _cap(group, limit)
  held = swap_identities(top, seed=seed, limit=limit)
  unused[REAL_FOLDER] = sorted(set(unused[REAL_FOLDER]) - {p.name for p in held})
  swap_set = [MediaRecord(p.stem, str(p), REAL, "test", SWAP, "real", "image") for p in held]
  swap_set += [
    MediaRecord(Path(m["path"]).stem, m["path"], FAKE, "test", SWAP, SWAP_DOMAIN, "image")
    for m in swaps
  ]
  videos = layouts.index("dfdc", str(top / DFDC_VIDEOS))
  crops = layouts.index(
    "folder", str(top / DFDC_CROPS), split="test", dataset=UNSEEN, fake_domain=UNSEEN_DOMAIN
  )
  as_unseen = {"dataset": UNSEEN, "split": "test"}
  records = [
    *_cap(
      [
        dataclasses.replace(r, **as_unseen, domain="real" if r.label == REAL else UNSEEN_DOMAIN)
        for r in videos.records
      ],
      limit,
    ),
    *_cap([r for r in crops.records if r.kind == "image"], limit),
    *_cap(swap_set, limit),
    *records,
  ]
  left_out = {
    "missing_from_dfdc_metadata": list(videos.missing),
    "unused_files": {k: v for k, v in unused.items() if v},
    "layout_notes": list(videos.notes) + list(crops.notes),
  }
  return records, left_out


def _process(
  records: list[MediaRecord], store: Path, frames: int, workers: int, progress: bool
) -> list[dict[str, str]]:
  """Runs preprocess on the records not yet committed; returns the failures."""
  done = {(h["dataset"], h["media_id"]): h for h in store_lib.read_media_headers(store)}
  moved = [
    f"{r.media_id} ({h['split']} -> {r.split})"
    for r in records
    if (h := done.get((r.dataset, r.media_id))) and (h["split"], h["label"]) != (r.split, r.label)
  ]
  if moved:
    raise ValueError(
      f"{store} was built with another split assignment (another --seed?): {len(moved)} media "
      f"would change split, e.g. {moved[0]}. Fix: pass the store's seed, or use a new --out."
    )
  summary = preprocess.run_records(
    records, store, frames=frames, workers=workers, progress=progress, desc="mini protocol faces"
  )
  return summary["last_run"]["failed"]


def _count(
  headers: list[dict[str, Any]], selected: set[tuple[str, str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Media and faces per dataset/split/label, and the media without a face or unreadable."""
  media: dict[str, dict[str, dict[str, int]]] = {}
  faces: dict[str, dict[str, dict[str, int]]] = {}
  no_face, unreadable, frames_without_face = [], [], collections.Counter()
  for h in sorted(headers, key=lambda h: (h["dataset"], SPLITS.index(h["split"]), h["media_id"])):
    if (h["dataset"], h["media_id"]) not in selected:
      continue
    cls = "fake" if h["label"] == FAKE else "real"
    for table, n in ((media, 1), (faces, h.get("faces", 0))):
      cell = table.setdefault(h["dataset"], {}).setdefault(h["split"], {"real": 0, "fake": 0})
      cell[cls] += n
    frames_without_face[h["dataset"]] += h.get("frames_without_face", 0)
    where = f"{h['dataset']}/{h['media_id']}"
    if h["status"] == store_lib.UNREADABLE:
      unreadable.append(f"{where}: {h.get('error')}")
    elif h.get("faces", 0) == 0:
      no_face.append(f"{where}: no face in {h.get('frames_read', 0)} frame(s) read")
  skipped = {
    "media_without_face": no_face,
    "unreadable": unreadable,
    "frames_without_face": dict(frames_without_face),
  }
  return {"media": media, "faces": faces}, skipped


def _records(store: Path, out: Path) -> Path:
  """The records build of the store: reused when it matches the store's index, else (re)written."""
  built = out / RECORDS_NAME / builder.RECORDS_VERSION
  stale = False
  if (built / "metadata.json").is_file():
    meta = json.loads((built / "metadata.json").read_text())
    stale = meta.get("_store", {}).get("index_sha256") != builder.index_fingerprint(store)
  return builder.build_records(store, out, name=RECORDS_NAME, overwrite=stale)


def prepare_ffhq_mini(
  root: str,
  out_dir: str,
  *,
  frames: int = 8,
  workers: int = 2,
  seed: int = 0,
  progress: bool = True,
  limit: int | None = None,
) -> dict[str, Any]:
  """Builds the FFHQ mini protocol's face store and records under ``out_dir`` (module docstring).

  Args:
    root: the shared data folder (ffhq_real_384/, stylegan2_fake_384/, dfdc_sample/,
      dfdc_face_crops/).
    out_dir: where ``swaps/``, ``store/`` and ``records/`` go (created; resumed when they exist).
    frames: frames sampled uniformly per DFDC video (stored in the face store's settings: a
      store built with another value is an error).
    workers: face-detection processes.
    seed: seed of the split permutation.
    progress: show a progress bar and print the summary.
    limit: keep at most this many media per (source folder, split, label) (tests, smoke runs).

  Returns:
    {"records": the records build directory (what the pipeline takes),
     "sets": {"ffhq_mini" | "ffhq_swap" | "dfdc_sample": {"records", "datasets", "splits"}}:
       how to select each set (``eval_iterator(records, split, datasets=datasets)``),
     "summary": {"media"/"faces": {dataset: {split: {"real", "fake"}}}, "skipped": {...},
       "seconds", "store"}}.
  """
  start = time.perf_counter()
  out = Path(out_dir).resolve()
  store = out / "store"
  identities = swap_identities(root, seed=seed, limit=limit)
  swap_set = make_swap_set(identities, out / "swaps", seed=seed, progress=progress)
  records, left_out = protocol_records(root, seed=seed, limit=limit, swaps=swap_set["swaps"])
  left_out["swap_identities_without_face"] = swap_set["no_face"]
  failed = _process(records, store, frames, workers, progress)
  selected = {(r.dataset, r.media_id) for r in records}
  counts, skipped = _count(store_lib.read_media_headers(store), selected)
  summary = {
    **counts,
    "skipped": {**skipped, "failed": failed, **left_out},
    "frames": frames,
    "seed": seed,
    "limit": limit,
    "store": str(store),
  }
  store_lib.StoreWriter(store).finish({"mini_protocol": summary})
  built = _records(store, out / "records")
  summary["seconds"] = round(time.perf_counter() - start, 1)
  result = {
    "records": str(built),
    "sets": {
      SOURCE: {"records": str(built), "datasets": [SOURCE], "splits": list(SPLITS)},
      SWAP: {"records": str(built), "datasets": [SWAP], "splits": ["test"]},
      UNSEEN: {"records": str(built), "datasets": [UNSEEN], "splits": ["test"]},
    },
    "summary": summary,
  }
  if progress:
    print(format_summary(result))
  return result


def format_summary(result: dict[str, Any], max_listed: int = 10) -> str:
  """The table printed at the end: faces (media) per dataset, split and class, then the skips."""
  s = result["summary"]
  lines = [f"{'dataset':<12}{'split':<7}{'real faces (media)':>20}{'fake faces (media)':>20}"]
  for dataset, per_split in s["faces"].items():
    for split in SPLITS:
      if split in per_split:
        f, m = per_split[split], s["media"][dataset][split]
        cells = [f"{f[c]} ({m[c]})" for c in ("real", "fake")]
        lines.append(f"{dataset:<12}{split:<7}{cells[0]:>20}{cells[1]:>20}")
  sk = s["skipped"]
  lines.append(f"frames without a face: {sk['frames_without_face']}")
  lists = [
    ("media without a face", sk["media_without_face"]),
    ("unreadable", sk["unreadable"]),
    ("failed (retried by the next call)", [f"{f['media_id']}: {f['error']}" for f in sk["failed"]]),
    ("listed in DFDC metadata.json but absent", sk["missing_from_dfdc_metadata"]),
    ("swap identities without a face (not swapped)", sk.get("swap_identities_without_face", [])),
    ("files beyond the split sizes", [f"{k}: {len(v)}" for k, v in sk["unused_files"].items()]),
    ("layout notes", sk["layout_notes"]),
  ]
  for title, items in lists:
    if items:
      lines.append(f"{title} ({len(items)}):")
      lines += [f"  {item}" for item in items[:max_listed]]
      if len(items) > max_listed:
        lines.append(f"  ... and {len(items) - max_listed} more")
  lines.append(f"{s.get('seconds', 0):.1f} s; store {s['store']}; records {result['records']}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m csdfd_jax.data.mini",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--root", required=True, help="the shared data folder (e.g. ../shared/data)")
  p.add_argument("--out", required=True, help="output folder (store/ and records/; resumed)")
  p.add_argument("--frames", type=int, default=8, help="frames sampled per DFDC video")
  p.add_argument("--workers", type=int, default=2, help="face-detection processes")
  p.add_argument("--seed", type=int, default=0, help="seed of the split permutation")
  p.add_argument("--limit", type=int, default=None, help="media per source x split x label")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  try:
    result = prepare_ffhq_mini(
      args.root,
      args.out,
      frames=args.frames,
      workers=args.workers,
      seed=args.seed,
      progress=not args.no_progress,
      limit=args.limit,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.no_progress:
    print(format_summary(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
