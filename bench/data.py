"""Data throughput: SBI synthesis and the training loader against the train step that consumes them.

Measured in one run, interleaved (every row once per round, median over rounds), on this machine:

  SBI        ``data.sbi.sbi_pair`` (crop, self-blend, shared post-augmentation, resize) in this
             process with OpenCV on 1 thread: pairs/s and images/s (real + fake) per core, on
             256 px demo-store faces (``data.demo.make_demo_store``) and, when
             ``../shared/data/ffhq_real_384`` exists, on FFHQ photos cropped to 256 px around
             their dlib landmarks (``data.faces.FaceExtractor``), as preprocess would store them.
  loader     ``data.pipeline.train_iterator`` over ArrayRecords of the demo store
             (``data.builder.build_records``), both streams, 16 images per stream per step:
             images/s for ``worker_count`` 0 (the work runs in one thread of this process: one
             core) and N (grain worker processes). Each round starts a fresh iterator, discards
             its first max(1, N) batches (start-up, filled worker buffers), then times --steps.
  step       the csdfd train step of tf_efficientnet_b4 (``bench/train_step.py``'s ``JaxStep``:
             ``methods.step.make_train_step`` + ``methods.get("csdfd")`` + SGD, jit, donated), at
             each size: the images/s a trainer consumes (both streams count).

The summary prints loader/step: above 1 the loader keeps up with the step on this machine. The
16-worker row is an ESTIMATE (the worker_count=0 per-core rate x 16, i.e. linear scaling on 16
free cores), not a measurement. The issue's target compares with an H100 train step: that needs
the GPU (``--device auto`` picks it when JAX sees one); on CPU the step row is this CPU's.

  python bench/data.py [--sizes 256,380] [--workers N] [--rounds 2] [--steps 3] [--sbi 16]
                       [--step-batch B] [--no-step] [--ffhq 8] [--device auto|cpu|gpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import jax
import numpy as np
from train_step import JaxStep, pick_device

from csdfd_jax.data import builder, demo, pipeline, store
from csdfd_jax.data.sbi import sbi_pair

FFHQ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ffhq_real_384"
BATCH = 16  # per stream, the paper's


def demo_faces(root: Path) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
  """A 256 px demo store (8 identities x 2 frames, real + swap fake) and its real crops."""
  path = demo.make_demo_store(root / "store", size=256, train=8, val=0, test=0, unseen=0, frames=2)
  faces = []
  for rec in store.read_index(path):
    if rec.label == 0:
      image = cv2.cvtColor(cv2.imread(str(path / rec.path)), cv2.COLOR_BGR2RGB)
      faces.append((image, np.asarray(rec.landmarks, np.float32)))
  return path, faces


def ffhq_faces(count: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
  """256 px crops of the first ``count`` FFHQ photos with a dlib face, and a note."""
  if count <= 0 or not FFHQ.is_dir():
    return [], f"FFHQ rows skipped ({FFHQ} absent)" if count > 0 else "FFHQ rows off"
  from csdfd_jax.data.faces import FaceConfig, FaceExtractor, PredictorNotFound

  try:
    extractor = FaceExtractor(config=FaceConfig(size=256))
  except PredictorNotFound as e:
    return [], f"FFHQ rows skipped: {e}"
  faces, files = [], sorted(FFHQ.glob("*.jpg"))[:count]
  for f in files:
    rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
    faces += [(c.image, c.landmarks) for c in extractor.extract(rgb)]
  return faces, f"FFHQ: dlib found {len(faces)} faces in {len(files)} photos"


def sbi_job(faces, size: int, pairs: int):
  """Times ``pairs`` sbi_pair calls cycling over ``faces``: returns (images, seconds)."""
  state = {"round": 0}

  def run() -> tuple[int, float]:
    rng = np.random.default_rng(state["round"])
    state["round"] += 1
    start = time.perf_counter()
    for i in range(pairs):
      image, landmarks = faces[i % len(faces)]
      sbi_pair(image, landmarks, rng, size=size)
    return 2 * pairs, time.perf_counter() - start

  return run


def loader_job(records: Path, size: int, workers: int, steps: int):
  """Fresh iterator, max(1, workers) discarded batches, then ``steps`` timed: (images, seconds)."""

  def run() -> tuple[int, float]:
    with pipeline.train_iterator(
      records, batch_size=BATCH, image_size=size, seed=0, worker_count=workers
    ) as it:
      for _ in range(max(1, workers)):
        next(it)
      start = time.perf_counter()
      for _ in range(steps):
        batch = next(it)
      seconds = time.perf_counter() - start
    assert batch["s"]["image"].shape == (BATCH, size, size, 3)
    return 2 * BATCH * steps, seconds

  return run


def step_job(runner: JaxStep):
  def run() -> tuple[int, float]:
    start = time.perf_counter()
    runner.run(1)
    return runner.images_per_step, time.perf_counter() - start

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="256,380", help="output sides in pixels")
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="N for the loader")
  parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
  parser.add_argument("--steps", type=int, default=3, help="timed loader steps per round")
  parser.add_argument("--sbi", type=int, default=16, help="timed SBI pairs per round and row")
  parser.add_argument("--ffhq", type=int, default=8, help="FFHQ photos to crop (0: off)")
  parser.add_argument("--step-batch", type=int, default=None, help="per stream (CPU 2, GPU 16)")
  parser.add_argument("--no-step", action="store_true", help="skip the EfficientNet-B4 step")
  parser.add_argument("--workdir", default=None, help="keep the demo store and records here")
  parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  device = pick_device(args.device)
  step_batch = args.step_batch or (16 if device == "gpu" else 2)
  cv2.setNumThreads(1)  # per-core rates: OpenCV would otherwise spread resizes over all cores

  with tempfile.TemporaryDirectory() as tmp:
    root = Path(args.workdir or tmp)
    store_dir, demo_list = demo_faces(root)
    records = builder.build_records(store_dir, root / "records")
    ffhq_list, ffhq_note = ffhq_faces(args.ffhq)
    jobs: dict[tuple[str, ...], object] = {}
    for size in sizes:
      jobs["sbi", "demo", str(size)] = sbi_job(demo_list, size, args.sbi)
      if ffhq_list:
        jobs["sbi", "ffhq", str(size)] = sbi_job(ffhq_list, size, args.sbi)
    for size in sizes:
      for w in dict.fromkeys((0, args.workers)):
        jobs["loader", str(w), str(size)] = loader_job(records, size, w, args.steps)
    compile_s = {}
    if not args.no_step:
      for size in sizes:
        start = time.perf_counter()
        runner = JaxStep("tf_efficientnet_b4", "csdfd", size=size, batch=step_batch, device=device)
        runner.run(1)
        compile_s[size] = time.perf_counter() - start
        jobs["step", "csdfd", str(size)] = step_job(runner)

    rates: dict[tuple[str, ...], list[float]] = {key: [] for key in jobs}
    for _ in range(args.rounds):
      for key, run in jobs.items():
        images, seconds = run()
        rates[key].append(images / seconds)
  med = {key: statistics.median(r) for key, r in rates.items()}

  def show(key) -> str:
    return " ".join(f"{r:.1f}" for r in rates[key])

  print(
    f"{os.cpu_count()} CPU cores (shared); step device: {device} "
    f"({jax.devices(device)[0].device_kind}); {args.rounds} rounds, median; {ffhq_note}"
  )
  print("\nSBI synthesis, sbi_pair in one process, OpenCV 1 thread (images = real + fake)")
  print(f"{'faces':<7}{'px':>5}{'pairs/s':>9}{'img/s/core':>12}   rounds img/s")
  for (kind, faces, size), r in med.items():
    if kind == "sbi":
      print(f"{faces:<7}{size:>5}{r / 2:>9.1f}{r:>12.1f}   {show((kind, faces, size))}")
  print(f"\nloader, train_iterator o+s, {BATCH}/stream = {2 * BATCH} images/step, 256 px crops")
  print(f"{'px':<5}{'workers':>8}{'img/s':>9}   rounds img/s")
  for (kind, w, size), r in med.items():
    if kind == "loader":
      print(f"{size:<5}{w:>8}{r:>9.1f}   {show((kind, w, size))}")
  if not args.no_step:
    print(f"\ntrain step, csdfd, tf_efficientnet_b4, {step_batch}/stream, {device}")
    print(f"{'px':<5}{'img/s':>9}{'compile s':>11}   rounds img/s")
    for (kind, _, size), r in med.items():
      if kind == "step":
        show_key = (kind, "csdfd", size)
        print(f"{size:<5}{r:>9.2f}{compile_s[int(size)]:>11.1f}   {show(show_key)}")

  print("\nsummary: images/s; loader/step > 1 means the loader keeps up")
  w = args.workers
  print(
    f"{'px':<5}{'loader w0':>10}{f'loader w{w}':>11}{'step':>8}{f'w{w}/step':>10}"
    f"{'w16 EST.':>10}{'EST./step':>11}"
  )
  for size in map(str, sizes):
    w0, wn = med["loader", "0", size], med["loader", str(w), size]
    est = 16 * w0
    step = med.get(("step", "csdfd", size))
    cols = f"{size:<5}{w0:>10.1f}{wn:>11.1f}"
    if step is None:
      cols += f"{'-':>8}{'-':>10}{est:>10.0f}{'-':>11}"
    else:
      cols += f"{step:>8.2f}{wn / step:>10.1f}{est:>10.0f}{est / step:>11.1f}"
    print(cols)
  print(
    "w16 EST. = worker_count 0 rate (one core) x 16: an extrapolation assuming linear scaling "
    "on 16 free cores, not a measurement."
  )
  if device != "gpu":
    print(
      "The issue's target is the loader vs an H100 train step: no GPU here, so the step column "
      "is this CPU's; rerun with a GPU (--device auto) for the target comparison."
    )


if __name__ == "__main__":
  main()
