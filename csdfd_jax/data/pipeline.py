"""grain pipelines over face ArrayRecords: the two training streams and ordered eval batches.

Training (CS-DFD Section III, Eq. 2–3) draws two sub-batches per step, each with its own reals:

* stream O, X = [real, original fake]: B/2 reals and B/2 fakes, each class walking its own
  reshuffled-every-epoch permutation (class balance whatever the real:fake ratio of the data),
  light augmentation (horizontal flip);
* stream S, X' = [real, SBI(real)]: B/2 reals (those with landmarks) and the self-blended fake of
  each, paired as in the official SBI loader (real and fake share crop and post-augmentation).

Within a stream the batch alternates real, fake, real, fake: any contiguous even-sized device shard
is class balanced, and in S holds whole (real, SBI) pairs (fake ``2i+1`` is made from real ``2i``).

Determinism: one grain element is one whole step. Which records a step reads follows from
(seed, step, shard) alone, and each example's rng from (seed, sampling pool, epoch, record index),
so batches are bitwise the same for any ``worker_count`` and the iterator state is just the step
position: ``get_state()`` / ``set_state()`` restore a run exactly (saved with the model checkpoint).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from csdfd_jax.data.framing import resize_face
from csdfd_jax.data.sbi import sbi_pair

log = logging.getLogger(__name__)

STREAMS = ("o", "s")
_POOL_TAGS = {"o_real": 0, "o_fake": 1, "s_real": 2}
_NUM_STEPS = 2**40  # the train stream is endless; grain needs a length to slice across workers
_PERM_CACHE = 8

SbiFn = Callable[..., tuple[np.ndarray, np.ndarray]]


def find_build(path: str | Path) -> Path:
  """The TFDS dataset directory (holding ``dataset_info.json``) at or below ``path``: accepts
  ``<out>/<name>/<version>``, ``<out>/<name>`` or an ``<out>`` holding exactly one build."""
  path = Path(path)
  if (path / "dataset_info.json").exists():
    return path
  found = sorted({p.parent for p in path.glob("**/dataset_info.json")})
  if len(found) != 1:
    what = "no record build" if not found else f"{len(found)} builds: {[str(f) for f in found]}"
    raise FileNotFoundError(
      f"{path}: {what}; pass one <out>/<name>/<version> directory written by "
      "`python -m csdfd_jax.data.builder --store STORE --out OUT`"
    )
  return found[0]


class Records:
  """One split of one or more record builds: metadata columns and random access to decoded records
  (``image`` uint8 [H,W,3], ``landmarks`` float32 [N,2], ``label``, ``media_id`` bytes, ...).

  Record ``i`` of the concatenation is record ``i - offset[k]`` of build ``k``; the ``meta``
  columns (label, has_landmarks, dataset, domain, media_id) come from each build's metadata.json,
  so planning a sampler reads no image.
  """

  def __init__(self, records_dirs: str | Path | Sequence[str | Path], split: str):
    dirs = [records_dirs] if isinstance(records_dirs, str | Path) else list(records_dirs)
    self.split = split
    self.sources = []
    columns: dict[str, list[np.ndarray]] = {}
    for d in dirs:
      builder = tfds.builder_from_directory(str(find_build(d)))
      meta = builder.info.metadata
      if meta is None or split.startswith("_") or split not in meta:
        raise ValueError(
          f"{d}: no split {split!r} with metadata (splits: {list(builder.info.splits)}); "
          "records must be written by csdfd_jax.data.builder"
        )
      # Masks are not used by the streams: keep their PNG bytes undecoded (halves the read cost).
      skip = {"mask": tfds.decode.SkipDecoding()} if "mask" in builder.info.features else None
      self.sources.append(builder.as_data_source(split, decoders=skip))
      for c, v in meta[split].items():
        columns.setdefault(c, []).append(np.asarray(v))
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
    self.meta = {c: np.concatenate(v) for c, v in columns.items()}
    self.meta["label"] = self.meta["label"].astype(np.int32)
    self.meta["has_landmarks"] = self.meta["has_landmarks"].astype(bool)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Decoded records at global ``indices``, in that order (one batched read per build)."""
    indices = np.asarray(indices, np.int64)
    build = np.searchsorted(self.offsets, indices, side="right") - 1
    out: list[Any] = [None] * len(indices)
    for k in np.unique(build):
      where = np.flatnonzero(build == k)
      local = (indices[where] - self.offsets[k]).tolist()
      for i, rec in zip(where, self.sources[k].__getitems__(local), strict=True):
        out[i] = rec
    return out

  def select(
    self,
    datasets: Sequence[str] | None = None,
    fake_domains: Sequence[str] | None = None,
  ) -> np.ndarray:
    """Bool mask of records from ``datasets`` whose domain is in ``fake_domains`` (fakes only)."""
    keep = np.ones(len(self), bool)
    if datasets is not None:
      _check_known("dataset", datasets, self.meta["dataset"])
      keep &= np.isin(self.meta["dataset"], list(datasets))
    if fake_domains is not None:
      _check_known("domain", fake_domains, self.meta["domain"])
      keep &= (self.meta["label"] == 0) | np.isin(self.meta["domain"], list(fake_domains))
    return keep


def _check_known(what: str, wanted: Sequence[str], present: np.ndarray) -> None:
  unknown = sorted(set(wanted) - set(present.tolist()))
  if unknown:
    raise ValueError(f"unknown {what} {unknown}; the records hold {sorted(set(present.tolist()))}")


class TrainBatches:
  """Step → {stream: {"image": uint8[B,H,W,3], "label": int32[B]}}, a pure function of the step.

  Pool ``p`` (O reals, O fakes, S reals) is walked as the endless sequence
  ``perm(seed, p, 0) ++ perm(seed, p, 1) ++ ...``; host ``h`` of ``H`` takes, at step ``t``,
  positions ``[(t·H + h)·B/2, (t·H + h + 1)·B/2)`` of each of its stream pools, i.e. its slice of
  the global batch. Example rng: ``default_rng([seed, p, epoch, record])``.
  """

  def __init__(
    self,
    records: Records,
    *,
    streams: Sequence[str],
    batch_size: int,
    image_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    sbi_fn: SbiFn = sbi_pair,
    sbi_cfg: Any = None,
    datasets: Sequence[str] | None = None,
    fake_domains: Sequence[str] | None = None,
  ):
    if not streams or set(streams) - set(STREAMS):
      raise ValueError(f"streams must be a non-empty subset of {STREAMS}, got {streams!r}")
    if batch_size < 2 or batch_size % 2:
      raise ValueError(f"batch_size per stream must be even and >= 2, got {batch_size}")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    self.records = records
    self.streams = tuple(s for s in STREAMS if s in streams)
    self.half = batch_size // 2
    self.image_size = image_size
    self.seed = seed
    self.shard_index, self.shard_count = shard_index, shard_count
    self.sbi_fn = sbi_fn
    self.sbi_kwargs = {"size": image_size} | ({} if sbi_cfg is None else {"cfg": sbi_cfg})
    keep = records.select(datasets, fake_domains)
    label, has_lmk = records.meta["label"], records.meta["has_landmarks"]
    self.pools: dict[str, np.ndarray] = {}
    self.skipped_no_landmarks = 0
    if "o" in self.streams:
      self.pools["o_real"] = np.flatnonzero(keep & (label == 0))
      self.pools["o_fake"] = np.flatnonzero(keep & (label == 1))
    if "s" in self.streams:
      self.skipped_no_landmarks = int((keep & (label == 0) & ~has_lmk).sum())
      if self.skipped_no_landmarks:
        log.warning(
          "stream S: %d real crops without landmarks skipped (SBI needs them)",
          self.skipped_no_landmarks,
        )
      self.pools["s_real"] = np.flatnonzero(keep & (label == 0) & has_lmk)
    for name, pool in self.pools.items():
      if not len(pool):
        raise ValueError(
          f"pool {name} of split {records.split!r} is empty after filtering "
          f"(datasets={datasets}, fake_domains={fake_domains}); stream S needs reals with "
          "landmarks, stream O needs reals and fakes"
        )
    self._perms: dict[tuple[str, int], np.ndarray] = {}

  def _perm(self, pool: str, epoch: int) -> np.ndarray:
    key = (pool, epoch)
    if key not in self._perms:
      if len(self._perms) >= _PERM_CACHE:
        self._perms.pop(next(iter(self._perms)))
      rng = np.random.default_rng([self.seed, _POOL_TAGS[pool], epoch])
      self._perms[key] = rng.permutation(len(self.pools[pool]))
    return self._perms[key]

  def draw(self, pool: str, step: int) -> list[tuple[int, np.random.Generator]]:
    """(record index, example rng) for the B/2 examples of ``pool`` at ``step`` on this host."""
    start = (step * self.shard_count + self.shard_index) * self.half
    n = len(self.pools[pool])
    out = []
    for pos in range(start, start + self.half):
      epoch, j = divmod(pos, n)
      index = int(self.pools[pool][self._perm(pool, epoch)[j]])
      out.append((index, np.random.default_rng([self.seed, _POOL_TAGS[pool], epoch, index])))
    return out

  def _stream_o(self, step: int) -> dict[str, np.ndarray]:
    real, fake = self.draw("o_real", step), self.draw("o_fake", step)
    drawn = [x for pair in zip(real, fake, strict=True) for x in pair]
    recs = self.records.read([i for i, _ in drawn])
    images = []
    for rec, (_, rng) in zip(recs, drawn, strict=True):
      image = resize_face(rec["image"], self.image_size)
      images.append(image[:, ::-1] if rng.random() < 0.5 else image)
    labels = np.array([rec["label"] for rec in recs], np.int32)
    return {"image": np.stack(images), "label": labels}

  def _stream_s(self, step: int) -> dict[str, np.ndarray]:
    drawn = self.draw("s_real", step)
    recs = self.records.read([i for i, _ in drawn])
    images = []
    for rec, (_, rng) in zip(recs, drawn, strict=True):
      images += self.sbi_fn(rec["image"], rec["landmarks"], rng, **self.sbi_kwargs)
    labels = np.tile(np.array([0, 1], np.int32), self.half)
    return {"image": np.stack(images), "label": labels}

  def __call__(self, step: int) -> dict[str, dict[str, np.ndarray]]:
    step = int(step)
    out = {}
    if "o" in self.streams:
      out["o"] = self._stream_o(step)
    if "s" in self.streams:
      out["s"] = self._stream_s(step)
    return out


class StepIterator(grain.DatasetIterator):
  """grain iterator over ``batch_fn(step)`` for step = 0, 1, ... (< ``num_steps``).

  Elements are whole batches computed by ``threads`` prefetch threads, in ``worker_count`` grain
  processes when > 0 (each process takes every worker_count-th step; order is preserved). The
  state is ``{"step", "plan"}``: restorable under any worker count, and ``set_state`` refuses a
  state saved for a different batch plan (seed, batch size, streams, data...) instead of silently
  resuming on other data. Works with ``grain.checkpoint.CheckpointSave`` / orbax.
  """

  def __init__(
    self,
    batch_fn: Callable[[int], Any],
    *,
    num_steps: int,
    plan: str,
    worker_count: int = 0,
    threads: int = 1,
    prefetch: int = 2,
  ):
    super().__init__()
    self.batch_fn, self.num_steps, self.plan = batch_fn, num_steps, plan
    self.worker_count, self.threads, self.prefetch = worker_count, threads, prefetch
    self.step = 0
    self._inner: grain.DatasetIterator | None = None

  def _start(self) -> grain.DatasetIterator:
    data = grain.MapDataset.range(self.step, self.num_steps).map(self.batch_fn)
    read = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
    it = data.to_iter_dataset(read)
    if self.worker_count > 0:
      if not flags.FLAGS.is_parsed():
        # grain's workers read absl flags, which raises outside absl.app (google/grain#1355):
        # take the defaults, as absl.app would with no command-line flags.
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self.worker_count, per_worker_buffer_size=self.prefetch
        )
      )
    return iter(it)

  def __next__(self) -> Any:
    self._assert_not_closed()
    if self._inner is None:
      self._inner = self._start()
    batch = next(self._inner)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "plan": self.plan}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("plan") != self.plan:
      raise ValueError(
        f"iterator state is for batch plan {state.get('plan')!r}, this iterator is {self.plan!r}: "
        "restore with the same data, seed, streams, batch and image size, and sharding"
      )
    self._stop()
    self.step = int(state["step"])

  def _stop(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self) -> None:
    self._stop()
    super().close()

  def __enter__(self) -> StepIterator:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def _plan(kind: str, **fields: Any) -> str:
  """Short fingerprint of what decides the batches (not paths: a run may move machines)."""
  text = repr(sorted(fields.items()))
  return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def train_iterator(
  records_dir: str | Path | Sequence[str | Path],
  *,
  streams: Sequence[str] = STREAMS,
  batch_size: int,
  image_size: int,
  seed: int,
  split: str = "train",
  worker_count: int = 0,
  threads: int = 1,
  prefetch: int = 2,
  sbi_fn: SbiFn = sbi_pair,
  sbi_cfg: Any = None,
  datasets: Sequence[str] | None = None,
  fake_domains: Sequence[str] | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
) -> StepIterator:
  """Endless iterator of training steps ``{"o": {"image", "label"}, "s": {...}}`` (only the
  requested ``streams``); ``batch_size`` is per stream and per host (``shard_index`` of
  ``shard_count``, e.g. ``jax.process_index()``/``jax.process_count()``).

  ``sbi_fn(image, landmarks, rng, *, size[, cfg]) -> (real, fake)`` synthesises stream S's pairs
  (default ``csdfd_jax.data.sbi.sbi_pair``; ``cfg=sbi_cfg`` is passed when given). Reals without
  landmarks are left out of stream S with a warning (counted in ``TrainBatches``), never a crash.
  ``worker_count`` > 0 runs steps in grain worker processes; batches are identical for any value.
  The iterator's ``get_state()``/``set_state()`` checkpoint and restore the position exactly.
  """
  batches = TrainBatches(
    Records(records_dir, split),
    streams=streams,
    batch_size=batch_size,
    image_size=image_size,
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    sbi_fn=sbi_fn,
    sbi_cfg=sbi_cfg,
    datasets=datasets,
    fake_domains=fake_domains,
  )
  plan = _plan(
    "train",
    seed=seed,
    streams=batches.streams,
    batch_size=batch_size,
    image_size=image_size,
    shard=(shard_index, shard_count),
    pools={k: len(v) for k, v in batches.pools.items()},
    sbi_fn=f"{getattr(sbi_fn, '__module__', '')}.{getattr(sbi_fn, '__qualname__', sbi_fn)}",
  )
  return StepIterator(
    batches,
    num_steps=_NUM_STEPS,
    plan=plan,
    worker_count=worker_count,
    threads=threads,
    prefetch=prefetch,
  )


class EvalBatches:
  """Batch number → the records ``indices[b·B:(b+1)·B]``, padded to B with ``valid`` False."""

  def __init__(self, records: Records, indices: np.ndarray, batch_size: int, image_size: int):
    self.records, self.indices = records, indices
    self.batch_size, self.image_size = batch_size, image_size

  def __len__(self) -> int:
    return -(-len(self.indices) // self.batch_size)

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    take = self.indices[b * self.batch_size : (b + 1) * self.batch_size]
    recs = self.records.read(take)
    pad = self.batch_size - len(recs)
    s = self.image_size
    images = [resize_face(r["image"], s) for r in recs] + [np.zeros((s, s, 3), np.uint8)] * pad
    text = {
      k: [r[k].decode() for r in recs] + [""] * pad for k in ("media_id", "dataset", "domain")
    }
    ints = {
      k: [int(r[k]) for r in recs] + [-1] * pad for k in ("label", "frame_index", "face_index")
    }
    return {
      "image": np.stack(images),
      **{k: np.asarray(v, np.int32) for k, v in ints.items()},
      **{k: np.asarray(v, str) for k, v in text.items()},
      "valid": np.arange(self.batch_size) < len(recs),
    }


def eval_batches(
  records_dir: str | Path | Sequence[str | Path],
  split: str,
  *,
  batch_size: int,
  image_size: int,
  datasets: Sequence[str] | None = None,
) -> EvalBatches:
  """The ordered batch plan behind ``eval_iterator`` (``len()`` = number of batches)."""
  records = Records(records_dir, split)
  return EvalBatches(records, np.flatnonzero(records.select(datasets)), batch_size, image_size)


def eval_iterator(
  records_dir: str | Path | Sequence[str | Path],
  split: str,
  *,
  batch_size: int,
  image_size: int,
  datasets: Sequence[str] | None = None,
  worker_count: int = 0,
  threads: int = 1,
  prefetch: int = 2,
) -> StepIterator:
  """Every record of ``split`` (of ``datasets``, default all) exactly once, in record order (videos
  contiguous): ``{"image" uint8[B,S,S,3], "label" int32, "media_id"/"dataset"/"domain" str,
  "frame_index"/"face_index" int32, "valid" bool}``. The last batch is padded to ``batch_size``
  with ``valid`` False (label/frame/face -1, empty strings, black images)."""
  batches = eval_batches(
    records_dir, split, batch_size=batch_size, image_size=image_size, datasets=datasets
  )
  plan = _plan("eval", split=split, n=len(batches.indices), batch_size=batch_size, size=image_size)
  return StepIterator(
    batches,
    num_steps=len(batches),
    plan=plan,
    worker_count=worker_count,
    threads=threads,
    prefetch=prefetch,
  )
