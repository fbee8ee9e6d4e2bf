"""predict on real files: FFHQ photos and DFDC videos from ../shared/data (skipped when absent),
corrupt and face-less files, per face/frame/file aggregation, the JSON/CSV against the printed
table, and the model input against the record pipeline's preprocessing."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from csdfd_jax import predict, train_lib
from csdfd_jax.data import builder, demo
from csdfd_jax.data.faces import FaceExtractor
from csdfd_jax.data.video import read_image
from csdfd_jax.methods.step import create_train_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from test_train import TINY_MODEL  # noqa: E402

from configs import effnet  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FFHQ = DATA / "ffhq_real_384"
DFDC = DATA / "dfdc_sample" / "dfdc_train_part_0"
needs_data = pytest.mark.skipif(
  not (FFHQ.is_dir() and DFDC.is_dir()), reason=f"{FFHQ} or {DFDC} absent"
)


def tiny_config(records: str = ""):
  config = effnet.get_config("demo")
  config.model.update(TINY_MODEL)
  config.data.demo = False
  config.data.records = records
  config.data.image_size = 32
  config.data.batch_size = 4
  config.train.num_steps = 1
  config.train.log_every = config.train.eval_every = config.train.checkpoint_every = 1
  config.train.eval_batch_size = 8
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
  """An initialised run at 32 px in train.py's workdir format (config.json + an orbax
  checkpoint of the train state), without compiling a train step: on the shared 2-core
  machine a one-step train.py run costs minutes. ``test_after_train_py`` covers a real one."""
  workdir = tmp_path_factory.mktemp("predict_run")
  config = tiny_config()
  model = train_lib.build_model(config)
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  variables = jax.jit(lambda r: model.init(r, x, train=False))(jax.random.PRNGKey(3))
  variables = {k: variables[k] for k in ("params", "batch_stats")}
  state = create_train_state(variables, optax.identity(), jax.random.PRNGKey(0))
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data"))
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}))
  mngr.save(1, args=args)
  mngr.wait_until_finished()
  return str(workdir)


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("odd")
  (d / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(4000))
  cv2.imwrite(str(d / "flat.png"), np.full((240, 320, 3), (40, 160, 90), np.uint8))
  (d / "notes.txt").write_text("not media\n")
  return d


@pytest.fixture(scope="module")
def cli(run, odd_files, tmp_path_factory):
  """One CLI run over everything; returns (exit code, stdout, JSON, CSV rows)."""
  out = tmp_path_factory.mktemp("predict_out")
  videos = out / "videos"
  videos.mkdir()
  for name in ("abqwwspghj.mp4", "abofeumbvv.mp4"):
    (videos / name).symlink_to(DFDC / name)
  argv = [
    "--workdir",
    run,
    "--checkpoint",
    "last",
    "--frames",
    "2",
    "--batch_size",
    "4",
    "--json",
    str(out / "p.json"),
    "--csv",
    str(out / "p.csv"),
    str(FFHQ / "ffhq_00000.jpg"),
    str(FFHQ / "ffhq_00007.jpg"),
    str(videos),
    str(odd_files / "corrupt.jpg"),
    str(odd_files / "flat.png"),
    str(odd_files / "notes.txt"),
  ]
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    code = predict.main(argv)
  with open(out / "p.json") as f:
    js = json.load(f)
  with open(out / "p.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  return code, buf.getvalue(), js, rows


def by_name(results):
  return {Path(r["file"]).name: r for r in results}


@needs_data
def test_statuses_and_errors_per_file(cli):
  code, stdout, js, _ = cli
  assert code == 0
  r = by_name(js["files"])
  assert [Path(x["file"]).name for x in js["files"]] == [
    "ffhq_00000.jpg",
    "ffhq_00007.jpg",
    "abofeumbvv.mp4",  # directory expanded in sorted order
    "abqwwspghj.mp4",
    "corrupt.jpg",
    "flat.png",
    "notes.txt",
  ]
  assert r["ffhq_00000.jpg"]["status"] == r["ffhq_00007.jpg"]["status"] == "ok"
  assert r["abqwwspghj.mp4"]["status"] == "ok" and r["abqwwspghj.mp4"]["frames_read"] == 2
  assert r["abofeumbvv.mp4"]["status"] == "no_face"  # too dark for dlib's HOG detector
  assert r["abofeumbvv.mp4"]["frames_read"] == 2 and "no face found" in r["abofeumbvv.mp4"]["error"]
  assert r["corrupt.jpg"]["status"] == "unreadable" and "unreadable" in r["corrupt.jpg"]["error"]
  assert r["flat.png"]["status"] == "no_face"
  assert r["notes.txt"]["status"] == "unsupported" and ".txt" in r["notes.txt"]["error"]
  for name in ("abofeumbvv.mp4", "corrupt.jpg", "flat.png", "notes.txt"):
    assert r[name]["score"] is None and r[name]["verdict"] is None
  assert "3 file(s) scored, 2 with no face found, 1 unreadable, 1 unsupported" in stdout


@needs_data
def test_scores_aggregate_face_to_frame_to_file(cli):
  _, _, js, _ = cli
  for r in js["files"]:
    if r["status"] != "ok":
      assert r["frames"] == [] and r["faces"] == 0
      continue
    assert r["faces"] >= 1 and r["frames_with_face"] == len(r["frames"]) >= 1
    for f in r["frames"]:
      scores = [face["score"] for face in f["faces"]]
      assert all(0.0 <= s <= 1.0 for s in scores)
      assert f["score"] == max(scores)
    assert r["score"] == pytest.approx(np.mean([f["score"] for f in r["frames"]]), abs=1e-12)
    assert r["verdict"] == ("fake" if r["score"] >= 0.5 else "real")
  assert [f["frame_index"] for f in by_name(js["files"])["abqwwspghj.mp4"]["frames"]] == [0, 299]


@needs_data
def test_json_csv_and_printed_table_agree(cli):
  _, stdout, js, rows = cli
  assert [row["file"] for row in rows] == [r["file"] for r in js["files"]]
  printed = {}
  for line in stdout.splitlines():
    parts = line.split()
    if parts and parts[0] in {r["file"] for r in js["files"]}:
      printed[parts[0]] = parts
  assert len(printed) == len(js["files"])
  for r, row in zip(js["files"], rows, strict=True):
    assert row["status"] == r["status"]
    assert int(row["faces"]) == r.get("faces", 0)
    assert int(row["frames_read"]) == r.get("frames_read", 0)
    if r["score"] is None:
      assert row["score"] == "" and printed[r["file"]][4] == "-"
    else:
      assert float(row["score"]) == pytest.approx(r["score"], abs=1e-12)
      assert printed[r["file"]][4] == f"{r['score']:.4f}"
      assert printed[r["file"]][5] == r["verdict"] == row["verdict"]
      assert printed[r["file"]][3] == str(r["faces"])


@pytest.fixture(scope="module")
def predictor3(run) -> predict.Predictor:
  return predict.Predictor.from_run(run, "last", batch_size=3)


@needs_data
def test_model_input_is_the_pipeline_crop(cli, predictor3):
  """Reference built independently: dlib crop -> INTER_AREA resize to 32 px (the record
  pipeline's shrink) -> the checkpoint's model; equals predict's face score."""
  _, _, js, _ = cli
  crops = FaceExtractor().extract(read_image(FFHQ / "ffhq_00000.jpg"))
  assert len(crops) == 1
  size = predictor3.config.data.image_size
  x = cv2.resize(crops[0].image, (size, size), interpolation=cv2.INTER_AREA)[None]
  ref = float(predictor3.score_faces(x)[0])
  got = by_name(js["files"])["ffhq_00000.jpg"]["frames"][0]["faces"][0]["score"]
  assert got == pytest.approx(ref, abs=1e-5)


@needs_data
def test_api_pads_batches_without_recompiling(predictor3, cli):
  _, _, js, _ = cli
  pred = predictor3
  results = pred.predict([FFHQ / "ffhq_00000.jpg", FFHQ / "ffhq_00007.jpg"], frames=1)
  results += pred.predict([FFHQ / "ffhq_00000.jpg"], frames=1)
  assert pred._predict._cache_size() == 1
  expected = by_name(js["files"])
  for r in results:
    assert r["score"] == pytest.approx(expected[Path(r["file"]).name]["score"], abs=1e-5)


@needs_data
def test_exit_code_1_when_nothing_is_scored(run, odd_files, capsys):
  code = predict.main(
    ["--workdir", run, str(odd_files / "flat.png"), str(odd_files / "corrupt.jpg")]
  )
  assert code == 1
  assert "0 file(s) scored, 1 with no face found, 1 unreadable" in capsys.readouterr().out


def test_directories_expand_sorted_and_count_non_media(tmp_path):
  for name in ("b/2.mp4", "a.jpg", "b/1.PNG", "b/readme.md", "c.json"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  files, skipped = predict.expand_paths([tmp_path, tmp_path / "c.json"])
  names = [str(Path(f).relative_to(tmp_path)) for f in files]
  assert names == ["a.jpg", "b/1.PNG", "b/2.mp4", "c.json"] and skipped == 2
  assert [predict.media_kind(f) for f in files] == ["image", "image", "video", None]


def test_missing_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="not a train.py workdir"):
    predict.main(["--workdir", str(tmp_path), "x.jpg"])


@needs_data
@pytest.mark.slow
def test_after_train_py(tmp_path):
  """A real one-step train.py run on demo records, then the CLI as a user runs it."""
  store = demo.make_demo_store(tmp_path / "store", size=64, train=4, val=2, test=2, unseen=2)
  config = tiny_config(str(builder.build_records(store, tmp_path / "records")))
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(config, workdir)
  out = subprocess.run(
    [sys.executable, "-m", "csdfd_jax.predict", "--workdir", workdir, str(FFHQ / "ffhq_00003.jpg")],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr
  assert "1 file(s) scored" in out.stdout and "(step 1," in out.stdout


def test_outputs_and_inputs_are_checked_before_any_scoring(tmp_path):
  """A --json into a missing folder used to fail only after all the scoring (results lost); an
  empty input folder crashed in format_table. Both stop at once, before the run is loaded."""
  empty = tmp_path / "empty"
  empty.mkdir()
  (tmp_path / "a.jpg").write_bytes(b"")
  nowhere = str(tmp_path / "missing" / "out.json")
  with pytest.raises(SystemExit, match="missing does not exist"):
    predict.main(
      ["--workdir", str(tmp_path / "no_run"), "--json", nowhere, str(tmp_path / "a.jpg")]
    )
  with pytest.raises(SystemExit, match="no image or video file in"):
    predict.main(["--workdir", str(tmp_path / "no_run"), str(empty)])
