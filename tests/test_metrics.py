"""Metrics on hand-made cases: AUC/AP from scikit-learn, EER by its definition, video
aggregation with explicit ids, frame sub-sampling."""

from __future__ import annotations

import numpy as np
import pytest

from csdfd_jax import metrics


def test_perfect_and_inverted_scores():
  y = np.array([0, 0, 1, 1])
  m = metrics.binary_metrics(y, [0.1, 0.2, 0.8, 0.9])
  assert m["auc"] == 1.0 and m["ap"] == 1.0 and m["eer"] == 0.0 and m["acc@0.5"] == 1.0
  m = metrics.binary_metrics(y, [0.9, 0.8, 0.2, 0.1])
  assert m["auc"] == 0.0 and m["eer"] == 1.0 and m["acc@0.5"] == 0.0


def test_eer_is_where_fpr_equals_fnr():
  # reals 0.1, 0.4, 0.6; fakes 0.3, 0.7, 0.9. At a threshold in (0.4, 0.6] one real of
  # three is a false positive and one fake of three a false negative: EER = 1/3.
  y = np.array([0, 0, 0, 1, 1, 1])
  s = np.array([0.1, 0.4, 0.6, 0.3, 0.7, 0.9])
  eer, threshold = metrics.equal_error_rate(y, s)
  assert eer == pytest.approx(1 / 3)
  fpr = np.mean(s[y == 0] >= threshold)
  fnr = np.mean(s[y == 1] < threshold)
  assert fpr == pytest.approx(1 / 3) and fnr == pytest.approx(1 / 3)


def test_eer_interpolates_between_roc_points():
  # 2 reals, 4 fakes where FNR - FPR changes sign between ROC points: the EER lies
  # strictly between their error rates, on the segment joining them.
  y = np.array([0, 0, 1, 1, 1, 1])
  s = np.array([0.2, 0.6, 0.1, 0.5, 0.7, 0.8])
  eer, _ = metrics.equal_error_rate(y, s)
  from sklearn.metrics import roc_curve

  fpr, tpr, _ = roc_curve(y, s)
  fnr = 1 - tpr
  i = int(np.argmax(fnr - fpr <= 0))
  lo, hi = sorted([fpr[i - 1], fpr[i]])
  assert lo <= eer <= hi
  # on the segment, FPR(eer) = FNR(eer)
  t = (eer - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
  assert fnr[i - 1] + t * (fnr[i] - fnr[i - 1]) == pytest.approx(eer)


def test_one_class_gives_nan_not_an_error():
  m = metrics.binary_metrics([1, 1], [0.2, 0.9])
  assert np.isnan(m["auc"]) and m["acc@0.5"] == 0.5


def test_video_aggregation_max_over_faces_mean_over_frames():
  ids = ["v1", "v1", "v1", "v2", "v2"]
  frames = [0, 0, 1, 0, 5]
  labels = [1, 1, 1, 0, 0]
  scores = [0.2, 0.9, 0.5, 0.1, 0.3]
  vids, vl, vs = metrics.aggregate_videos(ids, frames, labels, scores)
  assert vids == ["v1", "v2"]
  np.testing.assert_array_equal(vl, [1, 0])
  np.testing.assert_allclose(vs, [(0.9 + 0.5) / 2, (0.1 + 0.3) / 2])


def test_video_with_conflicting_labels_is_an_error():
  with pytest.raises(ValueError, match="labelled both"):
    metrics.aggregate_videos(["a", "a"], [0, 1], [0, 1], [0.1, 0.2])


def test_bootstrap_interval_contains_the_auc():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 200)
  s = y * 0.5 + rng.normal(0, 0.5, 200)
  lo, hi = metrics.bootstrap_auc(y, s, samples=200)
  auc = metrics.binary_metrics(y, s)["auc"]
  assert lo < auc < hi and hi - lo < 0.3


def test_resampled_auc_is_sklearns_auc_row_by_row():
  """Ties (rounded scores), repeated items, one-class resamples (NaN) and several chunks."""
  from sklearn.metrics import roc_auc_score

  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 30)
  s = np.round(y * 0.4 + rng.normal(0, 0.5, 30), 1)
  idx = rng.integers(0, 30, (300, 30))
  idx[7] = np.flatnonzero(y == 1)[0]  # one item 30 times: a single class
  idx[8, :2] = np.flatnonzero(y == 0)[:2]
  idx[8, 2:] = np.flatnonzero(y == 1)[0]  # two reals and one fake repeated: all ties but two
  want = [roc_auc_score(y[i], s[i]) if y[i].min() != y[i].max() else np.nan for i in idx]
  got = metrics.resampled_auc(y, s, idx)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  assert np.isnan(got[7]) and np.isfinite(got).sum() == 299
  for chunk in (1, 30, 100):  # a row at a time, and 3 rows a chunk with a short last one
    np.testing.assert_array_equal(metrics.resampled_auc(y, s, idx, chunk=chunk), got)


def test_bootstrap_interval_is_the_per_sample_sklearn_loop():
  """The vectorised bootstrap draws the resamples of the loop it replaced, in order."""
  from sklearn.metrics import roc_auc_score

  rng = np.random.default_rng(2)
  y = np.array([0, 0, 0, 0, 1, 1])
  s = y * 0.3 + rng.normal(0, 0.5, 6)
  draws = np.random.default_rng(5)
  loop = []
  for _ in range(400):
    i = draws.integers(0, 6, 6)
    if y[i].min() != y[i].max():
      loop.append(roc_auc_score(y[i], s[i]))
  assert len(loop) < 400  # some resamples of 6 items hold one class and are left out
  lo, hi = metrics.bootstrap_auc(y, s, samples=400, seed=5)
  assert lo == pytest.approx(np.quantile(loop, 0.025), abs=1e-12)
  assert hi == pytest.approx(np.quantile(loop, 0.975), abs=1e-12)


def test_prior_error_rate_on_known_far_frr_curves():
  """Reals uniform on [0, 1), fakes uniform on [0.5, 1.5): FRR(t) = 1 - t, FAR(t) = t - 0.5, so
  P FRR = (1 - P) FAR at t* = 0.5 + P / 2 and EER_P = P (1 - P); P = 0.5 is the EER (0.25).
  (EER_P is not monotone in P: here it peaks at P = 0.5.)"""
  n = 2000
  reals = np.arange(n) / n
  fakes = 0.5 + np.arange(n) / n
  labels = np.r_[np.zeros(n), np.ones(n)]
  scores = np.r_[reals, fakes]
  for p in (0.2, 0.5, 0.7, 0.9):
    assert metrics.prior_error_rate(labels, scores, p) == pytest.approx(p * (1 - p), abs=1e-3)
  eer, _ = metrics.equal_error_rate(labels, scores)
  assert metrics.prior_error_rate(labels, scores, 0.5) == pytest.approx(eer, abs=1e-12)
  with pytest.raises(ValueError, match="p_real"):
    metrics.prior_error_rate(labels, scores, 1.0)


def test_max_error_rate_is_the_worst_test_set():
  rng = np.random.default_rng(0)
  sets = {}
  for name, shift in (("easy", 2.0), ("hard", 0.3)):
    labels = np.r_[np.zeros(300), np.ones(300)]
    sets[name] = (labels, rng.normal(size=600) + shift * labels)
  eers = {k: metrics.equal_error_rate(*v)[0] for k, v in sets.items()}
  assert eers["hard"] > eers["easy"]
  assert metrics.max_error_rate(sets) == pytest.approx(eers["hard"], abs=1e-12)
  one_class = {"reals": (np.zeros(5), rng.random(5))}
  with pytest.warns(UserWarning, match="'reals' holds one class"):
    assert np.isnan(metrics.max_error_rate(sets | one_class))


def test_eval_eer_table_takes_mean_and_max_over_the_targets():
  from csdfd_jax import eval_lib

  rng = np.random.default_rng(1)
  sets = {}
  for name, shift in (("src", 3.0), ("t1", 1.0), ("t2", 0.2)):
    labels = np.r_[np.zeros(200), np.ones(200)].astype(int)
    sets[name] = {
      "videos": {
        "label": labels.tolist(),
        "score": (rng.normal(size=400) + shift * labels).tolist(),
      }
    }
  run = {"workdir": "/x/run", "method": "gmdf", "sets": sets}
  for p in (0.5, 0.3):
    header, (row,) = eval_lib.eer_rows([run], ["src", "t1", "t2"], p)
    assert header == ["run", "method", "src", "t1", "t2", "mean (targets)", "M_EER (targets)"]
    e = [
      100 * metrics.prior_error_rate(np.asarray(s["videos"]["label"]), s["videos"]["score"], p)
      for s in sets.values()
    ]
    assert row == [
      "run",
      "gmdf",
      *(f"{x:.2f}" for x in e),
      f"{np.mean(e[1:]):.2f}",
      f"{max(e[1:]):.2f}",
    ]
