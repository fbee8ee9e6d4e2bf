"""Frame reading: N frames sampled uniformly over a whole video, still images, folders of frames.

Videos are decoded sequentially with OpenCV: `grab()` advances the decoder and only the wanted
frames are converted with `retrieve()`. Seeking (`CAP_PROP_POS_FRAMES`) jumps to the previous key
frame and decodes forward from there for every sample, several times slower for the 8-32 samples we
take.

Frame indices follow SBI's and DeepfakeBench's `np.linspace(0, n - 1, num, dtype=int)` (first and
last frame included), computed from the real number of frames. The container's frame count
(CAP_PROP_FRAME_COUNT) is only a hint: when it is missing or zero a counting pass finds the real
count; when the stream ends before it (truncated file) or goes on after it, the count is corrected
and the indices are drawn again over the real frames. A file that cannot be opened or has no
decodable frame raises `UnreadableMedia`, which the preprocessing CLI counts and reports.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Largest image decoded (pixels): a 1 MB PNG of 20000 x 20000 px would take ~1.9 GB of memory.
MAX_PIXELS = 100_000_000
KINDS = ("video", "image", "frames")


class UnreadableMedia(Exception):
  """A video, image or frame folder that cannot be decoded (missing, truncated, corrupt, empty)."""


@dataclasses.dataclass
class SampledFrames:
  """Frames read from one media item.

  Attributes:
    indices: frame index of each returned frame (position in the video; 0 for an image).
    frames: uint8 [H, W, 3] RGB arrays, one per index.
    frame_count: number of frames in the media (decoded count when the container's was wrong).
    reported_count: frame count stated by the container (-1 when it states none).
    wanted: number of indices sampled (frames that could not be retrieved are absent from `frames`).
  """

  indices: list[int]
  frames: list[np.ndarray]
  frame_count: int
  reported_count: int
  wanted: int


def uniform_indices(total: int, num: int) -> list[int]:
  """`num` frame indices spread uniformly over [0, total - 1], both ends included, no repeats."""
  if total <= 0 or num <= 0:
    return []
  return sorted(set(np.linspace(0, total - 1, num).astype(np.int64).tolist()))


def _open(path: str | os.PathLike) -> cv2.VideoCapture:
  if not Path(path).is_file():
    raise UnreadableMedia(f"{path}: no such file")
  cap = cv2.VideoCapture(str(path))
  if not cap.isOpened():
    raise UnreadableMedia(f"{path}: OpenCV cannot open it (truncated or corrupt video?)")
  return cap


def count_frames(path: str | os.PathLike) -> int:
  """Number of decodable frames, by grabbing every frame (a full decoding pass)."""
  cap = _open(path)
  n = 0
  while cap.grab():
    n += 1
  cap.release()
  return n


def _decode(path: str | os.PathLike, indices: list[int]) -> tuple[dict[int, np.ndarray], int, bool]:
  """Decodes up to max(indices); returns (frames by index, frames grabbed, frames after)."""
  cap = _open(path)
  wanted, frames, position = set(indices), {}, 0
  last = max(indices)
  while position <= last and cap.grab():
    if position in wanted:
      ok, bgr = cap.retrieve()
      if ok and bgr is not None:
        frames[position] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    position += 1
  more = position > last and cap.grab()
  if more:
    position += 1
    while cap.grab():
      position += 1
  cap.release()
  return frames, position, more


def read_video(path: str | os.PathLike, num_frames: int) -> SampledFrames:
  """Samples `num_frames` frames uniformly over the whole video (see module docstring)."""
  cap = _open(path)
  reported = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
  cap.release()
  reported = reported if reported > 0 else -1
  total = reported if reported > 0 else count_frames(path)
  for _ in range(2):
    if total <= 0:
      raise UnreadableMedia(f"{path}: no decodable frame")
    indices = uniform_indices(total, num_frames)
    frames, grabbed, more = _decode(path, indices)
    if (
      grabbed < indices[-1] + 1 or more
    ):  # the stream ends early or goes on: resample on the real count
      total = grabbed
      continue
    break
  if not frames:
    raise UnreadableMedia(f"{path}: none of the {len(indices)} sampled frames could be decoded")
  kept = sorted(frames)
  return SampledFrames(kept, [frames[i] for i in kept], total, reported, len(indices))


def read_video_at(path: str | os.PathLike, indices: list[int]) -> dict[int, np.ndarray]:
  """Frames at given indices of a video (e.g. a mask video aligned with its face video)."""
  if not indices:
    return {}
  return _decode(path, sorted(set(indices)))[0]


def _image_size(path: str | os.PathLike) -> tuple[int, int] | None:
  """(width, height) from the file's header, without decoding it (None: not known)."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as im:
      return im.size
  except (UnidentifiedImageError, OSError, ValueError):
    return None


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file as uint8 RGB [H, W, 3]; UnreadableMedia for a missing, empty, corrupt or
  oversized (> ``MAX_PIXELS``) file."""
  data = np.fromfile(str(path), np.uint8) if Path(path).is_file() else None
  if data is None:
    raise UnreadableMedia(f"{path}: no such file")
  if data.size == 0:
    raise UnreadableMedia(f"{path}: empty file (0 bytes)")
  size = _image_size(path)
  if size is not None and size[0] * size[1] > MAX_PIXELS:
    raise UnreadableMedia(
      f"{path}: {size[0]}x{size[1]} px is above the {MAX_PIXELS:,} pixel cap "
      "(csdfd_jax.data.video.MAX_PIXELS); downscale the image first"
    )
  try:
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
  except cv2.error as e:
    raise UnreadableMedia(f"{path}: not a decodable image ({e.msg.strip() or e})") from None
  if bgr is None:
    raise UnreadableMedia(f"{path}: not a decodable image (truncated or corrupt?)")
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def list_frame_folder(path: str | os.PathLike) -> list[tuple[int, Path]]:
  """(frame index, file) of the images of a folder of frames, in frame order.

  Files named by their frame number (DeepfakeBench's `000.png`, `017.png`, ...) keep that number as
  index; otherwise the index is the position in natural sort order.
  """
  folder = Path(path)
  if not folder.is_dir():
    raise UnreadableMedia(f"{path}: not a folder of frames")
  files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]

  def natural(p: Path) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)]

  files.sort(key=natural)
  if (
    files
    and all(p.stem.isdigit() for p in files)
    and len({int(p.stem) for p in files}) == len(files)
  ):
    return [(int(p.stem), p) for p in files]
  return list(enumerate(files))


def read_frame_folder(path: str | os.PathLike, num_frames: int) -> SampledFrames:
  """Samples `num_frames` images uniformly over a folder of frames; unreadable images skipped."""
  entries = list_frame_folder(path)
  if not entries:
    raise UnreadableMedia(f"{path}: folder has no image")
  positions = uniform_indices(len(entries), num_frames)
  indices, frames = [], []
  for pos in positions:
    index, file = entries[pos]
    try:
      frames.append(read_image(file))
      indices.append(index)
    except UnreadableMedia:
      continue
  if not frames:
    raise UnreadableMedia(f"{path}: none of the sampled images could be decoded")
  return SampledFrames(indices, frames, len(entries), len(entries), len(positions))


def read_media(path: str | os.PathLike, kind: str, num_frames: int) -> SampledFrames:
  """Frames of a media item of the given kind ("video" | "image" | "frames")."""
  if kind == "video":
    return read_video(path, num_frames)
  if kind == "image":
    return SampledFrames([0], [read_image(path)], 1, 1, 1)
  if kind == "frames":
    return read_frame_folder(path, num_frames)
  raise ValueError(f"unknown media kind {kind!r}; expected one of {KINDS}")


def read_frames_at(path: str | os.PathLike, kind: str, indices: list[int]) -> dict[int, np.ndarray]:
  """Frames of a media item at given frame indices (a mask medium aligned with its face medium).

  Indices that the medium does not have are absent from the result.
  """
  if kind == "video":
    return read_video_at(path, indices)
  if kind == "image":
    return {0: read_image(path)} if 0 in indices else {}
  if kind == "frames":
    files = dict(list_frame_folder(path))
    return {i: read_image(files[i]) for i in indices if i in files}
  raise ValueError(f"unknown media kind {kind!r}; expected one of {KINDS}")
