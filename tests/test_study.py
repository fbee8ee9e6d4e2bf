"""The study command: run plan, aggregation and intervals, and an end-to-end study on the demo
that is killed mid-way, resumed, and whose table is checked against the per-run results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_train import TINY_MODEL_FLAGS

from csdfd_jax import study

ROOT = Path(__file__).resolve().parents[1]


def test_plan_is_seed_major_with_safe_names(tmp_path):
  runs = study.plan(["O+S", "csdfd", "my.pkg:method"], [0, 1], str(tmp_path))
  assert [(r.method, r.seed) for r in runs] == [
    ("O+S", 0), ("csdfd", 0), ("my.pkg:method", 0), ("O+S", 1), ("csdfd", 1), ("my.pkg:method", 1),
  ]  # fmt: skip
  assert [r.name for r in runs[:3]] == ["O+S_seed0", "csdfd_seed0", "my.pkg_method_seed0"]
  assert all(Path(r.path).parent == tmp_path / "runs" for r in runs)
  for methods, seeds, match in (
    (["O", "O"], [0], "listed twice"),
    (["O"], [1, 1], "listed twice"),
    (["a:b", "a/b"], [0], "one run directory"),
    ([], [0], "at least one"),
  ):
    with pytest.raises(ValueError, match=match):
      study.plan(methods, seeds, str(tmp_path))


def _videos(rng, n=40, signal_strength=1.0, ids=None):
  labels = np.array([0, 1] * (n // 2))
  scores = labels * signal_strength + rng.normal(size=n)
  return {
    "media_id": ids or [f"v{i}" for i in range(n)],
    "label": labels.tolist(),
    "score": scores.tolist(),
  }


def test_bootstrap_of_the_seed_mean_is_paired_when_the_test_set_is_shared():
  rng = np.random.default_rng(0)
  a, b = _videos(rng), _videos(rng)
  reps = study.bootstrap_seed_mean([a, b], samples=400, seed=0)
  full = 100 * np.mean([roc_auc_score(v["label"], v["score"]) for v in (a, b)])
  lo, hi = np.quantile(reps, [0.025, 0.975])
  assert lo < full < hi and hi - lo > 1  # an interval around the point estimate
  # Paired: one resample for both seeds. Two identical seeds' mean is then exactly one seed's
  # bootstrap with the same draws; unpaired resampling would average two independent draws.
  twice = study.bootstrap_seed_mean([a, a], samples=200, seed=3)
  once = study.bootstrap_seed_mean([a], samples=200, seed=3)
  np.testing.assert_allclose(twice, once)
  other_ids = dict(a, media_id=[f"w{i}" for i in range(40)])
  unpaired = study.bootstrap_seed_mean([a, other_ids], samples=200, seed=3)
  assert not np.allclose(unpaired, once)
  assert np.std(unpaired) < np.std(once)  # averaging two independent resamples narrows it


def _fake_result(aucs: dict[str, float], videos: dict[str, dict]) -> dict:
  return {"sets": {n: {"video": {"auc": a}, "videos": videos[n]} for n, a in aucs.items()}}


def test_aggregate_cells_spread_and_target_average():
  rng = np.random.default_rng(1)
  names = ["src", "t1", "t2"]
  vids = {n: _videos(rng) for n in names}
  results = {}
  aucs = {("A", 0): (0.9, 0.6, 0.7), ("A", 1): (0.8, 0.5, 0.9), ("A", 2): (0.85, 0.55, 0.8)}
  aucs |= {("B", 0): (0.95, 0.7, 0.75), ("B", 1): (0.97, 0.72, 0.71)}
  for (m, s), values in aucs.items():
    run = study.Run(m, s, f"/x/{m}_seed{s}")
    results[run] = _fake_result(dict(zip(names, values, strict=True)), vids)
  table = study.aggregate(results, samples=50)
  assert table["columns"] == [*names, "avg (targets)"] and table["source"] == "src"
  a, b = table["rows"]
  assert a["method"] == "A" and a["seeds"] == [0, 1, 2] and b["seeds"] == [0, 1]
  assert a["cells"]["src"]["seeds"] == pytest.approx([90, 80, 85])
  assert a["cells"]["src"]["mean"] == pytest.approx(85)
  assert a["cells"]["src"]["std"] == pytest.approx(5)  # 3 seeds: the std
  assert (b["cells"]["t1"]["min"], b["cells"]["t1"]["max"]) == pytest.approx((70, 72))  # 2: range
  assert "std" not in b["cells"]["t1"]
  assert a["cells"]["avg (targets)"]["seeds"] == pytest.approx([65, 70, 67.5])
  text = study.format_cell(a["cells"]["src"])
  assert text.startswith("85.0 ± 5.0 [") and study.format_cell(b["cells"]["t1"]).startswith(
    "71.0 (70.0-72.0) ["
  )
  mixed = dict(results)
  mixed[study.Run("C", 0, "/x/C")] = _fake_result({"src": 0.5, "t1": 0.5}, vids)
  with pytest.raises(ValueError, match="scored on"):
    study.aggregate(mixed, samples=5)


# ----------------------------------------------------------------------------- end to end

# The tiny ResNet of the other end-to-end tests (test_train.TINY_MODEL): XLA compiles its steps
# about 4x faster than the demo's tiny EfficientNet on a 2-core CPU.
OVERRIDES = [
  *TINY_MODEL_FLAGS,
  "--config.data.image_size=32",
  "--config.data.batch_size=4",
  "--config.train.num_steps=12",
  "--config.train.log_every=4",
  "--config.train.checkpoint_every=4",
  "--config.train.eval_every=12",
  "--config.train.eval_batch_size=16",
  "--config.eval.frames_per_video=4",
  "--config.optim.warmup_steps=0",
]


def _study(workdir: Path, *extra: str) -> list[str]:
  return [
    sys.executable, "-m", "csdfd_jax.study", "--config=configs/effnet.py:demo",
    "--methods=O,O+S", "--seeds=0,1", f"--workdir={workdir}", *OVERRIDES, *extra,
  ]  # fmt: skip


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def test_study_end_to_end_killed_and_resumed(tmp_path):
  work = tmp_path / "study"
  runs = work / "runs"
  first, second = runs / "O_seed0", runs / "O+S_seed0"
  log = open(tmp_path / "first.log", "w")
  proc = subprocess.Popen(_study(work), cwd=ROOT, env=_env(), stdout=log, stderr=log)
  deadline = time.monotonic() + 600
  try:
    # Kill it once the first run is scored and the second has a checkpoint but is unfinished.
    while time.monotonic() < deadline and proc.poll() is None:
      # A finished orbax checkpoint is a directory named by its step (a temporary name before).
      ckpts = [p for p in (second / "checkpoints").glob("*") if p.name.isdigit()]
      if (first / "eval" / "results.json").is_file() and ckpts:
        break
      time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  assert not (second / "summary.json").exists()  # killed mid-training
  assert not (work / "study.json").exists()
  first_stamp = (first / "eval" / "results.json").stat().st_mtime_ns

  done = subprocess.run(_study(work), cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  out = done.stdout
  assert "[1/4] O seed 0: done earlier" in out
  assert (first / "eval" / "results.json").stat().st_mtime_ns == first_stamp  # not redone
  summary = json.loads((second / "summary.json").read_text())
  assert summary["start_step"] > 0 and summary["end_step"] == 12  # resumed from its checkpoint
  assert [s["start"] for s in summary["segments"]][0] > 0
  assert "study wall time" in out and "video AUC (%)" in out

  # The table is the per-run results, aggregated.
  table = json.loads((work / "study.json").read_text())
  assert table["columns"] == ["demo", "demo_unseen", "avg (targets)"]
  assert [r["method"] for r in table["rows"]] == ["O", "O+S"]
  for row in table["rows"]:
    per_run = [
      json.loads((runs / f"{row['method']}_seed{s}" / "eval" / "results.json").read_text())
      for s in (0, 1)
    ]
    for name in ("demo", "demo_unseen"):
      aucs = [100 * r["runs"][0]["sets"][name]["video"]["auc"] for r in per_run]
      cell = row["cells"][name]
      assert cell["seeds"] == pytest.approx(aucs)
      assert cell["mean"] == pytest.approx(np.mean(aucs))
      assert (cell["min"], cell["max"]) == pytest.approx((min(aucs), max(aucs)))
      lo, hi = cell["ci95"]
      assert lo <= hi
    avg = row["cells"]["avg (targets)"]
    assert avg["seeds"] == pytest.approx(row["cells"]["demo_unseen"]["seeds"])
  md = (work / "study.md").read_text()
  # legend, results table, diagnostics legend, diagnostics table
  _, results, _, diagnostics = md.split("\n\n")
  assert results.count("\n| ") == 3 and study.format_cell(table["rows"][0]["cells"]["demo"]) in md
  assert [line.split(" | ")[0] for line in results.splitlines()[2:]] == ["| O", "| O+S"]
  assert "stream_cosine" in diagnostics and diagnostics.count("\n| ") == 3
  assert (work / "study.csv").read_text().startswith("method,seeds,demo mean")
  assert "\\begin{tabular}" in (work / "study.tex").read_text()
  assert (work / "curves.png").stat().st_size > 10_000
  assert len(list((work / "data").iterdir())) == 1  # one data build (seed 0) for all runs

  # A third call does nothing but rebuild the table; a changed run setting is refused by name.
  again = subprocess.run(_study(work), cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert again.returncode == 0 and again.stdout.count(": done earlier;") == 4
  assert json.loads((work / "study.json").read_text())["rows"] == table["rows"]
  changed = subprocess.run(
    _study(work, "--config.model.dropout=0.5"), cwd=ROOT, env=_env(), capture_output=True, text=True
  )
  assert changed.returncode == 1 and "model.dropout: 0.0 -> 0.5" in changed.stderr


def test_cli_errors_are_one_line(tmp_path):
  cases = [
    (["--methods=O,nosuchmethod", f"--workdir={tmp_path}"], "nosuchmethod"),
    (["--seeds=0,x", f"--workdir={tmp_path}"], "--seeds"),
    (["--config.train.no_such_key=1", f"--workdir={tmp_path}"], "no_such_key"),
    ([], "--workdir is required"),
  ]
  for args, needle in cases:
    cmd = [sys.executable, "-m", "csdfd_jax.study", "--config=configs/effnet.py:demo", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 1 and needle in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_diagnostics_keep_method_scalars_and_drop_generic_ones(tmp_path):
  runs = []
  for seed, scale in ((0, 1.0), (1, 3.0)):
    path = tmp_path / f"uvs_seed{seed}"
    path.mkdir()
    rows = [
      {
        "step": 10 * (i + 1),
        "loss/total": 1.0,
        "loss/o": scale * (10 - i),
        "loss/s": 0.7,
        "stream_cosine": -0.1 * scale,
        "uvs_weight/0": 0.25,
        "grad_norm/o": 5.0,
        "learning_rate": 1e-3,
        "images_per_second": 9.0,
      }  # fmt: skip
      for i in range(10)
    ]
    rows.insert(3, {"step": 40, "val/video_auc": 0.9})  # validation rows are not training rows
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs.append(study.Run("uvs", seed, str(path)))
  one = study.run_diagnostics(runs[0])
  assert set(one) == {"loss/o", "loss/s", "stream_cosine", "uvs_weight/0"}
  assert one["loss/o"] == {"mean": pytest.approx(5.5), "last": pytest.approx(1.0)}
  both = study.method_diagnostics(runs)
  assert both["loss/o"]["last"] == pytest.approx(2.0) and both["stream_cosine"]["mean"] == (
    pytest.approx(-0.2)
  )
  table = {"rows": [{"method": "uvs", "diagnostics": both}]}
  lines = study.diagnostics_lines(table)
  assert lines[2].startswith("| method | loss/o (last) | loss/s (last) | stream_cosine (mean)")
  assert lines[-1] == "| uvs | 2 | 0.7 | -0.2 | 0.25 |"


@pytest.mark.slow  # four compiles of the peers' steps: about 5 minutes on 2 loaded cores
def test_study_runs_every_peer_method(tmp_path):
  """SAM, RoGA, GR and DualFlat through the study command: one seed each, a few steps, each
  scored and tabulated, with the method's own scalars in the diagnostics table. (Each peer's
  own end-to-end test, train + eval + predict, is in the default suite: test_roga, test_gr.)"""
  peers = ["sam", "roga", "gr", "dualflat"]
  work = tmp_path / "study"
  short = [o for o in OVERRIDES if "num_steps" not in o and "_every" not in o] + [
    "--config.train.num_steps=2",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=2",
    "--config.gr.streams=o,s",
  ]
  cmd = [
    sys.executable, "-m", "csdfd_jax.study", "--config=configs/effnet.py:demo",
    f"--methods={','.join(peers)}", "--seeds=0", f"--workdir={work}", *short,
  ]  # fmt: skip
  done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  table = json.loads((work / "study.json").read_text())
  assert [r["method"] for r in table["rows"]] == peers
  for row in table["rows"]:
    results = json.loads(
      (work / "runs" / f"{row['method']}_seed0" / "eval" / "results.json").read_text()
    )
    assert results["runs"][0]["method"] == row["method"] and results["runs"][0]["step"] == 2
    auc = 100 * results["runs"][0]["sets"]["demo"]["video"]["auc"]
    assert row["cells"]["demo"]["seeds"] == pytest.approx([auc])
  diagnostics = {r["method"]: r["diagnostics"] for r in table["rows"]}
  own = {
    "sam": ["sam/eps_norm", "loss/perturbed/s"],
    "roga": ["roga/align/o", "roga/cos/s", "loss/perturbed/o"],
    "gr": ["pim/sensitivity/o", "pim/loss_gap/s"],
    "dualflat": ["pim/sensitivity/s", "pim/loss_sam_gap/o"],
  }
  for method, keys in own.items():
    for key in keys:
      assert np.isfinite(diagnostics[method][key]["mean"]), (method, key, diagnostics[method])
  # SAM's eps and RoGA's per-domain eps have the configured norm (0.05 and 0.1).
  assert diagnostics["sam"]["sam/eps_norm"]["mean"] == pytest.approx(0.05, rel=1e-3)
  assert diagnostics["roga"]["roga/eps_norm/o"]["mean"] == pytest.approx(0.1, rel=1e-3)
  md = (work / "study.md").read_text()
  assert "roga/align/o (mean)" in md and "pim/sensitivity/o (mean)" in md
