"""Face preprocessing CLI: a dataset in its official layout -> a face store (crops + landmarks).

    python -m csdfd_jax.data.preprocess --dataset dfdc --root /data/dfdc --out /data/faces \
        [--frames 32] [--size 256] [--workers N] [--predictor PATH] [--limit N] [--splits train val]

For every medium of the layout index (videos, images, frame folders): `--frames` frames sampled
uniformly over the whole video (csdfd_jax.data.video), dlib detection of the largest face, 68 (or
81) landmarks, a square crop with margin resized to `--size` px (csdfd_jax.data.faces), the
dataset's manipulation mask cropped alike where the layout provides one, all committed to the store
atomically per medium (csdfd_jax.data.store). Media run in parallel over `--workers` processes, each
loading dlib once. Re-running the same command resumes: committed media are skipped, so a killed run
loses at most the media that were in flight. Unreadable media (corrupt, truncated) are committed as
such, counted and listed, never fatal; an unexpected error on one medium is reported and the medium
is retried by the next run. The final table is also written to `<store>/summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cv2
from tqdm import tqdm

from csdfd_jax.data import layouts
from csdfd_jax.data import store as store_lib
from csdfd_jax.data.faces import FaceConfig, FaceExtractor, PredictorNotFound, resolve_predictor
from csdfd_jax.data.layouts import LayoutIndex, MediaRecord
from csdfd_jax.data.video import UnreadableMedia, read_frames_at, read_media

CONFIG = "preprocess_config.json"
FAILED = "failed"  # not committed: retried by the next run
CRASHED = "crashed"  # killed its worker process twice: committed as unreadable


class UnknownDataset(ValueError):
  """--dataset names no layout indexer."""


class StoreMismatch(ValueError):
  """The store was built with other crop settings than the ones asked for."""


def index_layout(name: str, root: str, options: dict[str, Any]) -> LayoutIndex:
  """The LayoutIndex of `name` at `root` (SPEC contract 2), with loud errors for common mistakes."""
  try:
    module = layouts.get(name)
  except ValueError as e:  # names the valid layouts
    raise UnknownDataset(str(e)) from None
  json_root = module.__name__.endswith(".deepfakebench") and Path(root).is_file()
  if not (Path(root).is_dir() or json_root):
    what = (
      "a folder, or a DeepfakeBench JSON file"
      if "deepfakebench" in module.__name__
      else ("a folder")
    )
    raise FileNotFoundError(f"dataset root {root} does not exist or is not {what} (--root)")
  accepted = [p for p in inspect.signature(module.index).parameters if p != "root"]
  accepted.append("allow_outside_root")  # layouts.index: media named outside the root
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"layout {name!r} has no option {unknown}; its options: {accepted}")
  return layouts.index(name, root, **options)


# ---- one medium ----


def process_media(
  record: MediaRecord, extractor: FaceExtractor, writer: store_lib.StoreWriter, num_frames: int
) -> dict[str, Any]:
  """Reads, detects, crops and commits one MediaRecord; returns its header counters."""
  meta = dict(
    dataset=record.dataset,
    media_id=record.media_id,
    label=record.label,
    split=record.split,
    domain=record.domain,
  )
  try:
    sampled = read_media(record.path, record.kind, num_frames)
  except UnreadableMedia as e:
    writer.save_media(
      **meta, status=store_lib.UNREADABLE, error=str(e), frames_sampled=0, frames_read=0
    )
    return {"status": store_lib.UNREADABLE, "frames_read": 0, "frames_without_face": 0, "faces": 0}
  masks, mask_error = {}, None
  if record.mask_path:
    try:
      masks = read_frames_at(record.mask_path, record.kind, sampled.indices)
    except UnreadableMedia as e:
      mask_error = str(e)
  crops, without_face = [], 0
  for index, frame in zip(sampled.indices, sampled.frames, strict=True):
    mask = masks.get(index)
    if mask is not None and mask.shape[:2] != frame.shape[:2]:
      mask = cv2.resize(mask, frame.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    found = extractor.extract(frame, frame_index=index, mask=mask)
    without_face += not found
    crops.extend(found)
  counters = dict(
    frames_sampled=sampled.wanted,
    frames_read=len(sampled.frames),
    frames_without_face=without_face,
    frame_count=sampled.frame_count,
    reported_frame_count=sampled.reported_count,
  )
  if mask_error:
    counters["mask_error"] = mask_error
  writer.save_media(**meta, crops=crops, **counters)
  return {"status": store_lib.OK, **counters, "faces": len(crops)}


# ---- worker processes (each loads dlib once) ----

_WORKER: dict[str, Any] = {}


def die_with_parent() -> None:
  """Linux: ask the kernel to SIGKILL this (worker) process when its parent dies, so that a
  killed preprocess leaves no orphaned workers behind (each holds a dlib model, ~200 MB)."""
  if not sys.platform.startswith("linux"):
    return
  import ctypes

  libc = ctypes.CDLL(None, use_errno=True)
  pr_set_pdeathsig = 1
  libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
  if os.getppid() == 1:  # the parent died before the request was made
    os._exit(1)


def _init_worker(
  store: str, predictor: str, config: FaceConfig, num_frames: int, pool: bool
) -> None:
  if pool:  # one process per core: no OpenCV thread pool on top
    die_with_parent()
    cv2.setNumThreads(1)
  _WORKER.update(
    extractor=FaceExtractor(predictor, config),
    writer=store_lib.StoreWriter(store),
    frames=num_frames,
  )


def _run_one(record: MediaRecord) -> tuple[MediaRecord, dict[str, Any]]:
  try:
    return record, process_media(record, _WORKER["extractor"], _WORKER["writer"], _WORKER["frames"])
  except Exception as e:  # reported, not committed: the next run retries this medium
    return record, {
      "status": FAILED,
      "error": f"{type(e).__name__}: {e}",
      "trace": traceback.format_exc(),
    }


def in_processes(
  records: Sequence[MediaRecord],
  fn: Callable[[MediaRecord], tuple[MediaRecord, dict[str, Any]]],
  workers: int,
  initializer: Callable[..., None],
  initargs: tuple[Any, ...],
) -> Iterator[tuple[MediaRecord, dict[str, Any]]]:
  """Yields fn(record) for every record, computed by `workers` spawned processes, in any order.

  A worker that dies (a decoder segfault on a corrupt file, the OOM killer) breaks the pool: the
  records then in flight are retried one at a time in a fresh single-worker pool, so the one that
  kills its worker again is identified and yielded with status CRASHED; the others complete.
  """
  pending, suspects = deque(records), deque()
  context = multiprocessing.get_context("spawn")
  while pending or suspects:
    alone = bool(suspects)
    queue = suspects if alone else pending
    n, depth = (1, 1) if alone else (workers, 2 * workers)
    in_flight: dict[Any, MediaRecord] = {}
    try:
      with ProcessPoolExecutor(n, context, initializer=initializer, initargs=initargs) as executor:
        while queue or in_flight:
          while queue and len(in_flight) < depth:
            record = queue.popleft()
            in_flight[executor.submit(fn, record)] = record
          finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
          for future in finished:
            result = future.result()  # raises BrokenProcessPool if a worker died
            del in_flight[future]
            yield result
    except BrokenProcessPool as e:
      if alone:
        (record,) = in_flight.values()
        yield record, {"status": CRASHED, "error": f"the worker process died reading it ({e})"}
      else:
        suspects.extend(in_flight.values())


def _commit_crash(writer: store_lib.StoreWriter, record: MediaRecord, error: str) -> dict[str, Any]:
  writer.save_media(
    dataset=record.dataset,
    media_id=record.media_id,
    label=record.label,
    split=record.split,
    domain=record.domain,
    status=store_lib.UNREADABLE,
    error=error,
    frames_sampled=0,
    frames_read=0,
  )
  return {
    "status": store_lib.UNREADABLE,
    "frames_read": 0,
    "frames_without_face": 0,
    "faces": 0,
    "error": error,
  }


# ---- the run ----


def _check_store_config(store: Path, config: dict[str, Any]) -> None:
  path = store / CONFIG
  if path.is_file():
    old = json.loads(path.read_text())
    diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
    if diff:
      what = ", ".join(f"{k}: store has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
      raise StoreMismatch(
        f"{store} was built with other settings ({what}); crops would be inconsistent. "
        "Fix: pass the store's settings again, or write to a new --out folder."
      )
  else:
    store.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def run(
  dataset: str,
  root: str,
  out: str,
  *,
  frames: int = 32,
  config: FaceConfig | None = None,
  workers: int = 1,
  predictor: str | None = None,
  limit: int | None = None,
  splits: Sequence[str] | None = None,
  layout_options: dict[str, Any] | None = None,
  progress: bool = True,
  retry_unreadable: bool = False,
) -> dict[str, Any]:
  """Preprocesses one dataset into the store `out`; returns the summary (also in summary.json).
  ``retry_unreadable``: media committed as unreadable by an earlier run are read again (after
  the files were repaired); everything else committed is skipped as usual."""
  predictor = resolve_predictor(predictor)  # fail on a missing predictor before indexing
  layout = index_layout(dataset, root, layout_options or {})
  records = [r for r in layout.records if splits is None or r.split in splits]
  if limit is not None:
    records = records[:limit]
  return run_records(
    records,
    out,
    frames=frames,
    config=config,
    workers=workers,
    predictor=predictor,
    progress=progress,
    retry_unreadable=retry_unreadable,
    desc=f"{dataset} faces",
    extra=dict(
      dataset=dataset,
      root=str(Path(root).resolve()),
      missing_from_index=len(layout.missing),
      missing_files=list(layout.missing),
      layout_notes=list(layout.notes),
    ),
  )


def run_records(
  records: Sequence[MediaRecord],
  out: str | Path,
  *,
  frames: int = 32,
  config: FaceConfig | None = None,
  workers: int = 1,
  predictor: str | None = None,
  progress: bool = True,
  desc: str = "faces",
  extra: dict[str, Any] | None = None,
  retry_unreadable: bool = False,
) -> dict[str, Any]:
  """Preprocesses the given media records into the store `out` (those already committed are
  skipped); returns the store summary, whose ``last_run`` holds this run's counts, the
  failures and ``extra``."""
  config = config or FaceConfig()
  predictor = resolve_predictor(predictor)
  store = Path(out)
  _check_store_config(
    store,
    dict(
      frames=frames,
      size=config.size,
      scale=config.scale,
      shift=config.shift,
      max_faces=config.max_faces,
      min_face_ratio=config.min_face_ratio,
      predictor=Path(predictor).name,
    ),
  )
  done = store_lib.done_media(store)
  if retry_unreadable:
    done -= {
      (h["dataset"], h["media_id"])
      for h in store_lib.read_media_headers(store)
      if h["status"] == store_lib.UNREADABLE
    }
  todo = [r for r in records if (r.dataset, r.media_id) not in done]
  stats = dict(
    processed=0, unreadable=0, without_face=0, frames_read=0, frames_without_face=0, faces=0
  )
  failed: list[dict[str, str]] = []
  start = time.perf_counter()
  bar = tqdm(total=len(todo), unit="media", desc=desc, disable=not progress, smoothing=0.05)
  initargs = (str(store), predictor, config, frames)
  if not todo:
    results: Iterator[tuple[MediaRecord, dict[str, Any]]] = iter(())
  elif workers <= 1 or len(todo) == 1:
    _init_worker(*initargs, False)
    results = map(_run_one, todo)
  else:
    results = in_processes(todo, _run_one, min(workers, len(todo)), _init_worker, (*initargs, True))
  try:
    for record, result in results:
      if result["status"] == CRASHED:  # committed as unreadable: a rerun would crash again
        result = _commit_crash(store_lib.StoreWriter(store), record, result["error"])
        tqdm.write(f"UNREADABLE {record.path}: {result['error']}", file=sys.stderr)
      if result["status"] == FAILED:
        failed.append({"media_id": record.media_id, "path": record.path, "error": result["error"]})
        tqdm.write(f"FAILED {record.path}: {result['error']}\n{result['trace']}", file=sys.stderr)
      else:
        stats["processed"] += 1
        stats["unreadable"] += result["status"] == store_lib.UNREADABLE
        stats["without_face"] += result["status"] == store_lib.OK and result["faces"] == 0
        for k in ("frames_read", "frames_without_face", "faces"):
          stats[k] += result[k]
      elapsed = time.perf_counter() - start
      bar.set_postfix(
        frames_s=f"{stats['frames_read'] / max(elapsed, 1e-9):.1f}",
        no_face=stats["frames_without_face"],
      )
      bar.update()
  finally:
    bar.close()
  elapsed = time.perf_counter() - start
  last_run = dict(
    selected=len(records),
    skipped_done=len(records) - len(todo),
    **stats,
    failed=failed,
    **(extra or {}),
    seconds=round(elapsed, 2),
    frames_per_second=round(stats["frames_read"] / max(elapsed, 1e-9), 2),
    workers=workers,
    config=dataclasses.asdict(config),
    predictor=predictor,
    frames=frames,
  )
  return store_lib.StoreWriter(store).finish({"last_run": last_run})


def format_summary(summary: dict[str, Any], max_listed: int = 10) -> str:
  """The end-of-run table: this run's counts next to the whole store's."""
  run_ = summary["last_run"]
  rows = [
    ("media selected", run_["selected"], None),
    ("media done this run", run_["processed"], summary["media"]),
    ("  unreadable", run_["unreadable"], summary["media_unreadable"]),
    ("  with no face at all", run_["without_face"], summary["media_without_face"]),
    ("media skipped (already done)", run_["skipped_done"], None),
    ("media failed (retried next run)", len(run_["failed"]), None),
    ("frames read", run_["frames_read"], summary["frames_read"]),
    ("frames without a face", run_["frames_without_face"], summary["frames_without_face"]),
    ("faces written", run_["faces"], summary["faces"]),
    ("files missing from the index", run_.get("missing_from_index", 0), None),
  ]
  width = max(len(r[0]) for r in rows)
  lines = [f"{'':<{width}}  {'this run':>10}  {'store':>10}"]
  for name, this, total in rows:
    lines.append(f"{name:<{width}}  {this:>10}  {'' if total is None else total:>10}")
  lines.append(
    f"{run_['seconds']:.1f} s, {run_['frames_per_second']:.2f} frames/s, "
    f"{run_['workers']} worker(s)"
  )
  lists = [
    ("unreadable", [f"{u['media_id']}: {u['error']}" for u in summary["unreadable"]]),
    ("failed", [f"{f['media_id']}: {f['error']}" for f in run_["failed"]]),
    ("missing from the index", run_["missing_files"]),
    ("notes of the layout index", run_.get("layout_notes", [])),
  ]
  for title, items in lists:
    if items:
      lines.append(f"{title} ({len(items)}):")
      lines += [f"  {item}" for item in items[:max_listed]]
      if len(items) > max_listed:
        lines.append(f"  ... and {len(items) - max_listed} more (see summary.json)")
  return "\n".join(lines)


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
    try:
      options[key] = json.loads(value)
    except json.JSONDecodeError:
      options[key] = value
  return options


def main(argv: Sequence[str] | None = None) -> int:
  defaults = FaceConfig()
  p = argparse.ArgumentParser(
    prog="python -m csdfd_jax.data.preprocess",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--dataset", required=True, help="layout name (e.g. ffpp, celebdf, dfdc, folder)")
  p.add_argument("--root", required=True, help="dataset root folder, in its official layout")
  p.add_argument("--out", required=True, help="face store folder (created; resumed when it exists)")
  p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly per video")
  p.add_argument("--size", type=int, default=defaults.size, help="crop side in pixels")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
  p.add_argument("--predictor", default=None, help="dlib shape predictor .dat (68 or 81 points)")
  p.add_argument("--limit", type=int, default=None, help="only the first N media (after --splits)")
  p.add_argument("--splits", nargs="+", default=None, choices=("train", "val", "test"))
  p.add_argument("--max-faces", type=int, default=defaults.max_faces, help="faces kept per frame")
  p.add_argument(
    "--min-face-ratio",
    type=float,
    default=defaults.min_face_ratio,
    help="drop faces whose box area is below this fraction of the largest face's (SBI: 0.5)",
  )
  p.add_argument(
    "--crop-scale", type=float, default=defaults.scale, help="crop side / landmark box"
  )
  p.add_argument("--crop-shift", type=float, default=defaults.shift, help="crop centre shift up")
  p.add_argument(
    "--detect-size", type=int, default=defaults.detect_size, help="detection long side"
  )
  p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="layout option")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--retry-unreadable",
    action="store_true",
    help="read again the media an earlier run committed as unreadable (after repairing them)",
  )
  args = p.parse_args(argv)
  config = FaceConfig(
    size=args.size,
    scale=args.crop_scale,
    shift=args.crop_shift,
    max_faces=args.max_faces,
    min_face_ratio=args.min_face_ratio,
    detect_size=args.detect_size,
  )
  try:
    summary = run(
      args.dataset,
      args.root,
      args.out,
      frames=args.frames,
      config=config,
      workers=args.workers,
      predictor=args.predictor,
      limit=args.limit,
      splits=args.splits,
      layout_options=_parse_options(args.option),
      progress=not args.no_progress,
      retry_unreadable=args.retry_unreadable,
    )
  except (UnknownDataset, PredictorNotFound, StoreMismatch, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  print(f"store: {Path(args.out).resolve()} (index.jsonl, summary.json)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
