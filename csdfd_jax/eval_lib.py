"""Scoring trained runs on test sets, the papers' tables, and plots.

``evaluate(workdirs, test_sets, out_dir)`` scores every run (a ``train.py`` workdir) on
every test set, face- and video-level (a frame's score is the max over its faces, a video's
the mean over its frames, at most ``frames_per_video`` frames spaced uniformly over those
available), and writes ``results.{md,csv,tex,json}``: one row per run with the video AUC per
dataset and the average over the target domains (paper Table I; several runs side by side
give Tables II/III), plus ROC curves and, from each run's ``metrics.jsonl``, the per-stream
loss and stream-cosine curves (the paper's Fig. 2/5 conflict view).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from csdfd_jax import checkpoints, metrics
from csdfd_jax.data import pipeline, protocols
from csdfd_jax.models import detector


@dataclass(frozen=True)
class TestSet:
  name: str
  records: str
  split: str = "test"
  datasets: tuple[str, ...] | None = None  # restrict to these `dataset` fields of the records
  # restrict the fakes to these domains: "five"/"four" (FF++ protocols) or "A+B"; None = all
  fake_domains: str | None = None


def parse_test_sets(spec: str) -> list[TestSet]:
  """``"name=records_dir[:split][@dataset+dataset][#domains],..."`` -> TestSets (first =
  source). ``#four`` scores FF++ without FaceShifter, ``#five`` requires all five methods."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    if "=" not in item:
      raise ValueError(f"test set {item!r}: expected name=records_dir[:split][@datasets][#domains]")
    name, rest = item.split("=", 1)
    rest, _, domains = rest.partition("#")
    rest, _, ds = rest.partition("@")
    records, _, split = rest.partition(":")
    out.append(
      TestSet(name, records, split or "test", tuple(ds.split("+")) if ds else None, domains or None)
    )
  return out


def _setting(config: ml_collections.ConfigDict, key: str, default: Any) -> Any:
  """``config.<key>``, or ``default`` for a run whose config.json predates the key."""
  node = config
  for part in key.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def protocol(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The evaluation protocol's open choices (paper silent) as a run's config sets them."""
  return {
    "checkpoint": _setting(config, "train.select", "best"),
    "val_fakes": _setting(config, "data.val_fakes", "original"),
    "frames_per_video": _setting(config, "eval.frames_per_video", 32),
    "faces_per_frame": _setting(config, "eval.faces_per_frame", "largest"),
    "no_face": _setting(config, "eval.no_face", "drop"),
    "train_frames": _setting(config, "data.train_frames", 0),
    "train_fake_domains": _setting(config, "data.fake_domains", "") or "all",
  }


def default_test_sets(config: ml_collections.ConfigDict, workdir: str) -> list[TestSet]:
  """The config's test sets; for the demo, its source and unseen-manipulation test splits."""
  if config.eval.test_sets:
    return parse_test_sets(config.eval.test_sets)
  if config.data.demo:
    records = protocols.locate(config, workdir)
    return [
      TestSet("demo", records, "test", ("demo",)),
      TestSet("demo_unseen", records, "test", ("demo_unseen",)),
    ]
  if config.data.mini_root:
    records = protocols.locate(config, workdir)
    return [
      TestSet("ffhq_mini", records, "test", ("ffhq_mini",)),
      TestSet("ffhq_swap", records, "test", ("ffhq_swap",)),
      TestSet("dfdc_sample", records, "test", ("dfdc_sample",)),
    ]
  raise ValueError("no test sets: set --config.eval.test_sets=name=records_dir[:split],...")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} is not a train.py workdir (no config.json)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, which: str | None = None):
  """(config, model, variables, step) of a train.py workdir; ``which`` is "best", "last"
  or a step number (None: the run's ``config.train.select``; "best" falls back to "last" when
  the run kept no best checkpoint). The variables come back on this process's first device,
  so a run trained on many devices or hosts is read on one."""
  config = load_config(workdir)
  which = which or _setting(config, "train.select", "best")
  sub = "best" if which == "best" else "checkpoints"
  steps = checkpoints.steps(os.path.join(workdir, sub))
  if not steps:
    if which == "best":
      return load_run(workdir, "last")
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, sub)}")
  step = max(steps) if which in ("best", "last") else int(which)
  if step not in steps:
    raise FileNotFoundError(f"step {step} not in {sub}: available {sorted(steps)}")
  state = checkpoints.read_state(os.path.join(workdir, sub), step)
  model = detector.build(config)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return config, model, variables, step


def score_split(
  predict,
  variables,
  records: str,
  split: str,
  mesh,
  datasets=None,
  *,
  batch_size: int,
  image_size: int,
  fake_domains=None,
  faces: str = "all",
  fakes: str = "stored",
  sbi_seed: int = 0,
):
  """Runs ``predict`` (jitted with replicated outputs) over every face of ``split`` (the
  ``pipeline.eval_batches`` plan); returns face-level arrays, the same on every process."""
  sharding = NamedSharding(mesh, P("data"))
  out = {"media_id": [], "frame_index": [], "label": [], "domain": [], "score": []}
  for batch in pipeline.eval_iterator(
    records,
    split,
    batch_size=batch_size,
    image_size=image_size,
    datasets=datasets,
    fake_domains=fake_domains,
    faces=faces,
    fakes=fakes,
    sbi_seed=sbi_seed,
  ):
    # Every process reads the whole split and feeds its devices their rows; ``predict``
    # returns the scores replicated, so every process holds all of them.
    host = batch["image"]
    images = jax.make_array_from_callback(host.shape, sharding, lambda index, a=host: a[index])
    scores = np.asarray(predict(variables, images))
    valid = np.asarray(batch["valid"], bool)
    for k in ("media_id", "frame_index", "label", "domain"):
      out[k].extend(np.asarray(batch[k])[valid].tolist())
    out["score"].extend(scores[valid].tolist())
  return {k: np.asarray(v) for k, v in out.items()}


def face_and_video_auc(scored: dict) -> dict[str, float]:
  face = metrics.binary_metrics(scored["label"], scored["score"])
  _, vl, vs = metrics.aggregate_videos(
    scored["media_id"], scored["frame_index"], scored["label"], scored["score"]
  )
  video = metrics.binary_metrics(vl, vs)
  return {"frame_auc": face["auc"], "video_auc": video["auc"], "n_faces": face["n"]}


def subsample_frames(scored: dict, frames_per_video: int) -> dict:
  """Keeps at most ``frames_per_video`` frames per video, spaced uniformly over the
  frames present (``pipeline.uniform_frames``; not the first N: DeepfakeBench's known bias)."""
  keep = pipeline.uniform_frames(scored["media_id"], scored["frame_index"], frames_per_video)
  return {k: v[keep] for k, v in scored.items()}


def used_checkpoint(workdir: str, which: str | None) -> str:
  """What ``load_run(workdir, which)`` reads: "best", "last" or a step number."""
  which = which or _setting(load_config(workdir), "train.select", "best")
  best = os.path.join(workdir, "best")
  has_best = os.path.isdir(best) and any(n.isdigit() for n in os.listdir(best))
  return "last" if which == "best" and not has_best else which


def score_run(
  workdir, test_sets, *, which=None, frames_per_video=None, batch_size=None, faces=None,
  no_face=None,
):  # fmt: skip
  """Scores one run on every test set. ``frames_per_video``, ``faces`` (per frame: "all" or
  "largest") and ``no_face`` ("chance": videos where no face was found score 0.5, SBI's rule;
  "drop") default to the run's ``config.eval``; the results record every value used."""
  used = used_checkpoint(workdir, which)
  config, model, variables, step = load_run(workdir, used)
  settings = protocol(config)
  frames_per_video = frames_per_video or settings["frames_per_video"]
  faces = faces or settings["faces_per_frame"]
  no_face = no_face or settings["no_face"]
  if no_face not in ("chance", "drop"):
    raise ValueError(f"no_face={no_face!r}; valid: chance, drop")
  settings |= {
    "checkpoint": used,
    "frames_per_video": frames_per_video,
    "faces_per_frame": faces,
    "no_face": no_face,
  }
  batch_size = batch_size or config.train.eval_batch_size
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(AxisType.Auto,))
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  predict = jax.jit(detector.predict_fn(model), out_shardings=NamedSharding(mesh, P()))
  results = {}
  for ts in test_sets:
    scored = score_split(
      predict,
      variables,
      ts.records,
      ts.split,
      mesh,
      ts.datasets,
      batch_size=batch_size,
      image_size=config.data.image_size,
      fake_domains=ts.fake_domains,
      faces=faces,
    )
    scored = subsample_frames(scored, frames_per_video)
    frame = metrics.binary_metrics(scored["label"], scored["score"])
    ids, vl, vs = metrics.aggregate_videos(
      scored["media_id"], scored["frame_index"], scored["label"], scored["score"]
    )
    faceless = pipeline.faceless_media(
      ts.records, ts.split, datasets=ts.datasets, fake_domains=ts.fake_domains
    )
    if no_face == "chance" and len(faceless["media_id"]):
      ids = [*ids, *faceless["media_id"].tolist()]
      vl = np.concatenate([vl, faceless["label"].astype(np.int64)])
      vs = np.concatenate([vs, np.full(len(faceless["label"]), 0.5)])
    video = metrics.binary_metrics(vl, vs)
    video["auc_ci95"] = metrics.bootstrap_auc(vl, vs)
    domains = sorted({d for d, y in zip(scored["domain"], scored["label"], strict=True) if y})
    results[ts.name] = {
      "frame": frame,
      "video": video,
      "data": {
        "records": ts.records,
        "split": ts.split,
        "datasets": ts.datasets,
        "fake_domains": domains,
        "faces": int(len(scored["label"])),
        "videos": len(ids),
        "videos_without_face": {
          r: int(np.sum(faceless["reason"] == r)) for r in sorted(set(faceless["reason"]))
        },
        "videos_without_face_scored": int(len(faceless["media_id"])) if no_face == "chance" else 0,
      },
      "roc": _roc(vl, vs),
      # Per-video scores (faceless videos included as scored): what the study's pooled
      # bootstrap over seeds resamples, and what a user needs to re-analyse a run.
      "videos": {"media_id": list(ids), "label": vl.tolist(), "score": vs.tolist()},
    }
  return {
    "workdir": workdir,
    "method": config.method,
    "step": step,
    "which": used,
    "protocol": settings,
    "sets": results,
  }


def _roc(labels, scores):
  from sklearn.metrics import roc_curve

  if len(set(np.asarray(labels).tolist())) < 2:
    return None
  fpr, tpr, _ = roc_curve(labels, scores)
  return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def table_rows(runs: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
  """Header + rows of the Table I shape: video AUC (%) per set, then the target average."""
  header = ["run", "method", "step", *names, "avg (targets)"]
  rows = []
  for r in runs:
    aucs = [r["sets"][n]["video"]["auc"] * 100 for n in names]
    targets = [a for a in aucs[1:] if np.isfinite(a)]
    avg = float(np.mean(targets)) if targets else float("nan")
    rows.append(
      [
        os.path.basename(os.path.normpath(r["workdir"])),
        r["method"],
        str(r["step"]),
        *[f"{a:.2f}" for a in aucs],
        f"{avg:.2f}",
      ]
    )
  return header, rows


def eer_rows(
  runs: list[dict], names: list[str], p_real: float = 0.5
) -> tuple[list[str], list[list[str]]]:
  """Header + rows of GM-DF's metrics (Sec. 4.1): the video-level EER (%) of every set at the
  prior ``p_real`` (``metrics.prior_error_rate``; 0.5 gives the plain EER), their mean over the
  target sets and M_EER, the largest over the target sets (over every set when there is only
  one). A set with one class has no EER (nan)."""
  header = ["run", "method", *names, "mean (targets)", "M_EER (targets)"]
  rows = []
  for r in runs:
    eers = []
    for n in names:
      v = r["sets"][n]["videos"]
      labels = np.asarray(v["label"])
      both = labels.size and labels.min() != labels.max()
      eers.append(100 * metrics.prior_error_rate(labels, v["score"], p_real) if both else np.nan)
    targets = eers[1:] or eers
    rows.append(
      [
        os.path.basename(os.path.normpath(r["workdir"])),
        r["method"],
        *[f"{e:.2f}" for e in eers],
        f"{np.mean(targets):.2f}",
        f"{np.max(targets):.2f}",
      ]
    )
  return header, rows


def footnotes(runs: list[dict], names: list[str]) -> list[str]:
  """The protocol behind the numbers, one line per choice (the paper leaves them open)."""
  lines = []
  for r in runs:
    p = r["protocol"]
    run = os.path.basename(os.path.normpath(r["workdir"]))
    lines.append(
      f"{run}: checkpoint {p['checkpoint']} (step {r['step']}, validation fakes "
      f"{p['val_fakes']}); {p['frames_per_video']} frames per test video; faces per frame: "
      f"{p['faces_per_frame']}; videos without a face: {p['no_face']}; trained on "
      f"{p['train_frames'] or 'all'} frames per video, fakes {p['train_fake_domains']}"
    )
  for n in names:
    d = runs[0]["sets"][n]["data"]
    missing = sum(d["videos_without_face"].values())
    lines.append(
      f"{n}: {d['videos']} videos, fakes {'+'.join(d['fake_domains']) or 'none'}; "
      f"{missing} videos without a face ({d['videos_without_face_scored']} scored 0.5)"
    )
  return lines


def write_tables(
  runs: list[dict], names: list[str], out_dir: str, *, p_real: float = 0.5
) -> dict[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  header, rows = table_rows(runs, names)
  eer_header, eer = eer_rows(runs, names, p_real)
  notes = footnotes(runs, names)
  paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("md", "csv", "tex", "json")}
  with open(paths["md"], "w") as f:
    f.write("| " + " | ".join(header) + " |\n|" + " --- |" * len(header) + "\n")
    f.writelines("| " + " | ".join(r) + " |\n" for r in rows)
    f.write("\n" + "".join(f"- {n}\n" for n in notes))
    f.write(
      f"\nvideo-level EER (%) at P_real = {p_real}, and M_EER (GM-DF's worst target set):\n\n"
    )
    f.write("| " + " | ".join(eer_header) + " |\n|" + " --- |" * len(eer_header) + "\n")
    f.writelines("| " + " | ".join(r) + " |\n" for r in eer)
  with open(paths["csv"], "w", newline="") as f:
    csv.writer(f).writerows([header, *rows])
  with open(paths["tex"], "w") as f:
    f.write("\\begin{tabular}{" + "l" * 3 + "r" * (len(header) - 3) + "}\n\\hline\n")
    f.write(" & ".join(h.replace("_", "\\_") for h in header) + " \\\\\n\\hline\n")
    f.writelines(" & ".join(c.replace("_", "\\_") for c in r) + " \\\\\n" for r in rows)
    f.write("\\hline\n\\end{tabular}\n")
    f.writelines(f"% {n}\n" for n in notes)
  with open(paths["json"], "w") as f:
    eer_table = {"p_real": p_real, "header": eer_header, "rows": eer}
    json.dump(
      {"test_sets": names, "source": names[0], "runs": runs, "eer": eer_table},
      f,
      indent=1,
      default=_json,
    )
  return paths


def _json(x: Any):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(type(x))


def plot_roc(runs: list[dict], names: list[str], out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  for n in names:
    fig, ax = plt.subplots(figsize=(4, 4))
    for r in runs:
      roc = r["sets"][n]["roc"]
      if roc:
        auc = r["sets"][n]["video"]["auc"]
        ax.plot(roc["fpr"], roc["tpr"], label=f"{r['method']} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{n}: video ROC")
    ax.legend(loc="lower right", fontsize=8)
    path = os.path.join(out_dir, f"roc_{n}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_training_curves(workdirs: list[str], out_dir: str) -> list[str]:
  """Per-stream losses and the stream cosine over training (paper Fig. 2a / Fig. 5)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  logs = {}
  for w in workdirs:
    path = os.path.join(w, "metrics.jsonl")
    if os.path.isfile(path):
      with open(path) as f:
        logs[w] = [json.loads(line) for line in f if '"loss/total"' in line]
  if not logs:
    return []
  out = []
  os.makedirs(out_dir, exist_ok=True)
  # Every stream's loss (loss/<stream>, any number of streams) and the stream cosine.
  losses = sorted({k for rows in logs.values() for r in rows for k in r} - {"loss/total"})
  losses = tuple(k for k in losses if k.startswith("loss/"))
  for key, title, fname in (
    (losses, "per-stream training loss", "loss_curves.png"),
    (("stream_cosine",), "cosine between stream gradients", "stream_cosine.png"),
  ):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for w, rows in logs.items():
      name = os.path.basename(os.path.normpath(w))
      for k in key:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
          ax.plot(*zip(*pts, strict=True), label=f"{name} {k}")
    ax.set(xlabel="step", title=title)
    if key == ("stream_cosine",):
      ax.axhline(0, color="k", lw=0.6)
    if ax.get_legend_handles_labels()[0]:  # single-stream runs have no cosine to plot
      ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, fname)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    out.append(path)
  return out


def plot_gradcam(workdirs, test_sets, out_dir, *, which=None, per_class=4) -> list[str]:
  """Grad-CAM grids of sample test faces per run and test set (the paper's Fig. 4).
  Backbones whose logit does not read a spatial map (ViT's class token) are skipped."""
  from csdfd_jax import explain

  out = []
  for w in workdirs:
    config, model, variables, _ = load_run(w, which)
    name = os.path.basename(os.path.normpath(w))
    for ts in test_sets:
      path = os.path.join(out_dir, f"gradcam_{name}_{ts.name}.png")
      try:
        out.append(
          explain.save_run_gradcam(
            model,
            variables,
            ts.records,
            ts.split,
            config.data.image_size,
            path,
            per_class=per_class,
            datasets=ts.datasets,
            title=f"{name} on {ts.name}",
          )
        )
      except ValueError as e:
        logging.warning("Grad-CAM skipped for %s on %s: %s", name, ts.name, e)
  return out


def evaluate(
  workdirs,
  test_sets,
  out_dir,
  *,
  which=None,
  frames_per_video=None,
  batch_size=None,
  faces=None,
  no_face=None,
  gradcam=True,
  p_real=0.5,
):
  runs = [
    score_run(
      w,
      test_sets,
      which=which,
      frames_per_video=frames_per_video,
      batch_size=batch_size,
      faces=faces,
      no_face=no_face,
    )
    for w in workdirs
  ]
  names = [t.name for t in test_sets]
  paths = write_tables(runs, names, out_dir, p_real=p_real)
  paths["plots"] = plot_roc(runs, names, out_dir) + plot_training_curves(workdirs, out_dir)
  if gradcam:
    paths["plots"] += plot_gradcam(workdirs, test_sets, out_dir, which=which)
  return runs, paths


def format_table(runs: list[dict], names: list[str], *, eer: float | None = None) -> str:
  """The AUC table as text; with ``eer`` = P_real, the EER / M_EER table instead."""
  header, rows = table_rows(runs, names) if eer is None else eer_rows(runs, names, eer)
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
