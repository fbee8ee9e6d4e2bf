"""Detection metrics (scikit-learn underneath) and frame -> video aggregation.

Conventions (DeepfakeBench's, made explicit): label 1 = fake, score = fake probability.
A frame's score is the max over its faces (one manipulated face makes a frame fake); a
video's score is the mean over its frames. Video ids are always passed explicitly, never
inferred from file names.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
  """(EER, threshold): the operating point where FPR = FNR, linearly interpolated
  between the two ROC points that bracket the crossing of FNR - FPR."""
  fpr, tpr, thresholds = roc_curve(labels, scores)
  fnr = 1.0 - tpr
  diff = fnr - fpr  # decreasing from 1 to <= 0 along the curve
  i = int(np.argmax(diff <= 0))
  if i == 0 or diff[i] == 0:
    return float(fpr[i]), float(thresholds[i])
  t = diff[i - 1] / (diff[i - 1] - diff[i])
  eer = fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
  lo, hi = thresholds[i - 1], thresholds[i]
  threshold = lo + t * (hi - lo) if np.isfinite(lo) else hi
  return float(eer), float(threshold)


def prior_error_rate(labels: np.ndarray, scores: np.ndarray, p_real: float = 0.5) -> float:
  """GM-DF's EER with the prior P = ``p_real`` (its "P_real parameter"; the paper gives no
  formula, ``../shared/notes/peers.md`` 3.4 item 20): EER_P = P FRR(t*) + (1 - P) FAR(t*) at the
  threshold t* where P FRR(t) = (1 - P) FAR(t), FRR = reals scored fake (the FPR, label 1 =
  fake), FAR = fakes passed as real (the FNR); linearly interpolated between the two ROC points
  that bracket the crossing, as ``equal_error_rate``. P = 0.5 gives exactly the EER."""
  if not 0.0 < p_real < 1.0:
    raise ValueError(f"p_real must be in (0, 1), got {p_real}")
  fpr, tpr, _ = roc_curve(labels, scores)
  fnr = 1.0 - tpr
  diff = (1.0 - p_real) * fnr - p_real * fpr  # decreasing along the curve
  i = int(np.argmax(diff <= 0))
  if i == 0 or diff[i] == 0:
    return float(p_real * fpr[i] + (1.0 - p_real) * fnr[i])
  t = diff[i - 1] / (diff[i - 1] - diff[i])
  x = fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
  y = fnr[i - 1] + t * (fnr[i] - fnr[i - 1])
  return float(p_real * x + (1.0 - p_real) * y)


def max_error_rate(sets: dict[str, tuple[np.ndarray, np.ndarray]], p_real: float = 0.5) -> float:
  """M_EER (GM-DF, Sec. 4.1): the largest ``prior_error_rate`` over the test sets (name ->
  (labels, scores)). A set with one class has no EER: NaN, and the result is NaN."""
  rates = []
  for name, (labels, scores) in sets.items():
    labels = np.asarray(labels)
    both = labels.size > 0 and labels.min() != labels.max()
    if not both:
      warnings.warn(f"M_EER: test set {name!r} holds one class, so M_EER is NaN", stacklevel=2)
    rates.append(prior_error_rate(labels, scores, p_real) if both else np.nan)
  if not rates:
    raise ValueError("M_EER needs at least one test set")
  return float(np.max(rates))


def binary_metrics(labels: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
  """AUC, AP, EER, accuracy at 0.5 and at the EER threshold; NaN where a metric needs
  both classes and only one is present."""
  labels = np.asarray(labels, np.int64)
  scores = np.asarray(scores, np.float64)
  if labels.shape != scores.shape or labels.ndim != 1:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-D")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} non-finite scores")
  out = {"n": float(labels.size), "n_fake": float(labels.sum())}
  out["acc@0.5"] = float(np.mean((scores >= 0.5) == (labels == 1))) if labels.size else np.nan
  if labels.size == 0 or labels.min() == labels.max():
    return out | {"auc": np.nan, "ap": np.nan, "eer": np.nan, "acc@eer": np.nan}
  eer, threshold = equal_error_rate(labels, scores)
  out["auc"] = float(roc_auc_score(labels, scores))
  out["ap"] = float(average_precision_score(labels, scores))
  out["eer"] = eer
  out["acc@eer"] = float(np.mean((scores >= threshold) == (labels == 1)))
  return out


def aggregate_videos(
  media_ids: Sequence[str],
  frame_indices: Sequence[int],
  labels: Sequence[int],
  scores: Sequence[float],
) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Face scores -> (video ids, video labels, video scores): max over the faces of a
  frame, then mean over the frames of a video. A video whose faces disagree on the
  label is an error (the index is inconsistent)."""
  frames: dict[tuple[str, int], float] = {}
  video_label: dict[str, int] = {}
  for mid, fi, y, s in zip(media_ids, frame_indices, labels, scores, strict=True):
    mid, y = str(mid), int(y)
    if video_label.setdefault(mid, y) != y:
      raise ValueError(f"media {mid!r} has faces labelled both {video_label[mid]} and {y}")
    key = (mid, int(fi))
    frames[key] = max(frames.get(key, -np.inf), float(s))
  per_video: dict[str, list[float]] = {}
  for (mid, _), s in frames.items():
    per_video.setdefault(mid, []).append(s)
  ids = sorted(per_video)
  return (
    ids,
    np.array([video_label[i] for i in ids], np.int64),
    np.array([np.mean(per_video[i]) for i in ids], np.float64),
  )


def resampled_auc(
  labels: np.ndarray, scores: np.ndarray, idx: np.ndarray, chunk: int = 4_000_000
) -> np.ndarray:
  """ROC AUC of every resample ``labels[idx[b]], scores[idx[b]]`` at once: [B] for ``idx`` of
  shape [B, m], NaN where a resample holds one class only. The Mann-Whitney form with average
  ranks for ties, which is exactly ``roc_auc_score`` (to float rounding); one call to sklearn
  per resample costs ~10 ms of input checks, which made eval's 1000-sample bootstrap most of its
  time. Works on ``chunk`` elements of ``idx`` at a time (whole rows), so any number of items
  fits in memory."""
  from scipy.stats import rankdata

  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  idx = np.atleast_2d(np.asarray(idx))
  out = np.empty(idx.shape[0])
  step = max(1, chunk // max(idx.shape[1], 1))
  for start in range(0, idx.shape[0], step):
    rows = idx[start : start + step]
    fake = labels[rows] == 1
    ranks = rankdata(scores[rows], method="average", axis=1)
    n1 = fake.sum(axis=1).astype(np.float64)
    n0 = rows.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
      auc = ((ranks * fake).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    out[start : start + step] = np.where((n1 > 0) & (n0 > 0), auc, np.nan)
  return out


def bootstrap_auc(
  labels: np.ndarray, scores: np.ndarray, *, samples: int = 1000, seed: int = 0, level=0.95
) -> tuple[float, float]:
  """Percentile bootstrap confidence interval of the AUC (resampling items; a resample with
  one class only is left out)."""
  labels, scores = np.asarray(labels), np.asarray(scores)
  idx = np.random.default_rng(seed).integers(0, labels.size, (samples, labels.size))
  aucs = resampled_auc(labels, scores, idx)
  aucs = aucs[np.isfinite(aucs)]
  if not aucs.size:
    return np.nan, np.nan
  alpha = (1 - level) / 2
  return float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1 - alpha))
