"""FaceForensics++ (Rössler et al., ICCV 2019) in its official download layout.

    <root>/original_sequences/youtube/{raw,c23,c40}/videos/XXX.mp4                 1000 reals
    <root>/manipulated_sequences/<M>/{raw,c23,c40}/videos/<target>_<source>.mp4   1000 per M
    <root>/manipulated_sequences/<M>/masks/videos/<target>_<source>.mp4           (optional)
    <root>/splits/{train,val,test}.json   (or directly <root>/{train,val,test}.json)

M is one of Deepfakes, Face2Face, FaceSwap, NeuralTextures and FaceShifter. All five are the
default: CS-DFD trains on 1,000 real and 5,000 fake videos of these five (paper Sec. V-A).
``manipulations="four"`` gives the original FF++ paper's four (no FaceShifter), the protocol of
many earlier detectors; a list or a "+"-joined string names any subset.

The official split files (github.com/ondyari/FaceForensics, dataset/splits) list pairs of
ids [a, b]: 360/70/70 pairs = 720/140/140 real videos. A real XXX belongs to the split whose
pairs contain XXX; a fake a_b (or b_a) to the split containing the pair {a, b}. Every id and
every fake named by a split file but absent on disk is counted as missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from csdfd_jax.data.layouts.base import (
  FAKE,
  REAL,
  SPLITS,
  LayoutIndex,
  MediaRecord,
  finish,
  list_videos,
  read_json,
  require_dir,
  require_file,
)

DATASET = "ffpp"
MANIPULATIONS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter")
# Named protocols: "five" (CS-DFD Sec. V-A, the default) and "four" (the FF++ paper's methods).
PROTOCOLS = {"five": MANIPULATIONS, "four": MANIPULATIONS[:4]}
DEFAULT_MANIPULATIONS = PROTOCOLS["five"]


def resolve_manipulations(spec: str | Sequence[str]) -> tuple[str, ...]:
  """Manipulation names of a protocol name ("five", "four"), a "+"/","-joined string or a list."""
  if isinstance(spec, str):
    if spec in PROTOCOLS:
      return PROTOCOLS[spec]
    spec = [m for m in spec.replace(",", "+").split("+") if m]
  return tuple(spec)


COMPRESSIONS = ("raw", "c23", "c40")


def normalise_compression(compression: str) -> str:
  """ "c0" is the paper's name for the "raw" folder."""
  c = "raw" if compression == "c0" else compression
  if c not in COMPRESSIONS:
    raise ValueError(f"compression must be one of {COMPRESSIONS} (or c0), got {compression!r}")
  return c


def load_splits(root: Path, splits_dir: str | None = None) -> dict[frozenset[str], str]:
  """{frozenset({a, b}): split} from the official train/val/test.json pair lists."""
  candidates = [Path(splits_dir)] if splits_dir is not None else [root / "splits", root]
  where = next((d for d in candidates if (d / "train.json").is_file()), None)
  if where is None:
    tried = " or ".join(str(d.absolute()) for d in candidates)
    raise FileNotFoundError(
      f"FaceForensics++: the official split files train.json, val.json, test.json were "
      f"expected in {tried}; get them from github.com/ondyari/FaceForensics "
      f"(dataset/splits) or pass splits_dir="
    )
  pairs: dict[frozenset[str], str] = {}
  owner: dict[str, str] = {}
  for split in SPLITS:
    path = require_file(where / f"{split}.json", "FaceForensics++ split file")
    for pair in read_json(path, "FaceForensics++ split file"):
      if len(pair) != 2:
        raise ValueError(f"{path}: expected [a, b] id pairs, found {pair!r}")
      for vid in pair:
        if owner.setdefault(str(vid), split) != split:
          raise ValueError(f"{path}: id {vid} is in both {owner[str(vid)]} and {split}")
      pairs[frozenset(map(str, pair))] = split
  return pairs


def masks_dir(root: Path, manipulation: str) -> Path:
  return root / "manipulated_sequences" / manipulation / "masks" / "videos"


def index(
  root: str,
  *,
  compression: str = "c23",
  manipulations: str | tuple[str, ...] | list[str] | None = None,
  splits_dir: str | None = None,
  masks: bool = True,
) -> LayoutIndex:
  """Indexes FF++ reals and the selected manipulations at one compression level.

  Args:
    root: the FaceForensics++ folder (holding original_sequences/ and manipulated_sequences/).
    compression: "c23" (default, the paper's setting), "c40", or "raw"/"c0".
    manipulations: the fake methods to include: default all five (those absent on disk are
      noted, not fatal); "four" for the FF++ paper's four; an explicitly named one must exist.
    splits_dir: folder of the official train/val/test.json (default <root>/splits, then <root>).
    masks: attach ``mask_path`` where manipulated_sequences/<M>/masks/videos has the video.
  """
  top = require_dir(root, "FaceForensics++ root")
  comp = normalise_compression(compression)
  real_dir = require_dir(
    top / "original_sequences" / "youtube" / comp / "videos",
    f"FaceForensics++ real videos at compression {comp}",
  )
  pair_split = load_splits(top, splits_dir)
  id_split = {vid: split for pair, split in pair_split.items() for vid in pair}
  records, missing, notes = [], [], []

  found = {p.stem: p for p in list_videos(real_dir)}
  unsplit = sorted(set(found) - set(id_split))
  for vid, path in found.items():
    if vid in id_split:
      records.append(
        MediaRecord(f"real/{vid}", str(path), REAL, id_split[vid], DATASET, "real", "video")
      )
  missing += [str(real_dir / f"{vid}.mp4") for vid in sorted(set(id_split) - set(found))]

  explicit = manipulations is not None and not (
    isinstance(manipulations, str) and manipulations in PROTOCOLS
  )
  chosen = DEFAULT_MANIPULATIONS if manipulations is None else resolve_manipulations(manipulations)
  for m in chosen:
    if m == "DeepFakeDetection":
      raise ValueError("DeepFakeDetection is its own dataset: use the 'dfd' layout")
    if m not in MANIPULATIONS:
      raise ValueError(f"unknown FF++ manipulation {m!r}; valid: {MANIPULATIONS}")
    fake_dir = top / "manipulated_sequences" / m / comp / "videos"
    if not fake_dir.is_dir():
      if explicit:
        require_dir(fake_dir, f"FaceForensics++ {m} videos at compression {comp}")
      notes.append(f"{m}: no folder {fake_dir}; not included")
      continue
    fakes = {p.stem: p for p in list_videos(fake_dir)}
    mask_videos = {p.stem: p for p in list_videos(masks_dir(top, m))} if masks else {}
    for name, path in fakes.items():
      parts = name.split("_")
      split = pair_split.get(frozenset(parts)) if len(parts) == 2 else None
      if split is None:
        unsplit.append(f"{m}/{name}")
        continue
      mask = mask_videos.get(name)
      records.append(
        MediaRecord(
          f"{m}/{name}",
          str(path),
          FAKE,
          split,
          DATASET,
          m,
          "video",
          mask_path=None if mask is None else str(mask),
        )
      )
    for pair in pair_split:
      a, b = sorted(pair)
      missing += [str(fake_dir / f"{n}.mp4") for n in (f"{a}_{b}", f"{b}_{a}") if n not in fakes]
  present = {p.name for p in (top / "manipulated_sequences").glob("*") if p.is_dir()}
  skipped = sorted(present & set(MANIPULATIONS) - set(chosen))
  if skipped:
    notes.append(f"present but not selected (pass manipulations=...): {', '.join(skipped)}")
  if unsplit:
    notes.append(
      f"{len(unsplit)} videos in no official split, skipped (e.g. {', '.join(unsplit[:3])})"
    )
  return finish(DATASET, records, missing, notes)
