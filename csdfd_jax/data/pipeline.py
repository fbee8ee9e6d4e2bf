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
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from csdfd_jax.data.builder import check_features
from csdfd_jax.data.framing import resize_face
from csdfd_jax.data.layouts import ffpp
from csdfd_jax.data.sbi import SBIConfig, sbi_pair

log = logging.getLogger(__name__)

STREAMS = ("o", "s")
# Pool tags seed the pools' permutations and example rngs. CS-DFD's two streams keep the tags
# they always had (so their batches are unchanged); any other pool's tag comes from its name,
# so a stream's data does not depend on which other streams a run declares, or their order.
_STANDARD_TAGS = {"o_real": 0, "o_fake": 1, "s_real": 2}


def pool_tag(pool: str) -> int:
  return _STANDARD_TAGS.get(pool, zlib.crc32(pool.encode()) + 3)


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
  columns (label, has_landmarks, dataset, domain, media_id, frame_index, face_index) come from
  each build's metadata.json, so planning a sampler reads no image. ``faceless`` holds the
  columns (media_id, label, dataset, domain, reason) of the split's media that gave no record.
  """

  def __init__(self, records_dirs: str | Path | Sequence[str | Path], split: str):
    dirs = [records_dirs] if isinstance(records_dirs, str | Path) else list(records_dirs)
    self.split = split
    self.sources = []
    columns: dict[str, list[np.ndarray]] = {}
    faceless: dict[str, list[np.ndarray]] = {}
    for d in dirs:
      build = find_build(d)
      check_features(build)
      builder = tfds.builder_from_directory(str(build))
      meta = builder.info.metadata
      if meta is None or split.startswith("_") or split not in meta:
        raise ValueError(
          f"{d}: no split {split!r} with metadata (splits: {list(builder.info.splits)}); "
          "records must be written by csdfd_jax.data.builder"
        )
      # Masks are not used by the streams: keep their PNG bytes undecoded (halves the read cost).
      skip = {"mask": tfds.decode.SkipDecoding()} if "mask" in builder.info.features else None
      self.sources.append(builder.as_data_source(split, decoders=skip))
      missing = {"frame_index", "face_index"} - set(meta[split])
      if missing:
        raise ValueError(
          f"{d}: the records lack the columns {sorted(missing)} (written by an older csdfd_jax); "
          "rebuild them with `python -m csdfd_jax.data.builder --store STORE --out OUT "
          "--overwrite`"
        )
      for c, v in meta[split].items():
        columns.setdefault(c, []).append(np.asarray(v))
      for c, v in meta.get("_faceless", {}).get(split, {}).items():
        faceless.setdefault(c, []).append(np.asarray(v))
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
    self.meta = {c: np.concatenate(v) for c, v in columns.items()}
    self.meta["label"] = self.meta["label"].astype(np.int32)
    self.meta["has_landmarks"] = self.meta["has_landmarks"].astype(bool)
    for c in ("frame_index", "face_index"):
      self.meta[c] = self.meta[c].astype(np.int64)
    names = ("media_id", "label", "dataset", "domain", "reason")
    self.faceless = {c: np.concatenate(faceless[c]) if c in faceless else np.zeros(0, str)
                     for c in names}  # fmt: skip
    self.faceless["label"] = self.faceless["label"].astype(np.int32)

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
      try:
        recs = self.sources[k].__getitems__(local)
      except Exception as e:  # noqa: BLE001 - TFDS decoders raise many kinds
        ids = [str(self.meta["media_id"][i]) for i in indices[where]]
        raise ValueError(
          f"split {self.split!r}: could not decode records {local} of build {k} (media "
          f"{sorted(set(ids))[:5]}): {type(e).__name__}: {e}. Rebuild the records with "
          "`python -m csdfd_jax.data.builder --overwrite`, which checks every image"
        ) from e
      for i, rec in zip(where, recs, strict=True):
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
    fake_domains = resolve_fake_domains(fake_domains)
    if fake_domains is not None:
      _check_known("domain", fake_domains, self.meta["domain"])
      keep &= (self.meta["label"] == 0) | np.isin(self.meta["domain"], list(fake_domains))
    return keep


def _check_known(what: str, wanted: Sequence[str], present: np.ndarray) -> None:
  unknown = sorted(set(wanted) - set(present.tolist()))
  if unknown:
    hint = ""
    if what == "domain" and unknown == ["FaceShifter"]:
      hint = " (for FF++ without FaceShifter, the four-method protocol, pass fake domains 'four')"
    raise ValueError(
      f"unknown {what} {unknown}; the records hold {sorted(set(present.tolist()))}{hint}"
    )


def resolve_fake_domains(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
  """Fake domains named by ``spec``: None or "" for every fake, an FF++ protocol name ("five":
  CS-DFD's five manipulations, "four": the FF++ paper's), a "+"-joined string, or a list."""
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return None
  return ffpp.resolve_manipulations(spec)


def uniform_frames(media_ids: np.ndarray, frame_indices: np.ndarray, n: int) -> np.ndarray:
  """Bool mask keeping, per media, at most ``n`` of its frames, spaced uniformly over the frames
  present (not the first n: DeepfakeBench's known bias); every face of a kept frame is kept.
  ``n`` <= 0 keeps everything."""
  keep = np.ones(len(media_ids), bool)
  if n <= 0:
    return keep
  media_ids, frame_indices = np.asarray(media_ids), np.asarray(frame_indices)
  for mid in np.unique(media_ids):
    where = media_ids == mid
    frames = np.unique(frame_indices[where])
    if len(frames) > n:
      chosen = frames[np.linspace(0, len(frames) - 1, n).round().astype(int)]
      keep[where] = np.isin(frame_indices[where], chosen)
  return keep


class Select(NamedTuple):
  """Which records: those of ``datasets`` (None: all) and, for fakes, of ``domains`` (None: all;
  an FF++ protocol name "five"/"four", a "+"-joined string or a tuple, ``resolve_fake_domains``)."""

  datasets: tuple[str, ...] | None = None
  domains: str | tuple[str, ...] | None = None


class StreamSpec(NamedTuple):
  """One training stream: a class-balanced (real, fake) sub-batch per step.

  ``fakes`` is a ``Select`` of stored fakes, or "sbi" for the self-blended fake of each of the
  stream's reals (paired: fake ``2i+1`` is made from real ``2i``). ``domain_id``, when set, is
  emitted per sample as ``batch[name]["domain"]`` (int32), for methods that condition on it."""

  name: str
  fakes: Select | str = Select()
  reals: Select = Select()
  domain_id: int | None = None


def default_spec(name: str) -> StreamSpec:
  """The spec a bare stream name stands for: "o" = reals + every stored fake (CS-DFD's original
  fakes), "s" or "sbi" = reals + their self-blended fakes, any other name = reals + the stored
  fakes of the domain of that name (e.g. "Deepfakes")."""
  if name == "o":
    return StreamSpec("o")
  if name in ("s", "sbi"):
    return StreamSpec(name, fakes="sbi")
  return StreamSpec(name, fakes=Select(domains=(name,)))


class TrainBatches:
  """Step → {stream: {"image": uint8[B,H,W,3], "label": int32[B][, "domain"]}}, a pure function
  of the step, for any number of declared streams (``StreamSpec``, or names: ``default_spec``).

  Stream ``n`` has a pool of reals ``n_real`` and, unless its fakes are "sbi", a pool of fakes
  ``n_fake`` (tags: ``pool_tag``). Pool ``p`` is walked as the endless sequence
  ``perm(seed, p, 0) ++ perm(seed, p, 1) ++ ...``; host ``h`` of ``H`` takes, at step ``t``,
  positions ``[(t·H + h)·B/2, (t·H + h + 1)·B/2)`` of each of its stream pools, i.e. its slice of
  the global batch. Example rng: ``default_rng([seed, p, epoch, record])``. Pools hold the
  largest face of each frame (``face_index`` 0) of at most ``frames_per_video`` frames per video
  (0: all stored frames). ``datasets`` and ``fake_domains`` filter every stream (``fake_domains``
  only those whose spec names no domains).
  """

  def __init__(
    self,
    records: Records,
    *,
    streams: Sequence[str | StreamSpec],
    batch_size: int,
    image_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    sbi_fn: SbiFn = sbi_pair,
    sbi_cfg: Any = None,
    datasets: Sequence[str] | None = None,
    fake_domains: str | Sequence[str] | None = None,
    frames_per_video: int = 0,
  ):
    specs = tuple(default_spec(s) if isinstance(s, str) else s for s in streams)
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
      raise ValueError(f"streams must be a non-empty list of distinct streams, got {names}")
    if batch_size < 2 or batch_size % 2:
      raise ValueError(f"batch_size per stream must be even and >= 2, got {batch_size}")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    self.records = records
    self.specs = specs
    self.streams = tuple(names)
    self.half = batch_size // 2
    self.image_size = image_size
    self.seed = seed
    self.shard_index, self.shard_count = shard_index, shard_count
    self.sbi_fn = sbi_fn
    self.sbi_kwargs = {"size": image_size} | ({} if sbi_cfg is None else {"cfg": sbi_cfg})
    meta = records.meta
    # Training reads the largest face of a frame only (face_index 0), and at most
    # ``frames_per_video`` frames per video (SBI trains on 8), spaced uniformly.
    base = records.select(datasets) & (meta["face_index"] == 0)
    base &= uniform_frames(meta["media_id"], meta["frame_index"], frames_per_video)
    label, has_lmk = meta["label"], meta["has_landmarks"]
    self.pools: dict[str, np.ndarray] = {}
    self.skipped_no_landmarks = 0
    for spec in specs:
      reals = base & (label == 0) & records.select(spec.reals.datasets)
      if spec.fakes == "sbi":
        skipped = int((reals & ~has_lmk).sum())
        self.skipped_no_landmarks += skipped
        if skipped:
          log.warning("stream %s: %d real crops without landmarks skipped (SBI needs them)",
                      spec.name, skipped)  # fmt: skip
        reals &= has_lmk
      else:
        if not isinstance(spec.fakes, Select):
          raise ValueError(
            f"stream {spec.name}: fakes must be a Select or 'sbi', got {spec.fakes!r}"
          )
        domains = spec.fakes.domains if spec.fakes.domains is not None else fake_domains
        fakes = base & (label == 1) & records.select(spec.fakes.datasets, domains)
        self.pools[f"{spec.name}_fake"] = np.flatnonzero(fakes)
      self.pools[f"{spec.name}_real"] = np.flatnonzero(reals)
    self.tags = {pool: pool_tag(pool) for pool in self.pools}
    for name, pool in self.pools.items():
      if not len(pool):
        raise ValueError(
          f"pool {name} of split {records.split!r} is empty after filtering "
          f"(datasets={datasets}, fake_domains={fake_domains}, streams={specs}); an SBI stream "
          "needs reals with landmarks, any other stream needs reals and fakes"
        )
    self._perms: dict[tuple[str, int], np.ndarray] = {}

  def _perm(self, pool: str, epoch: int) -> np.ndarray:
    key = (pool, epoch)
    if key not in self._perms:
      if len(self._perms) >= _PERM_CACHE * len(self.pools):
        self._perms.pop(next(iter(self._perms)))
      rng = np.random.default_rng([self.seed, self.tags[pool], epoch])
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
      out.append((index, np.random.default_rng([self.seed, self.tags[pool], epoch, index])))
    return out

  def _stored(self, name: str, step: int) -> dict[str, np.ndarray]:
    real, fake = self.draw(f"{name}_real", step), self.draw(f"{name}_fake", step)
    drawn = [x for pair in zip(real, fake, strict=True) for x in pair]
    recs = self.records.read([i for i, _ in drawn])
    images = []
    for rec, (_, rng) in zip(recs, drawn, strict=True):
      image = resize_face(rec["image"], self.image_size)
      images.append(image[:, ::-1] if rng.random() < 0.5 else image)
    labels = np.array([rec["label"] for rec in recs], np.int32)
    return {"image": np.stack(images), "label": labels}

  def _self_blended(self, name: str, step: int) -> dict[str, np.ndarray]:
    drawn = self.draw(f"{name}_real", step)
    recs = self.records.read([i for i, _ in drawn])
    images = []
    for rec, (_, rng) in zip(recs, drawn, strict=True):
      images += self.sbi_fn(rec["image"], rec["landmarks"], rng, **self.sbi_kwargs)
    labels = np.tile(np.array([0, 1], np.int32), self.half)
    return {"image": np.stack(images), "label": labels}

  def __call__(self, step: int) -> dict[str, dict[str, np.ndarray]]:
    step = int(step)
    out = {}
    for spec in self.specs:
      make = self._self_blended if spec.fakes == "sbi" else self._stored
      out[spec.name] = make(spec.name, step)
      if spec.domain_id is not None:
        out[spec.name]["domain"] = np.full(2 * self.half, spec.domain_id, np.int32)
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
  streams: Sequence[str | StreamSpec] = STREAMS,
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
  fake_domains: str | Sequence[str] | None = None,
  frames_per_video: int = 0,
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
    frames_per_video=frames_per_video,
  )
  plan = _plan(
    "train",
    seed=seed,
    streams=batches.specs,
    batch_size=batch_size,
    image_size=image_size,
    shard=(shard_index, shard_count),
    frames_per_video=frames_per_video,
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


EVAL_FACES = ("all", "largest")
EVAL_FAKES = ("stored", "sbi", "both")
SBI_DOMAIN = "sbi"


class EvalBatches:
  """Batch number → items ``b·B .. (b+1)·B`` of the plan, padded to B with ``valid`` False.

  Item ``i`` is record ``indices[i]`` as stored, or, where ``synth[i]``, the self-blended fake
  of that (real) record: media id ``sbi/<media_id>``, label 1, domain "sbi", made by ``sbi_pair``
  with the validation config (no post-augmentation, no flip) and the rng
  ``default_rng([sbi_seed, record])``, so a validation set of SBI fakes is the same at every
  evaluation and for every method.
  """

  def __init__(
    self,
    records: Records,
    indices: np.ndarray,
    batch_size: int,
    image_size: int,
    synth: np.ndarray | None = None,
    sbi_seed: int = 0,
  ):
    self.records, self.indices = records, np.asarray(indices, np.int64)
    self.synth = np.zeros(len(self.indices), bool) if synth is None else np.asarray(synth, bool)
    self.batch_size, self.image_size, self.sbi_seed = batch_size, image_size, sbi_seed

  def __len__(self) -> int:
    return -(-len(self.indices) // self.batch_size)

  def _item(self, rec: dict[str, Any], index: int, synth: bool) -> tuple[np.ndarray, dict]:
    text = {k: rec[k].decode() for k in ("media_id", "dataset", "domain")}
    ints = {k: int(rec[k]) for k in ("label", "frame_index", "face_index")}
    if not synth:
      return resize_face(rec["image"], self.image_size), text | ints
    rng = np.random.default_rng([self.sbi_seed, index])
    _, fake = sbi_pair(
      rec["image"], rec["landmarks"], rng, size=self.image_size, cfg=SBIConfig.validation()
    )
    text |= {"media_id": f"sbi/{text['media_id']}", "domain": SBI_DOMAIN}
    return fake, text | ints | {"label": 1}

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
    take, synth = self.indices[sl], self.synth[sl]
    items = [
      self._item(rec, int(i), bool(y))
      for rec, i, y in zip(self.records.read(take), take, synth, strict=True)
    ]
    pad = self.batch_size - len(items)
    s = self.image_size
    images = [im for im, _ in items] + [np.zeros((s, s, 3), np.uint8)] * pad
    text = {k: [f[k] for _, f in items] + [""] * pad for k in ("media_id", "dataset", "domain")}
    ints = {
      k: [f[k] for _, f in items] + [-1] * pad for k in ("label", "frame_index", "face_index")
    }
    return {
      "image": np.stack(images),
      **{k: np.asarray(v, np.int32) for k, v in ints.items()},
      **{k: np.asarray(v, str) for k, v in text.items()},
      "valid": np.arange(self.batch_size) < len(items),
    }


def eval_batches(
  records_dir: str | Path | Sequence[str | Path],
  split: str,
  *,
  batch_size: int,
  image_size: int,
  datasets: Sequence[str] | None = None,
  fake_domains: str | Sequence[str] | None = None,
  faces: str = "all",
  fakes: str = "stored",
  sbi_seed: int = 0,
) -> EvalBatches:
  """The ordered batch plan behind ``eval_iterator`` (``len()`` = number of batches).

  ``faces``: "all" stored faces of a frame (preprocessing keeps every face at least half the
  size of the largest; the frame scores as the max over them) or the "largest" only.
  ``fakes``: the "stored" fakes, or the "sbi" fakes of the split's reals (those with
  landmarks) instead, or "both". ``fake_domains`` restricts the stored fakes
  (``resolve_fake_domains``)."""
  if faces not in EVAL_FACES:
    raise ValueError(f"faces={faces!r}; valid: {', '.join(EVAL_FACES)}")
  if fakes not in EVAL_FAKES:
    raise ValueError(f"fakes={fakes!r}; valid: {', '.join(EVAL_FAKES)}")
  records = Records(records_dir, split)
  meta = records.meta
  keep = records.select(datasets, fake_domains)
  if faces == "largest":
    keep &= meta["face_index"] == 0
  stored = keep if fakes != "sbi" else keep & (meta["label"] == 0)
  indices = [np.flatnonzero(stored)]
  synth = [np.zeros(len(indices[0]), bool)]
  if fakes != "stored":
    reals = np.flatnonzero(keep & (meta["label"] == 0) & meta["has_landmarks"])
    indices.append(reals)
    synth.append(np.ones(len(reals), bool))
  return EvalBatches(
    records, np.concatenate(indices), batch_size, image_size, np.concatenate(synth), sbi_seed
  )


def faceless_media(
  records_dir: str | Path | Sequence[str | Path],
  split: str,
  *,
  datasets: Sequence[str] | None = None,
  fake_domains: str | Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
  """Columns (media_id, label, dataset, domain, reason) of the split's media that gave no face
  record ("no face" found in any frame, or "unreadable"), filtered like ``eval_batches``."""
  cols = Records(records_dir, split).faceless
  keep = np.ones(len(cols["media_id"]), bool)
  if datasets is not None:
    keep &= np.isin(cols["dataset"], list(datasets))
  domains = resolve_fake_domains(fake_domains)
  if domains is not None:
    keep &= (cols["label"] == 0) | np.isin(cols["domain"], list(domains))
  return {k: v[keep] for k, v in cols.items()}


def eval_iterator(
  records_dir: str | Path | Sequence[str | Path],
  split: str,
  *,
  batch_size: int,
  image_size: int,
  datasets: Sequence[str] | None = None,
  fake_domains: str | Sequence[str] | None = None,
  faces: str = "all",
  fakes: str = "stored",
  sbi_seed: int = 0,
  worker_count: int = 0,
  threads: int = 1,
  prefetch: int = 2,
) -> StepIterator:
  """Every item of the ``eval_batches`` plan exactly once, in record order (videos contiguous):
  ``{"image" uint8[B,S,S,3], "label" int32, "media_id"/"dataset"/"domain" str,
  "frame_index"/"face_index" int32, "valid" bool}``. The last batch is padded to ``batch_size``
  with ``valid`` False (label/frame/face -1, empty strings, black images)."""
  batches = eval_batches(
    records_dir,
    split,
    batch_size=batch_size,
    image_size=image_size,
    datasets=datasets,
    fake_domains=fake_domains,
    faces=faces,
    fakes=fakes,
    sbi_seed=sbi_seed,
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
