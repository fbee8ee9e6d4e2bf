"""End to end: train.py's loop for every method on tiny demo records, eval reading the
checkpoint, bitwise resume after SIGKILL, and data parallelism over 8 devices in one
process and over two processes (jax.distributed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from csdfd_jax import eval_lib, train_lib
from csdfd_jax.data import builder, demo
from csdfd_jax.data import store as store_lib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import effnet  # noqa: E402


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> str:
  base = tmp_path_factory.mktemp("demo")
  store = demo.make_demo_store(base / "store", size=64, train=4, val=2, test=2, unseen=2, frames=2)
  # A test video in which no frame had a face: eval counts it and scores it 0.5 (or drops it).
  writer = store_lib.StoreWriter(store)
  writer.save_media(dataset="demo", media_id="dark", label=1, split="test", domain="gan")
  writer.finish()
  return str(builder.build_records(store, base / "records"))


# The end-to-end tests train the main command's tiny ResNet (configs/demo.py: one basic block
# per stage, 8-64 channels) rather than configs/effnet.py:demo's tiny EfficientNet: the loop,
# checkpoints, resume and sharding do not depend on the backbone, and on a 2-core CPU XLA
# compiles its train step about 4x faster (11 s against 40 s). EfficientNet's own forward and
# gradient are tested against timm (test_efficientnet).
TINY_MODEL = {"name": "resnet", "variant": "tiny"}
TINY_MODEL_FLAGS = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]


def tiny_config(records: str, method: str, steps: int = 2):
  config = effnet.get_config("demo")
  config.model.update(TINY_MODEL)
  config.method = method
  config.data.demo = False
  config.data.records = records
  config.data.image_size = 32
  config.data.batch_size = 4
  config.train.num_steps = steps
  config.train.log_every = 1
  config.train.eval_every = steps
  config.train.checkpoint_every = 1
  config.train.eval_batch_size = 8
  return config


def saved_params(workdir: str, step: int | None = None, sub: str = "checkpoints"):
  mngr = ocp.CheckpointManager(os.path.join(workdir, sub), item_names=("state", "data"))
  step = step if step is not None else mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return state


# csdfd runs in bfloat16 here (the GPU setting); the resume and data-parallel tests run it in
# float32. O+S and csdfd (which
# holds both uvs and cgr) run by default; O, S, uvs and cgr alone, whose steps test_methods
# checks, run under -m slow.
@pytest.mark.parametrize(
  "method, dtype",
  [pytest.param(m, "float32", marks=pytest.mark.slow) for m in ("O", "S", "uvs", "cgr")]
  + [("O+S", "float32"), ("csdfd", "bfloat16")],
)
def test_every_method_trains_and_eval_reads_its_checkpoint(records, tmp_path, method, dtype):
  workdir = str(tmp_path / "run")
  config = tiny_config(records, method)
  config.model.dtype = dtype
  if method == "S":  # model selection on SBI fakes of the validation reals: no O information
    config.train.select, config.data.val_fakes = "best", "sbi"
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["end_step"] == 2 and summary["steps_run"] == 2
  # Compute dtype only: parameters, statistics and optimizer state stay float32.
  state = saved_params(workdir)
  floats = [x for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.floating)]
  assert floats and all(np.asarray(x).dtype == np.float32 for x in floats)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss/total"] for r in rows if "loss/total" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  streams = {"O": ["o"], "S": ["s"]}.get(method, ["o", "s"])
  assert all(f"loss/{s}" in rows[0] for s in streams)
  if method in ("uvs", "csdfd"):
    assert "uvs_weight/0" in rows[0]
  if method in ("cgr", "csdfd"):
    assert "cgr_correction_ratio" in rows[0]
  sets = [
    eval_lib.TestSet("demo", records, "test", ("demo",)),
    eval_lib.TestSet("demo_unseen", records, "test", ("demo_unseen",)),
  ]
  runs, paths = eval_lib.evaluate([workdir], sets, str(tmp_path / "eval"), gradcam=False)
  assert runs[0]["step"] == 2 and runs[0]["sets"]["demo"]["data"]["faces"] > 0
  # config.train.select="last" (the default): no best checkpoint kept, eval reads the last one.
  best = os.path.join(workdir, "best")
  has_best = os.path.isdir(best) and any(n.isdigit() for n in os.listdir(best))
  selected = "best" if method == "S" else "last"
  assert runs[0]["which"] == runs[0]["protocol"]["checkpoint"] == selected
  assert has_best == (method == "S") and summary["select"] == selected
  if method == "S":
    assert summary["best_val_video_auc"] is not None and summary["val_fakes"] == "sbi"
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      assert any('"val/video_auc"' in line for line in f)
  data = runs[0]["sets"]["demo"]["data"]
  assert data["videos_without_face"] == {"no face": 1} and data["videos_without_face_scored"] == 1
  assert data["fake_domains"] == ["gan"]
  if method == "O":
    dropped, _ = eval_lib.evaluate(
      [workdir], sets, str(tmp_path / "eval2"), no_face="drop", gradcam=False
    )
    d = dropped[0]["sets"]["demo"]["data"]
    assert d["videos"] == data["videos"] - 1 and d["videos_without_face_scored"] == 0
    assert dropped[0]["protocol"]["no_face"] == "drop"
  # The table files carry exactly the JSON's numbers (video AUC in %, target average).
  with open(paths["json"]) as f:
    saved = json.load(f)["runs"][0]["sets"]
  aucs = [saved[n]["video"]["auc"] * 100 for n in ("demo", "demo_unseen")]
  with open(paths["csv"]) as f:
    header, row = [line.strip().split(",") for line in f]
  assert header[3:] == ["demo", "demo_unseen", "avg (targets)"]
  assert row[3:] == [f"{aucs[0]:.2f}", f"{aucs[1]:.2f}", f"{aucs[1]:.2f}"]
  with open(paths["md"]) as f:
    md = f.read()
  assert f"| {aucs[0]:.2f} | {aucs[1]:.2f} |" in md
  assert f"checkpoint {selected} (step 2" in md and "videos without a face: chance" in md
  assert "1 videos without a face (1 scored 0.5)" in md
  with open(paths["tex"]) as f:
    assert f"{aucs[0]:.2f} & {aucs[1]:.2f}" in f.read()
  # GM-DF's EER table (P_real 0.5: the plain video EER) and M_EER over the target sets.
  from csdfd_jax import metrics

  videos = {n: saved[n]["videos"] for n in ("demo", "demo_unseen")}
  eers = [100 * metrics.equal_error_rate(v["label"], v["score"])[0] for v in videos.values()]
  assert f"| {eers[0]:.2f} | {eers[1]:.2f} | {eers[1]:.2f} | {eers[1]:.2f} |" in md
  with open(paths["json"]) as f:
    eer_table = json.load(f)["eer"]
  assert eer_table["p_real"] == 0.5 and eer_table["header"][-1] == "M_EER (targets)"


def train_command(workdir, records, *, steps, batch, checkpoint_every, extra=()) -> list[str]:
  """train.py on the demo config shrunk to the test records (32 px, csdfd)."""
  return [
    sys.executable,
    str(ROOT / "train.py"),
    f"--config={ROOT / 'configs' / 'effnet.py'}:demo",
    f"--workdir={workdir}",
    "--config.method=csdfd",
    *TINY_MODEL_FLAGS,
    "--config.data.demo=False",
    f"--config.data.records={records}",
    "--config.data.image_size=32",
    f"--config.data.batch_size={batch}",
    f"--config.train.num_steps={steps}",
    "--config.train.log_every=1",
    f"--config.train.eval_every={steps}",
    f"--config.train.checkpoint_every={checkpoint_every}",
    "--config.train.eval_batch_size=8",
    *extra,
  ]


def test_a_run_killed_mid_way_resumes_bitwise(records, tmp_path):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))

  def command(workdir, steps=6):
    return train_command(workdir, records, steps=steps, batch=4, checkpoint_every=1)

  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(command(straight), check=True, env=env, cwd=ROOT, capture_output=True)

  proc = subprocess.Popen(
    command(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if (killed / "checkpoints" / "3").is_dir():
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "summary.json").exists()

  done = subprocess.run(command(killed), env=env, cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads((killed / "summary.json").read_text())
  assert summary["start_step"] >= 3 and summary["end_step"] == 6

  a, b = saved_params(str(straight), 6), saved_params(str(killed), 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


EIGHT_DEVICES = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from configs import effnet
from csdfd_jax import eval_lib, train_lib
assert jax.device_count() == 8, jax.devices()
out = {}
for n in (1, 8):
  config = effnet.get_config("demo")
  config.model.name, config.model.variant = "resnet", "tiny"
  config.method = "csdfd"
  config.data.demo = False
  config.data.records = sys.argv[2]
  config.data.image_size = 32
  config.data.batch_size = 8
  config.train.num_steps = 2
  config.train.eval_every = 2
  config.train.checkpoint_every = 2
  config.train.eval_batch_size = 8
  config.train.num_devices = n
  config.optim.name = "sgd"  # adam's m/sqrt(v) would amplify reduction-order noise in ~0 grads
  config.optim.learning_rate = 0.05
  train_lib.train_and_evaluate(config, f"{sys.argv[3]}/run{n}")
  _, _, variables, step = eval_lib.load_run(f"{sys.argv[3]}/run{n}", "last")
  assert step == 2
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  np.savez(f"{sys.argv[3]}/run{n}.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
"""


def free_port() -> int:
  import socket

  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_data_parallel_over_devices_and_processes_matches_one_device(records, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  script = tmp_path / "eight.py"
  script.write_text(EIGHT_DEVICES)
  done = subprocess.run(
    [sys.executable, str(script), str(ROOT), records, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  one, eight = np.load(tmp_path / "run1.npz"), np.load(tmp_path / "run8.npz")
  assert sorted(one.files) == sorted(eight.files) and len(one.files) > 10
  for key in one.files:
    np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=2e-6, err_msg=key)

  # The same run as two processes of 4 devices each (jax.distributed over gloo on CPU):
  # each process reads its half of every batch; checkpoints hold both loader positions.
  workdir = tmp_path / "two_processes"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  extra = [
    "--config.optim.name=sgd",
    "--config.optim.learning_rate=0.05",
    "--distributed",
    f"--coordinator_address=localhost:{free_port()}",
    "--num_processes=2",
  ]
  command = train_command(workdir, records, steps=2, batch=8, checkpoint_every=2, extra=extra)
  procs = [
    subprocess.Popen(
      [*command, f"--process_id={i}"],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["devices"] == 8 and summary["end_step"] == 2
  assert np.isfinite(summary["val"]["video_auc"])
  data = workdir / "checkpoints" / "2" / "data"
  positions = sorted(f.name for f in data.glob("process_*"))
  assert positions == ["process_0-of-2.json", "process_1-of-2.json"]
  positions = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
  assert positions[0] != positions[1]  # each process's own shard

  _, _, variables, step = eval_lib.load_run(str(workdir), "last")
  assert step == 2
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  assert sorted(jax.tree_util.keystr(p) for p, _ in flat) == sorted(one.files)
  for path, x in flat:
    key = jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(x), one[key], rtol=2e-4, atol=2e-6, err_msg=key)


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
  records, tmp_path
):
  config = tiny_config(records, "O+S", steps=4)
  config.optim.name = "sgd"
  config.optim.learning_rate = 1e30  # step 1 has lr 0 (warm-up), step 2 overflows
  config.optim.warmup_steps = 2
  workdir = str(tmp_path / "run")
  with pytest.raises(train_lib.TrainingError, match="non-finite loss or update at step 2") as e:
    train_lib.train_and_evaluate(config, workdir)
  assert "Last good checkpoint: step 1" in str(e.value)
  state = saved_params(workdir)
  assert int(state["step"]) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_a_divergence_that_stays_finite_is_caught_by_the_loss_bound(records, tmp_path):
  """At a huge learning rate the logits explode but stay finite: the loss bound names the step
  (this used to run on until validation failed with non-finite scores, naming nothing)."""
  config = tiny_config(records, "O", steps=6)
  config.optim.learning_rate = 1e3
  config.optim.warmup_steps = 0
  config.train.max_loss = 20.0
  with pytest.raises(train_lib.TrainingError, match="loss above config.train.max_loss=20.0"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))


def test_mistyped_config_key_fails_with_the_valid_keys(tmp_path):
  done = subprocess.run(
    [
      sys.executable,
      str(ROOT / "train.py"),
      f"--config={ROOT / 'configs' / 'effnet.py'}:demo",
      f"--workdir={tmp_path}",
      "--config.optim.learnig_rate=0.1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert done.returncode != 0
  assert "learnig_rate" in done.stderr and "learning_rate" in done.stderr


@pytest.mark.parametrize(
  "flag, expected",
  [
    ("--config.optim.learnig_rate=0.1", 'Did you mean "learning_rate"'),
    (f"--config={ROOT / 'configs' / 'nope.py'}", "No such file or directory"),
  ],
)
def test_config_errors_are_one_line_not_a_traceback(tmp_path, flag, expected):
  args = [f"--config={ROOT / 'configs' / 'effnet.py'}:demo", f"--workdir={tmp_path}", flag]
  done = subprocess.run(
    [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True
  )
  assert done.returncode != 0 and expected in done.stderr
  assert "Traceback" not in done.stderr, done.stderr


def test_missing_data_is_a_clear_error(tmp_path):
  config = effnet.get_config()
  with pytest.raises(ValueError, match="config.data.records"):
    train_lib.train_and_evaluate(config, str(tmp_path))
