"""One run per workdir; what a resume may change; the whole run's bookkeeping after a resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_train import tiny_config

from csdfd_jax import train_lib
from csdfd_jax import workdir as workdir_lib
from csdfd_jax.data import builder, demo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _held_by(workdir, pid: int) -> None:
  with open(os.path.join(workdir, workdir_lib.LOCK), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": pid, "started": time.time()}, f)


def test_a_busy_workdir_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _held_by(tmp_path, sleeper.pid)
    with pytest.raises(workdir_lib.WorkdirError, match=f"process {sleeper.pid}"):
      with workdir_lib.lock(str(tmp_path)):
        pass
  finally:
    sleeper.kill()
    sleeper.wait()
  _held_by(tmp_path, sleeper.pid)  # its process is gone: a killed run's lock
  with workdir_lib.lock(str(tmp_path)):
    with open(tmp_path / workdir_lib.LOCK) as f:
      assert json.load(f)["pid"] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirError, match="in use"):  # and now it is busy
      with workdir_lib.lock(str(tmp_path)):
        pass
  assert not (tmp_path / workdir_lib.LOCK).exists()


def test_trim_log_drops_the_rows_a_resume_logs_again(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 4, 3)))
  kept = workdir_lib.trim_log(str(path), 2)
  assert [r["step"] for r in kept] == [1, 2]
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> str:
  base = tmp_path_factory.mktemp("workdir")
  store = demo.make_demo_store(base / "store", size=64, train=4, val=2, test=2, unseen=2, frames=2)
  return str(builder.build_records(store, base / "records"))


def tiny(records: str, steps: int):
  config = tiny_config(records, "csdfd", steps)
  config.train.eval_every = config.train.checkpoint_every = 2
  config.train.select = "best"
  return config


def test_a_resume_refuses_another_run_and_records_compatible_changes(records, tmp_path):
  workdir = str(tmp_path / "run")
  first = train_lib.train_and_evaluate(tiny(records, 2), workdir)
  other = tiny(records, 4)
  other.method = "O+S"
  with pytest.raises(workdir_lib.WorkdirError, match="method: 'csdfd' -> 'O\\+S'"):
    train_lib.train_and_evaluate(other, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["method"] == "csdfd"  # not rewritten by the refused resume
  longer = tiny(records, 4)
  longer.optim.learning_rate = 1e-3
  summary = train_lib.train_and_evaluate(longer, workdir)
  with open(os.path.join(workdir, workdir_lib.HISTORY)) as f:
    (change,) = [json.loads(line) for line in f]
  assert change["resumed_at_step"] == 2
  assert change["changed"] == {"optim.learning_rate": [2e-3, 1e-3], "train.num_steps": [2, 4]}
  assert [(s["start"], s["end"]) for s in summary["segments"]] == [(0, 2), (2, 4)]
  best_first = first["best_val_video_auc"]
  assert summary["best_val_video_auc"] >= best_first  # the whole run's best, not the segment's
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss/total"' in line]
  assert steps == [1, 2, 3, 4]


def test_an_unwritable_workdir_is_one_clear_error(records, tmp_path):
  """(As root, permission bits do not stop writes: a path under a file stands in for them.)"""
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(workdir_lib.WorkdirError, match="cannot write to the workdir"):
    train_lib.train_and_evaluate(tiny(records, 2), str(blocker / "run"))


def test_a_failed_checkpoint_save_stops_training_with_one_line(records, tmp_path, monkeypatch):
  """A full disk: the first failing save stops the run, naming the folder and the cause (it
  used to run on for 10 steps and bury ENOSPC in ~1,850 lines of tracebacks)."""
  import errno

  from csdfd_jax import checkpoints

  def full_disk(mngr, step, *args, **kwargs):
    raise RuntimeError("orbax wrapper") from OSError(errno.ENOSPC, "No space left on device", "x")

  monkeypatch.setattr(checkpoints, "save", full_disk)
  with pytest.raises(train_lib.TrainingError) as e:
    train_lib.train_and_evaluate(tiny(records, 4), str(tmp_path / "run"))
  message = str(e.value)
  assert "saving the checkpoint of step 2" in message and "No space left on device" in message
  assert "\n" not in message


def test_a_run_from_before_a_config_key_existed_resumes_and_a_new_value_is_refused(tmp_path):
  """data.demo_grain and demo_fingerprint came later: a config.json without them reads as
  holding 1.0 (what those runs did), so it resumes; another value is another run."""
  config = tiny("", 2)
  config.data.demo_grain = config.data.demo_fingerprint = 1.0  # what runs did before the keys
  saved = json.loads(config.to_json_best_effort())
  for key in workdir_lib.ADDED_KEYS:
    section, name = key.split(".")
    del saved[section][name]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert workdir_lib.check_resume(str(tmp_path), config, 2, record=False) == {}
  config.data.demo_grain = 2.5
  with pytest.raises(workdir_lib.WorkdirError, match="data.demo_grain: 1.0 -> 2.5"):
    workdir_lib.check_resume(str(tmp_path), config, 2, record=False)
