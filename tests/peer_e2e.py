"""The peer methods' end-to-end check: train a tiny run through the normal loop, score it with
``eval_lib`` and ``predict``, and hand back the logged training rows."""

from __future__ import annotations

import json
import os

import numpy as np

from csdfd_jax import eval_lib, predict, train_lib


def train_eval_predict(config, records: str, tmp_path) -> tuple[list[dict], predict.Predictor]:
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(config, workdir)
  steps = config.train.num_steps
  assert summary["end_step"] == steps
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"loss/total"' in line]
  assert len(rows) == steps and all(np.isfinite(r["loss/total"]) for r in rows)
  sets = [eval_lib.TestSet("demo", records, "test", ("demo",))]
  runs, _ = eval_lib.evaluate([workdir], sets, str(tmp_path / "eval"), gradcam=False)
  assert runs[0]["step"] == steps and runs[0]["method"] == config.method
  predictor = predict.Predictor.from_run(workdir, "last", batch_size=2)
  size = config.data.image_size
  faces = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
  scores = predictor.score_faces(faces)
  assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
  return rows, predictor
