"""Score image and video files with a trained run: ``python -m csdfd_jax.predict``.

    python -m csdfd_jax.predict --workdir RUN [--checkpoint best|last|STEP] [--frames 32]
        [--json OUT] [--csv OUT] [--predictor PATH] FILE_OR_DIR...

Each file goes through the path its training data went through: frames read with
``data.video.read_media`` (videos: ``--frames`` frames spaced uniformly over the whole video,
first and last included), faces found and cropped by ``data.faces.FaceExtractor`` with the
store's default ``FaceConfig`` (dlib, 68 landmarks, square crop of 1.8x the landmark box, 256
px), the crop resized to ``config.data.image_size`` exactly as ``data.pipeline`` resizes
records, then the detector in eval mode. Scores are fake probabilities, reported per face, per
frame (max over its faces) and per file (mean over its frames with a face): the conventions
of ``csdfd_jax.metrics``.

Faces of consecutive files are pooled into batches of one fixed shape (the last padded), so
the model compiles once. Every file gets a row: scored, "no face found", unreadable or
unsupported; directories are expanded recursively in sorted order (their non-media files are
counted in the summary, not scored).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csdfd_jax.data.faces import FaceConfig, FaceExtractor
from csdfd_jax.data.video import IMAGE_EXTENSIONS, UnreadableMedia, read_media

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
THRESHOLD = 0.5
CSV_FIELDS = (
  "file",
  "kind",
  "status",
  "frames_read",
  "frames_with_face",
  "faces",
  "score",
  "verdict",
  "error",
)


def media_kind(path: str | os.PathLike) -> str | None:
  """ "image", "video", or None for an extension predict does not read."""
  ext = Path(path).suffix.lower()
  if ext in IMAGE_EXTENSIONS:
    return "image"
  if ext in VIDEO_EXTENSIONS:
    return "video"
  return None


def expand_paths(paths: Iterable[str | os.PathLike]) -> tuple[list[str], int]:
  """Files named on the command line, in order, with directories replaced by the media files
  below them (sorted); returns (files, number of non-media files skipped in directories)."""
  out, skipped = [], 0
  for p in map(Path, paths):
    if p.is_dir():
      for f in sorted(q for q in p.rglob("*") if q.is_file()):
        if media_kind(f):
          out.append(str(f))
        else:
          skipped += 1
    else:
      out.append(str(p))
  return out, skipped


def verdict(score: float | None) -> str | None:
  return None if score is None else ("fake" if score >= THRESHOLD else "real")


class Predictor:
  """A loaded run + face extractor; ``predict(paths)`` scores files (module docstring).

  ``timings`` accumulates seconds spent reading frames ("decode"), finding and cropping faces
  ("detect") and in the model ("model", including the one compilation: see ``warmup``).
  """

  def __init__(
    self,
    model,
    variables,
    image_size: int,
    *,
    predictor: str | None = None,
    batch_size: int = 32,
    face_config: FaceConfig | None = None,
  ):
    import jax

    from csdfd_jax.models.detector import predict_fn

    self.model = model
    self.variables = jax.device_put(variables)
    self.image_size = int(image_size)
    self.batch_size = batch_size
    self.extractor = FaceExtractor(predictor, face_config or FaceConfig())
    self._predict = jax.jit(predict_fn(model))
    self.timings = {"decode": 0.0, "detect": 0.0, "model": 0.0}
    self.config, self.step = None, None

  @classmethod
  def from_run(cls, workdir: str, checkpoint: str | None = None, **kwargs: Any) -> Predictor:
    """The checkpoint ``checkpoint`` ("best" | "last" | step; None: the run's
    ``config.train.select``) of a train.py ``workdir``, at the run's ``config.data.image_size``."""
    from csdfd_jax import eval_lib

    config, model, variables, step = eval_lib.load_run(workdir, checkpoint)
    pred = cls(model, variables, config.data.image_size, **kwargs)
    pred.config, pred.step = config, step
    return pred

  def warmup(self) -> float:
    """Compiles the model for the fixed batch shape; returns the seconds it took."""
    t0 = time.perf_counter()
    self.score_faces(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
    return time.perf_counter() - t0

  def score_faces(self, faces: np.ndarray) -> np.ndarray:
    """Fake probabilities of uint8 face crops [N, S, S, 3], in fixed-size padded batches."""
    t0 = time.perf_counter()
    n, b = len(faces), self.batch_size
    out = np.empty(n, np.float64)
    for start in range(0, n, b):
      chunk = faces[start : start + b]
      pad = b - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      scores = np.asarray(self._predict(self.variables, chunk))
      out[start : start + b - pad] = scores[: b - pad]
    self.timings["model"] += time.perf_counter() - t0
    return out

  def _faces_of(self, path: str, kind: str, frames: int) -> tuple[dict, list]:
    """Reads and detects one file: (result without scores, [(frame, face, box, crop)])."""
    from csdfd_jax.data.pipeline import resize_face  # the records' resize, bit for bit

    result: dict[str, Any] = {"file": path, "kind": kind, "status": "ok", "error": None}
    t0 = time.perf_counter()
    try:
      media = read_media(path, kind, frames)
    except UnreadableMedia as e:
      self.timings["decode"] += time.perf_counter() - t0
      reason = str(e).removeprefix(f"{path}: ")
      return result | {"status": "unreadable", "error": f"unreadable: {reason}"}, []
    t1 = time.perf_counter()
    self.timings["decode"] += t1 - t0
    result |= {
      "frames_read": len(media.frames),
      "frame_count": media.frame_count,
      "frame_indices": list(media.indices),
    }
    faces = []
    for index, rgb in zip(media.indices, media.frames, strict=True):
      for face_index, det in enumerate(self.extractor.detect(rgb)):
        crop = self.extractor.crop(rgb, det, frame_index=index, face_index=face_index)
        box = [round(float(v), 1) for v in det.box]
        faces.append((index, face_index, box, resize_face(crop.image, self.image_size)))
    self.timings["detect"] += time.perf_counter() - t1
    if not faces:
      result |= {"status": "no_face", "error": f"no face found in {len(media.frames)} frame(s)"}
    return result, faces

  def predict(self, paths: Sequence[str | os.PathLike], *, frames: int = 32) -> list[dict]:
    """One result dict per file (directories expanded): ``status`` ("ok" | "no_face" |
    "unreadable" | "unsupported"), ``error``, ``frames_read``, ``frame_indices`` (all frames
    read), ``frames_with_face``, ``faces``, ``score`` (mean over frames with a face),
    ``verdict`` at 0.5, and ``frames``: [{"frame_index", "score" (max over faces), "faces":
    [{"face_index", "box" (x0, y0, x1, y1 in frame pixels), "score"}]}] for frames with a
    face."""
    files, _ = expand_paths(paths)
    results, pending, owners = [], [], []

    def flush(final: bool) -> None:
      full = len(pending) if final else len(pending) - len(pending) % self.batch_size
      if not full:
        return
      scores = self.score_faces(np.stack(pending[:full]))
      for face, s in zip(owners[:full], scores, strict=True):
        face["score"] = float(s)
      del pending[:full], owners[:full]

    for path in files:
      kind = media_kind(path)
      if kind is None:
        ext = Path(path).suffix or "(none)"
        error = (
          f"unsupported extension {ext} (images: {' '.join(IMAGE_EXTENSIONS)}; "
          f"videos: {' '.join(VIDEO_EXTENSIONS)})"
        )
        results.append({"file": path, "kind": None, "status": "unsupported", "error": error})
        continue
      if not Path(path).is_file():
        results.append(
          {"file": path, "kind": kind, "status": "unreadable", "error": "unreadable: no such file"}
        )
        continue
      result, faces = self._faces_of(path, kind, frames)
      by_frame: dict[int, list[dict]] = {}
      for index, face_index, box, crop in faces:
        face = {"face_index": face_index, "box": box, "score": None}
        by_frame.setdefault(index, []).append(face)
        pending.append(crop)
        owners.append(face)
      result["frames"] = [{"frame_index": i, "faces": f} for i, f in sorted(by_frame.items())]
      results.append(result)
      flush(final=False)
    flush(final=True)
    for r in results:
      _aggregate(r)
    return results


def _aggregate(result: dict) -> None:
  """Frame score = max over its faces, file score = mean over frames (metrics' convention)."""
  frames = result.get("frames") or []
  for f in frames:
    f["score"] = max(face["score"] for face in f["faces"])
  result["frames_with_face"] = len(frames)
  result["faces"] = sum(len(f["faces"]) for f in frames)
  result["score"] = float(np.mean([f["score"] for f in frames])) if frames else None
  result["verdict"] = verdict(result["score"])
  result.setdefault("frames_read", 0)
  result.setdefault("frames", [])


def predict_files(
  workdir: str,
  paths: Sequence[str | os.PathLike],
  *,
  checkpoint: str | None = None,
  frames: int = 32,
  predictor: str | None = None,
  batch_size: int = 32,
) -> list[dict]:
  """Scores image/video files (or directories of them) with the run in ``workdir``; one dict
  per file, see :meth:`Predictor.predict`."""
  pred = Predictor.from_run(workdir, checkpoint, predictor=predictor, batch_size=batch_size)
  return pred.predict(paths, frames=frames)


def summary(results: Sequence[dict], skipped: int = 0) -> str:
  count = lambda s: sum(r["status"] == s for r in results)  # noqa: E731
  line = (
    f"{count('ok')} file(s) scored, {count('no_face')} with no face found, "
    f"{count('unreadable')} unreadable, {count('unsupported')} unsupported"
  )
  return line + (f"; {skipped} non-media file(s) in directories skipped" if skipped else "")


def format_table(results: Sequence[dict]) -> str:
  """The printed table: file, kind, frames read, faces, score (4 decimals), verdict or error."""
  header = ["file", "kind", "frames", "faces", "score", "verdict"]
  rows = [
    [
      r["file"],
      r["kind"] or "-",
      str(r.get("frames_read", 0)),
      str(r.get("faces", 0)),
      "-" if r.get("score") is None else f"{r['score']:.4f}",
      r["verdict"] if r["status"] == "ok" else r["error"],
    ]
    for r in results
  ]
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(  # noqa: E731
    c.ljust(w) if i in (0, 1, 5) else c.rjust(w)
    for i, (c, w) in enumerate(zip(cells, widths, strict=True))
  ).rstrip()
  return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def write_json(results: Sequence[dict], path: str, meta: dict) -> None:
  with open(path, "w") as f:
    json.dump({**meta, "threshold": THRESHOLD, "files": list(results)}, f, indent=1)


def write_csv(results: Sequence[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in results:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m csdfd_jax.predict",
    description="Fake probability of faces in image and video files, with a train.py run.",
  )
  p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
  p.add_argument("--workdir", required=True, help="train.py run directory")
  p.add_argument(
    "--checkpoint",
    default=None,
    help="best (validation AUC), last, or a step (default: the run's config.train.select)",
  )
  p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly per video")
  p.add_argument("--json", help="write every score (face, frame, file) to this JSON file")
  p.add_argument("--csv", help="write one row per file to this CSV file")
  p.add_argument("--predictor", help="dlib shape predictor .dat (default: face-recognition-models)")
  p.add_argument("--batch_size", type=int, default=32, help="faces per model call (fixed shape)")
  p.add_argument(
    "--max_faces", type=int, default=FaceConfig().max_faces, help="faces per frame, largest first"
  )
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.frames < 1 or args.batch_size < 1 or args.max_faces < 1:
    sys.exit("predict: --frames, --batch_size and --max_faces must be >= 1")
  for flag, out in (("--json", args.json), ("--csv", args.csv)):
    # Checked before any scoring, so that no result is lost at the end.
    folder = os.path.dirname(os.path.abspath(out)) if out else None
    if folder and not os.path.isdir(folder):
      sys.exit(f"predict: {flag} {out}: the folder {folder} does not exist")
    if folder and not os.access(folder, os.W_OK):
      sys.exit(f"predict: {flag} {out}: the folder {folder} is not writable")
  files, _ = expand_paths(args.paths)
  if not files:
    sys.exit(
      f"predict: no image or video file in {', '.join(args.paths)} "
      f"(image extensions: {', '.join(IMAGE_EXTENSIONS)}; videos: .mp4, .avi, ...)"
    )
  from csdfd_jax.data.faces import PredictorNotFound

  try:
    pred = Predictor.from_run(
      args.workdir,
      args.checkpoint,
      predictor=args.predictor,
      batch_size=args.batch_size,
      face_config=FaceConfig(max_faces=args.max_faces),
    )
  except (FileNotFoundError, PredictorNotFound, ValueError) as e:
    sys.exit(f"predict: {e}")
  results = pred.predict(args.paths, frames=args.frames)
  _, skipped = expand_paths(args.paths)
  print(
    f"run {args.workdir} (step {pred.step}, {pred.config.model.name} {pred.config.model.variant}, "
    f"{pred.image_size} px), threshold {THRESHOLD}"
  )
  print(format_table(results))
  print(summary(results, skipped))
  meta = {
    "workdir": args.workdir,
    "checkpoint": args.checkpoint,
    "step": pred.step,
    "image_size": pred.image_size,
    "frames": args.frames,
  }
  if args.json:
    write_json(results, args.json, meta)
    print(f"written: {args.json}")
  if args.csv:
    write_csv(results, args.csv)
    print(f"written: {args.csv}")
  return 0 if any(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
