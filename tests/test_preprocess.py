"""Frame sampling on videos written here, and the preprocessing CLI end to end on real data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from csdfd_jax.data import preprocess, video
from csdfd_jax.data.faces import FaceConfig
from csdfd_jax.data.layouts.base import MediaRecord
from csdfd_jax.data.store import done_media, read_index, read_media_headers
from csdfd_jax.data.video import UnreadableMedia

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FFHQ = DATA / "ffhq_real_384"
STYLEGAN = DATA / "stylegan2_fake_384"
DFDC = DATA / "dfdc_sample"
needs_ffhq = pytest.mark.skipif(not FFHQ.is_dir(), reason=f"{FFHQ} absent")

BITS = 8  # frame i shows its index in binary: 8 vertical stripes, white where the bit is set


def numbered_frame(i: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
  """A BGR frame whose stripes spell `i` in binary (robust to lossy codecs, unlike a grey level)."""
  w, h = size
  frame = np.zeros((h, w, 3), np.uint8)
  for bit in range(BITS):
    if i >> bit & 1:
      frame[:, bit * w // BITS : (bit + 1) * w // BITS] = 255
  return frame


def frame_number(frame: np.ndarray) -> int:
  w = frame.shape[1]
  stripes = [frame[:, b * w // BITS + 2 : (b + 1) * w // BITS - 2].mean() for b in range(BITS)]
  return sum(1 << b for b, v in enumerate(stripes) if v > 127)


def frame_numbers(frames: list[np.ndarray]) -> list[int]:
  return [frame_number(f) for f in frames]


def write_video(path: Path, n: int, fourcc: str = "mp4v", size: tuple[int, int] = (64, 48)) -> Path:
  """A video whose frame i shows the number i (see `numbered_frame`)."""
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25, size)
  assert writer.isOpened()
  for i in range(n):
    writer.write(numbered_frame(i, size))
  writer.release()
  return path


def truncate(path: Path, fraction: float) -> Path:
  out = path.with_name(f"cut_{path.name}")
  data = path.read_bytes()
  out.write_bytes(data[: int(len(data) * fraction)])
  return out


# ---- frame sampling ----


@pytest.mark.parametrize("n,num", [(60, 7), (50, 8), (10, 10), (5, 9), (1, 4)])
def test_uniform_indices_match_linspace(n, num):
  expected = sorted(set(np.linspace(0, n - 1, num).astype(int).tolist()))
  assert video.uniform_indices(n, num) == expected
  assert expected[0] == 0 and expected[-1] == n - 1


@pytest.mark.parametrize("fourcc,ext", [("mp4v", "mp4"), ("MJPG", "avi")])
def test_video_sampling_is_uniform_and_reads_the_right_frames(tmp_path, fourcc, ext):
  path = write_video(tmp_path / f"v.{ext}", 60, fourcc)
  sampled = video.read_video(path, 7)
  assert sampled.indices == [0, 9, 19, 29, 39, 49, 59]
  assert frame_numbers(sampled.frames) == sampled.indices
  assert sampled.frame_count == 60 and sampled.wanted == 7
  assert sampled.frames[0].shape == (48, 64, 3) and sampled.frames[0].dtype == np.uint8
  # more frames asked than the video has: every frame once
  assert video.read_video(path, 100).indices == list(range(60))
  # the aligned reader used for mask videos gives the same frames
  at = video.read_video_at(path, [3, 40])
  assert frame_numbers([at[3], at[40]]) == [3, 40]


def test_truncated_mp4_is_unreadable(tmp_path):
  cut = truncate(write_video(tmp_path / "v.mp4", 60), 0.6)  # mp4v puts its index at the end
  with pytest.raises(UnreadableMedia, match="cut_v.mp4"):
    video.read_video(cut, 4)


def test_empty_and_oversized_images_are_unreadable_not_fatal(tmp_path, monkeypatch):
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")  # cv2.imdecode asserts on an empty buffer
  with pytest.raises(UnreadableMedia, match="empty file"):
    video.read_image(empty)
  big = tmp_path / "big.png"
  cv2.imwrite(str(big), np.zeros((30, 40, 3), np.uint8))
  monkeypatch.setattr(video, "MAX_PIXELS", 1000)  # a 20000 x 20000 PNG, scaled down
  with pytest.raises(UnreadableMedia, match="40x30 px is above the 1,000 pixel cap"):
    video.read_image(big)
  monkeypatch.setattr(video, "MAX_PIXELS", 1200)
  assert video.read_image(big).shape == (30, 40, 3)


def test_truncated_avi_is_sampled_over_its_decodable_frames(tmp_path):
  """The header still says 60 frames; the stream ends early: indices are drawn again."""
  cut = truncate(write_video(tmp_path / "v.avi", 60, "MJPG"), 0.5)
  sampled = video.read_video(cut, 5)
  assert sampled.reported_count == 60 and 0 < sampled.frame_count < 60
  assert sampled.indices == video.uniform_indices(sampled.frame_count, 5)
  assert frame_numbers(sampled.frames) == sampled.indices


def test_missing_frame_count_falls_back_to_counting(tmp_path):
  """A raw MJPEG stream has no container frame count (OpenCV reports a negative number)."""
  path = tmp_path / "v.mjpeg"
  with path.open("wb") as f:
    for i in range(40):
      f.write(cv2.imencode(".jpg", numbered_frame(i))[1].tobytes())
  assert cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT) <= 0
  sampled = video.read_video(path, 5)
  assert sampled.reported_count == -1 and sampled.frame_count == video.count_frames(path) == 40
  assert sampled.indices == [0, 9, 19, 29, 39] and frame_numbers(sampled.frames) == sampled.indices


def test_empty_and_corrupt_files_are_unreadable(tmp_path):
  (tmp_path / "empty.mp4").write_bytes(b"")
  (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
  with pytest.raises(UnreadableMedia):
    video.read_video(tmp_path / "empty.mp4", 4)
  with pytest.raises(UnreadableMedia, match="no such file"):
    video.read_media(tmp_path / "absent.mp4", "video", 4)
  with pytest.raises(UnreadableMedia, match="not a decodable image"):
    video.read_media(tmp_path / "noise.jpg", "image", 1)
  (tmp_path / "no_frames").mkdir()
  with pytest.raises(UnreadableMedia, match="no image"):
    video.read_media(tmp_path / "no_frames", "frames", 4)
  with pytest.raises(UnreadableMedia, match="none of the sampled images"):
    video.read_media(tmp_path, "frames", 4)  # noise.jpg only


def test_frame_folder_keeps_frame_numbers(tmp_path):
  for i in (0, 10, 20, 30, 40):
    cv2.imwrite(str(tmp_path / f"{i:03d}.png"), numbered_frame(i))
  sampled = video.read_media(tmp_path, "frames", 3)
  assert sampled.indices == [0, 20, 40] and frame_numbers(sampled.frames) == [0, 20, 40]
  assert video.read_frames_at(tmp_path, "frames", [10, 11]).keys() == {10}


# ---- preprocessing end to end ----


def _ffhq_folder(tmp_path: Path, reals: int, fakes: int = 0) -> Path:
  """A generic real/ + fake/ layout holding links to the first FFHQ / StyleGAN2 images."""
  root = tmp_path / "ffhq_folder"
  for cls, src, n in (("real", FFHQ, reals), ("fake", STYLEGAN, fakes)):
    (root / cls).mkdir(parents=True)
    for p in sorted(src.glob("*.jpg"))[:n]:
      (root / cls / p.name).symlink_to(p)
  return root


@needs_ffhq
def test_unreadable_media_are_retried_on_request_after_a_repair(tmp_path):
  root = _ffhq_folder(tmp_path, 2)
  broken = root / "real" / "broken.jpg"
  broken.write_bytes(b"")  # a 0-byte download
  args = ["--dataset", "folder", "--root", str(root), "--frames", "1", "--no-progress"]
  out = ["--out", str(tmp_path / "store")]
  assert preprocess.main([*args, *out]) == 0
  status = {h["media_id"]: h["status"] for h in read_media_headers(tmp_path / "store")}
  assert list(status.values()).count("unreadable") == 1
  broken.unlink()
  broken.symlink_to(sorted(FFHQ.glob("*.jpg"))[5])  # repaired
  assert preprocess.main([*args, *out]) == 0  # a plain rerun skips what is committed
  assert [h["status"] for h in read_media_headers(tmp_path / "store")].count("unreadable") == 1
  assert preprocess.main([*args, *out, "--retry-unreadable"]) == 0
  assert {h["status"] for h in read_media_headers(tmp_path / "store")} == {"ok"}
  assert len(read_index(tmp_path / "store")) == 3


def _index_lines(store: Path) -> list[str]:
  return (store / "index.jsonl").read_text().splitlines()


@needs_ffhq
def test_folder_of_images_end_to_end_and_resume(tmp_path):
  root = _ffhq_folder(tmp_path, 4, 2 if STYLEGAN.is_dir() else 0)
  bad = root / "real" / "zz_broken.jpg"
  bad.write_bytes((FFHQ / "ffhq_00009.jpg").read_bytes()[:300])
  store = tmp_path / "store"
  summary = preprocess.run("folder", str(root), str(store), frames=4, progress=False)
  media = 5 + (2 if STYLEGAN.is_dir() else 0)
  last = summary["last_run"]
  assert last["processed"] == media and last["unreadable"] == 1 and last["skipped_done"] == 0
  records = read_index(store)
  assert (
    len(records) == last["faces"] == summary["faces"] >= media - 1 - last["frames_without_face"]
  )
  for r in records:
    image = cv2.imread(str(store / r.path))
    assert image.shape == (256, 256, 3) and r.frame_index == 0 and r.face_index == 0
    lm = np.array(r.landmarks)
    assert lm.shape == (68, 2) and (lm > 0).all() and (lm < 256).all()
    assert r.label == (r.media_id.startswith("fake/")) and r.split == "test"
    assert r.domain == ("fake" if r.label else "real") and r.dataset == "ffhq_folder"
  assert summary["unreadable"][0]["media_id"] == "real/zz_broken"
  saved = json.loads((store / "summary.json").read_text())
  assert saved["faces"] == summary["faces"] and saved["last_run"]["processed"] == media

  before = _index_lines(store)
  again = preprocess.run("folder", str(root), str(store), frames=4, progress=False)["last_run"]
  assert again["processed"] == 0 and again["skipped_done"] == media and again["faces"] == 0
  assert _index_lines(store) == before

  with pytest.raises(preprocess.StoreMismatch, match="size"):
    preprocess.run("folder", str(root), str(store), config=FaceConfig(size=128), progress=False)


@pytest.mark.skipif(not DFDC.is_dir(), reason=f"{DFDC} absent")
def test_dfdc_videos_end_to_end(tmp_path, capsys):
  store = tmp_path / "store"
  code = preprocess.main(
    ["--dataset", "dfdc", "--root", str(DFDC), "--out", str(store), "--frames", "2",
     "--workers", "1", "--no-progress"]
  )  # fmt: skip
  assert code == 0
  table = capsys.readouterr().out
  summary = json.loads((store / "summary.json").read_text())
  last = summary["last_run"]
  # the sample's metadata lists 5 videos, 2 are present
  assert last["processed"] == 2 and last["missing_from_index"] == 3
  assert last["frames_read"] == 4 and summary["frames_sampled"] == 4
  assert last["faces"] + last["frames_without_face"] == 4
  records = read_index(store)
  assert {r.media_id for r in records} <= {"abofeumbvv", "abqwwspghj"}
  # abqwwspghj shows a frontal face throughout: both sampled frames (first and last) have it
  assert sorted(r.frame_index for r in records if r.media_id == "abqwwspghj") == [0, 299]
  for r in records:
    assert r.label == 1 and r.split == "train" and r.dataset == "dfdc"
    assert cv2.imread(str(store / r.path)).shape == (256, 256, 3)
    lm = np.array(r.landmarks)
    assert (lm > 0).all() and (lm < 256).all()
    assert lm[36:48, 1].mean() < lm[48:68, 1].mean()  # eyes above mouth
  for line in ("frames without a face", "faces written", "files missing from the index"):
    assert line in table
  assert "aagfhgtpmv.mp4" in table  # a missing file is named


@needs_ffhq
def test_masks_are_cropped_with_their_face(tmp_path):
  image = tmp_path / "face.png"
  mask = tmp_path / "mask.png"
  rgb = video.read_image(FFHQ / "ffhq_00000.jpg")
  cv2.imwrite(str(image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  m = np.zeros(rgb.shape[:2], np.uint8)
  m[:, 192:] = 255  # right half of the photo
  cv2.imwrite(str(mask), m)
  record = MediaRecord("face", str(image), 1, "train", "t", "x", "image", mask_path=str(mask))
  from csdfd_jax.data.faces import FaceExtractor
  from csdfd_jax.data.store import StoreWriter

  extractor = FaceExtractor()
  stats = preprocess.process_media(record, extractor, StoreWriter(tmp_path / "s"), 1)
  assert stats["faces"] == 1
  StoreWriter(tmp_path / "s").finish()
  (r,) = read_index(tmp_path / "s")
  crop_mask = cv2.imread(str(tmp_path / "s" / r.mask_path), cv2.IMREAD_GRAYSCALE)
  (det,) = extractor.detect(rgb)
  from csdfd_jax.data.faces import crop_square, to_crop_coords

  x0, y0, side = crop_square(det.landmarks, extractor.config.scale, extractor.config.shift)
  (edge,) = to_crop_coords(np.array([[191.5, 0.0]]), x0, y0, side, 256)[:, :1]
  cols = np.flatnonzero(crop_mask[128] > 127)
  assert abs(cols[0] - edge[0]) <= 1.5 and cols[-1] >= 250


def test_clear_errors(tmp_path, capsys):
  def err(*args: str) -> str:
    assert preprocess.main(["--out", str(tmp_path / "s"), "--no-progress", *args]) == 2
    return capsys.readouterr().err

  unknown = err("--dataset", "nope", "--root", str(tmp_path))
  assert "valid names" in unknown and "ffpp" in unknown
  option = err("--dataset", "dfdc", "--root", str(tmp_path), "--option", "colour=1")
  assert "colour" in option and "its options" in option
  assert "does not exist" in err("--dataset", "dfdc", "--root", str(tmp_path / "absent"))
  message = err("--dataset", "dfdc", "--root", str(tmp_path), "--predictor", "/nope.dat")
  assert "/nope.dat" in message and "pip install face-recognition-models" in message


def _children(pid: int) -> list[int]:
  out = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(stat.parent.name))
  return out


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


@needs_ffhq
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_a_sigkilled_parent(tmp_path):
  """Only the parent is killed (not its process group): its workers must not hang on."""
  root = _ffhq_folder(tmp_path, 16)
  args = ["--dataset", "folder", "--root", str(root), "--frames", "1", "--no-progress"]
  out = tmp_path / "out"
  proc = subprocess.Popen(
    [sys.executable, "-m", "csdfd_jax.data.preprocess", *args, "--out", str(out), "--workers=2"],
    cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
  )  # fmt: skip
  deadline = time.monotonic() + 120
  while len(done_media(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  workers = _children(proc.pid)
  assert workers, "no worker process found"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  deadline = time.monotonic() + 20
  while any(map(_alive, workers)) and time.monotonic() < deadline:
    time.sleep(0.1)
  survivors = [w for w in workers if _alive(w)]
  for w in survivors:
    os.kill(w, signal.SIGKILL)
  assert not survivors, f"workers {survivors} outlived their parent"


@needs_ffhq
def test_killed_run_resumes_to_the_same_index(tmp_path):
  """SIGKILL mid-run (main process and workers), rerun, compare with a clean run."""
  root = _ffhq_folder(tmp_path, 16)
  args = ["--dataset", "folder", "--root", str(root), "--frames", "1", "--no-progress"]
  killed = tmp_path / "killed"
  proc = subprocess.Popen(
    [sys.executable, "-m", "csdfd_jax.data.preprocess", *args, "--out", str(killed), "--workers=2"],
    cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
  )  # fmt: skip
  deadline = time.monotonic() + 120
  while len(done_media(killed)) < 3 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  partial = len(done_media(killed))
  assert 3 <= partial < 16, "the run was not killed mid-way"
  assert not (killed / "index.jsonl").exists()
  resumed = preprocess.run("folder", str(root), str(killed), frames=1, progress=False)["last_run"]
  assert resumed["skipped_done"] >= partial and resumed["processed"] == 16 - resumed["skipped_done"]
  clean = tmp_path / "clean"
  preprocess.run("folder", str(root), str(clean), frames=1, progress=False)
  assert _index_lines(killed) == _index_lines(clean)
  for line in _index_lines(clean):
    rel = json.loads(line)["path"]
    assert (killed / rel).read_bytes() == (clean / rel).read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(not DFDC.is_dir(), reason=f"{DFDC} absent")
def test_dfdc_with_worker_processes(tmp_path):
  store = tmp_path / "store"
  summary = preprocess.run("dfdc", str(DFDC), str(store), frames=8, workers=2, progress=False)
  assert summary["last_run"]["processed"] == 2 and summary["frames_read"] == 16
  solo = preprocess.run("dfdc", str(DFDC), str(tmp_path / "solo"), frames=8, progress=False)
  assert (
    _index_lines(store) == _index_lines(tmp_path / "solo") and solo["faces"] == summary["faces"]
  )


def _dies_on_b(record: MediaRecord) -> tuple[MediaRecord, dict]:
  """A task that kills its own worker process for media "b" (as a decoder segfault would)."""
  if record.media_id == "b":
    os.kill(os.getpid(), signal.SIGKILL)
  time.sleep(0.2)
  return record, {"status": "ok", "pid": os.getpid()}


def _no_init() -> None:
  pass


def test_a_worker_crash_is_pinned_on_its_medium():
  records = [MediaRecord(i, f"/{i}.mp4", 0, "test", "t", "real", "video") for i in "abcd"]
  results = dict(
    (r.media_id, out) for r, out in preprocess.in_processes(records, _dies_on_b, 2, _no_init, ())
  )
  assert sorted(results) == list("abcd")
  assert results["b"]["status"] == preprocess.CRASHED and "died" in results["b"]["error"]
  assert all(results[i]["status"] == "ok" for i in "acd")
