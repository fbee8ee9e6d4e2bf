"""The side-by-side study: several methods over several seeds on one config, in one table.

    python -m csdfd_jax.study --config=configs/demo.py --methods=O,S,O+S,uvs,cgr,csdfd \\
        --seeds=0,1,2 --workdir=runs/study [--config.train.num_steps=600 ...]

Every (method, seed) pair is one ordinary train.py run in ``<workdir>/runs/<method>_seed<seed>``
(the config with ``method`` and ``seed`` set; ``--config.*`` overrides apply to every run), and
is scored by the same path as ``eval.py`` (``eval_lib.score_run`` on the config's test sets),
whose tables land in the run's ``eval/`` as ``eval.py`` writes them. The runs share one copy of
the protocol's data (``config.data.cache``, by default ``<workdir>/data``: built once per data
seed, not once per run). Any method ``csdfd_jax.methods`` knows, by name or module path, can be
listed: nothing here names one.

Killed and started again with the same arguments, the study skips the runs that finished
(trained to ``train.num_steps`` with the same config, and scored), resumes an unfinished run
from its last checkpoint, and goes on. A run whose directory holds another config is an error
naming the difference.

It writes ``<workdir>/study.{md,csv,tex,json}``: one row per method; columns the source set,
each target set and the target average (per seed, the mean over the targets). A cell is the
video AUC (%) averaged over seeds, its spread over seeds (the standard deviation for 3 seeds or
more, else the min-max range) and a pooled 95% bootstrap interval of the seed-averaged AUC
(each replicate resamples the test videos once, with the same draw for every seed where the
seeds share the test set, and averages the seeds' AUCs on it). ``study.json`` also holds every
run's AUCs and wall times, and per method the conflict diagnostics of training (per-stream losses,
the stream cosine, the method's own scalars such as UVS weights), which ``study.md`` tabulates.
``curves.png`` overlays each method's per-stream training loss and
stream-gradient cosine over training, averaged over seeds with the min-max band (the paper's
Fig. 2 / Fig. 5).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

import numpy as np

from csdfd_jax import metrics

BOOTSTRAP_SAMPLES = 1000
RUNS = "runs"


@dataclasses.dataclass(frozen=True)
class Run:
  method: str
  seed: int
  path: str

  @property
  def name(self) -> str:
    return os.path.basename(self.path)


def run_name(method: str, seed: int) -> str:
  """The run directory's name: the method with any character a path should not hold (a module
  path's ':' or '/') replaced by '_', then the seed."""
  return f"{re.sub(r'[^A-Za-z0-9+._-]', '_', method)}_seed{seed}"


def plan(methods: list[str], seeds: list[int], workdir: str) -> list[Run]:
  """The runs in the order they are made: seed-major, so that every method has a first seed
  before any has a second (a study stopped early still compares all methods)."""
  if not methods or not seeds:
    raise ValueError("need at least one method and one seed")
  for what, items in (("method", methods), ("seed", seeds)):
    if len(set(items)) != len(items):
      raise ValueError(f"a {what} is listed twice: {items}")
  names = [run_name(m, 0) for m in methods]
  if len(set(names)) != len(names):
    raise ValueError(f"two methods map to one run directory name: {methods}")
  root = os.path.join(workdir, RUNS)
  return [Run(m, s, os.path.join(root, run_name(m, s))) for s in seeds for m in methods]


def run_config(base, run: Run, cache: str):
  """The locked config of one run: ``base`` with the run's method and seed, and the shared data
  cache unless ``base`` names one."""
  config = copy.deepcopy(base)
  config.unlock()
  config.method = run.method
  config.seed = run.seed
  if not config.data.get("cache"):
    config.data.cache = cache
  config.lock()
  return config


def _same_config(path: str, config) -> bool:
  from csdfd_jax import workdir as workdir_lib

  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    return False
  old = workdir_lib.saved_config(file)
  return old == workdir_lib._flat(json.loads(config.to_json_best_effort()))


def trained(run: Run, config) -> bool:
  """The run finished training (summary at ``train.num_steps``) with exactly this config."""
  file = os.path.join(run.path, "summary.json")
  if not (os.path.isfile(file) and _same_config(run.path, config)):
    return False
  with open(file) as f:
    return json.load(f).get("end_step") == config.train.num_steps


def results_path(run: Run) -> str:
  return os.path.join(run.path, "eval", "results.json")


def evaluated(run: Run, config) -> bool:
  """Scored after its training finished: results of the step training ended at."""
  file = results_path(run)
  if not os.path.isfile(file):
    return False
  if os.path.getmtime(file) < os.path.getmtime(os.path.join(run.path, "summary.json")):
    return False
  with open(file) as f:
    runs = json.load(f)["runs"]
  return len(runs) == 1 and runs[0]["step"] == config.train.num_steps


def evaluate_run(run: Run, config) -> dict[str, Any]:
  """``eval.py --workdir=<run>`` without the plots: scores the run and writes its tables."""
  from csdfd_jax import eval_lib

  test_sets = eval_lib.default_test_sets(config, run.path)
  scored = eval_lib.score_run(run.path, test_sets)
  eval_lib.write_tables([scored], [t.name for t in test_sets], os.path.join(run.path, "eval"))
  return scored


# ----------------------------------------------------------------------------- aggregation


def bootstrap_seed_mean(videos: list[dict], samples: int, seed: int) -> np.ndarray:
  """[samples] replicates of the seed-averaged video AUC (%). ``videos`` holds one run's
  per-video {"media_id", "label", "score"} per seed; where every seed scored the same videos,
  each replicate draws one resample of them for all seeds (paired), else one per seed. A
  replicate with one class only is NaN."""
  rng = np.random.default_rng(seed)
  paired = all(v["media_id"] == videos[0]["media_id"] for v in videos)
  arrays = [(np.asarray(v["label"]), np.asarray(v["score"], np.float64)) for v in videos]
  if paired:
    shared = rng.integers(0, len(arrays[0][0]), (samples, len(arrays[0][0])))
    draws = [shared] * len(arrays)
  else:  # the draws in the order of one replicate after another, seed by seed within each
    rows = [[rng.integers(0, len(y), len(y)) for y, _ in arrays] for _ in range(samples)]
    draws = [np.stack([r[k] for r in rows]) for k in range(len(arrays))]
  aucs = [metrics.resampled_auc(y, s, d) for (y, s), d in zip(arrays, draws, strict=True)]
  return 100 * np.mean(aucs, axis=0)


def _cell(values: list[float], replicates: np.ndarray) -> dict[str, Any]:
  values_arr = np.asarray(values, np.float64)
  finite = values_arr[np.isfinite(values_arr)]
  cell: dict[str, Any] = {"seeds": values, "mean": float(np.mean(finite)) if finite.size else None}
  if finite.size >= 3:
    cell["std"] = float(np.std(finite, ddof=1))
  elif finite.size:
    cell["min"], cell["max"] = float(finite.min()), float(finite.max())
  ok = replicates[np.isfinite(replicates)]
  cell["ci95"] = [float(np.quantile(ok, 0.025)), float(np.quantile(ok, 0.975))] if ok.size else None
  return cell


def aggregate(
  results: dict[Run, dict], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, Any]:
  """The study table from each run's scored results (``score_run``'s dict)."""
  first = next(iter(results.values()))
  names = list(first["sets"])
  for run, r in results.items():
    if list(r["sets"]) != names:
      raise ValueError(f"{run.name} was scored on {list(r['sets'])}, the others on {names}")
  methods = list(dict.fromkeys(run.method for run in results))
  rows = []
  for method in methods:
    runs = sorted((run for run in results if run.method == method), key=lambda run: run.seed)
    cells, reps = {}, {}
    for j, name in enumerate(names):
      sets = [results[run]["sets"][name] for run in runs]
      reps[name] = bootstrap_seed_mean([s["videos"] for s in sets], samples, seed + j)
      cells[name] = _cell([100 * s["video"]["auc"] for s in sets], reps[name])
    targets = names[1:]
    if targets:
      per_seed = [
        float(np.nanmean([100 * results[run]["sets"][t]["video"]["auc"] for t in targets]))
        for run in runs
      ]
      cells["avg (targets)"] = _cell(per_seed, np.mean([reps[t] for t in targets], axis=0))
    rows.append({"method": method, "seeds": [run.seed for run in runs], "cells": cells})
  columns = [*names, *(["avg (targets)"] if names[1:] else [])]
  return {"source": names[0], "test_sets": names, "columns": columns, "rows": rows}


def format_cell(cell: dict[str, Any]) -> str:
  """'97.3 ± 1.2 [95.0, 99.1]' (std) or '97.3 (96.1-98.4) [95.0, 99.1]' (min-max)."""
  if cell["mean"] is None:
    return "n/a"
  text = f"{cell['mean']:.1f}"
  if "std" in cell:
    text += f" ± {cell['std']:.1f}"
  elif cell.get("max") is not None and cell["max"] != cell["min"]:
    text += f" ({cell['min']:.1f}-{cell['max']:.1f})"
  if cell["ci95"]:
    text += f" [{cell['ci95'][0]:.1f}, {cell['ci95'][1]:.1f}]"
  return text


def table_lines(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  header = ["method", "seeds", *table["columns"]]
  rows = [
    [r["method"], str(len(r["seeds"])), *(format_cell(r["cells"][c]) for c in table["columns"])]
    for r in table["rows"]
  ]
  return header, rows


def legend(table: dict[str, Any]) -> str:
  return (
    f"video AUC (%), source set {table['source']}: mean over seeds, ± std (3+ seeds) or "
    "(min-max), [pooled 95% bootstrap interval of the seed mean]"
  )


def write_study(table: dict[str, Any], out_dir: str) -> dict[str, str]:
  """study.md / .csv / .tex / .json in ``out_dir``."""
  header, rows = table_lines(table)
  paths = {k: os.path.join(out_dir, f"study.{k}") for k in ("md", "csv", "tex", "json")}
  with open(paths["md"], "w") as f:
    f.write(f"{legend(table)}\n\n")
    f.write("| " + " | ".join(header) + " |\n|" + " --- |" * len(header) + "\n")
    f.writelines("| " + " | ".join(r) + " |\n" for r in rows)
    diagnostics = diagnostics_lines(table)
    if diagnostics:
      f.write("\n" + "\n".join(diagnostics) + "\n")
  with open(paths["csv"], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "seeds"] + [f"{c} {k}" for c in table["columns"] for k in STATS])
    for r in table["rows"]:
      w.writerow(
        [r["method"], len(r["seeds"])]
        + [_stat(r["cells"][c], k) for c in table["columns"] for k in STATS]
      )
  with open(paths["tex"], "w") as f:
    tex = lambda s: s.replace("_", "\\_").replace("±", "$\\pm$")  # noqa: E731
    f.write("\\begin{tabular}{ll" + "r" * len(table["columns"]) + "}\n\\hline\n")
    f.write(" & ".join(tex(h) for h in header) + " \\\\\n\\hline\n")
    f.writelines(" & ".join(tex(c) for c in r) + " \\\\\n" for r in rows)
    f.write(f"\\hline\n\\end{{tabular}}\n% {legend(table)}\n")
  with open(paths["json"], "w") as f:
    json.dump(table, f, indent=1)
  return paths


STATS = ("mean", "std", "min", "max", "ci95_low", "ci95_high")


def _stat(cell: dict[str, Any], key: str) -> str:
  if key.startswith("ci95"):
    ci = cell.get("ci95")
    return "" if not ci else f"{ci[0 if key.endswith('low') else 1]:.4f}"
  value = cell.get(key)
  return "" if value is None else f"{value:.4f}"


def format_table(table: dict[str, Any]) -> str:
  header, rows = table_lines(table)
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
  return "\n".join([legend(table), line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ----------------------------------------------------------------------------- diagnostics

# Logged scalars that describe the step rather than the method's behaviour.
GENERIC = ("accuracy/", "grad_norm", "learning_rate", "param_norm", "update_norm", "images_per_")


def _training_rows(run: Run) -> list[dict]:
  file = os.path.join(run.path, "metrics.jsonl")
  if not os.path.isfile(file):
    return []
  with open(file) as f:
    return [row for line in f if '"loss/total"' in line for row in [json.loads(line)]]


def run_diagnostics(run: Run, tail: float = 0.1) -> dict[str, dict[str, float]]:
  """Per logged scalar of the run (per-stream losses, the stream cosine, the method's own
  scalars such as UVS weights or CGR's correction ratio; not the generic step scalars): its mean
  over training and over the last ``tail`` of the logged steps."""
  rows = _training_rows(run)
  keys = sorted(
    {k for r in rows for k in r}
    - {"step", "loss/total"}
    - {k for r in rows for k in r if k.startswith(GENERIC)}
  )
  last = rows[-max(1, int(round(tail * len(rows)))) :]
  out = {}
  for key in keys:
    values = [r[key] for r in rows if key in r and np.isfinite(r[key])]
    ends = [r[key] for r in last if key in r and np.isfinite(r[key])]
    if values:
      out[key] = {"mean": float(np.mean(values)), "last": float(np.mean(ends)) if ends else None}
  return out


def method_diagnostics(runs: list[Run]) -> dict[str, dict[str, float]]:
  """``run_diagnostics`` averaged over a method's runs (seeds)."""
  per_run = [run_diagnostics(run) for run in runs]
  keys = sorted({k for d in per_run for k in d})
  out = {}
  for key in keys:
    cells = [d[key] for d in per_run if key in d]
    out[key] = {
      stat: float(np.mean(v)) if (v := [c[stat] for c in cells if c[stat] is not None]) else None
      for stat in ("mean", "last")
    }
  return out


def diagnostics_lines(table: dict[str, Any]) -> list[str]:
  """A Markdown table: final per-stream losses, then every other scalar's mean over training."""
  rows = [r for r in table["rows"] if r.get("diagnostics")]
  keys = sorted({k for r in rows for k in r["diagnostics"]}, key=lambda k: (k[:5] != "loss/", k))
  if not keys:
    return []
  header = [f"{k} (last)" if k.startswith("loss/") else f"{k} (mean)" for k in keys]
  lines = [
    "training diagnostics, mean over seeds: per-stream loss over the last 10% of logged steps; "
    "the other scalars averaged over training",
    "",
    "| method | " + " | ".join(header) + " |",
    "|" + " --- |" * (len(keys) + 1),
  ]
  for r in rows:
    cells = []
    for k in keys:
      d = r["diagnostics"].get(k)
      v = None if d is None else d["last" if k.startswith("loss/") else "mean"]
      cells.append("" if v is None else f"{v:.3g}")
    lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
  return lines


# ----------------------------------------------------------------------------- curves


def _curves(run: Run) -> dict[str, list[tuple[int, float]]]:
  file = os.path.join(run.path, "metrics.jsonl")
  out: dict[str, list[tuple[int, float]]] = {}
  if not os.path.isfile(file):
    return out
  with open(file) as f:
    for line in f:
      row = json.loads(line)
      for key, value in row.items():
        if (key.startswith("loss/") and key != "loss/total") or key == "stream_cosine":
          out.setdefault(key, []).append((row["step"], value))
  return out


def plot_curves(runs: list[Run], out_path: str) -> str | None:
  """Per-stream training losses (left) and the stream cosine (right), one colour per method,
  one line style per stream; the mean over seeds with the min-max band."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  by_method: dict[str, list[dict]] = {}
  for run in runs:
    by_method.setdefault(run.method, []).append(_curves(run))
  if not any(c for curves in by_method.values() for c in curves):
    return None
  fig, (ax_loss, ax_cos) = plt.subplots(1, 2, figsize=(11, 4))
  styles = ["-", "--", ":", "-."]
  streams = sorted({k for cs in by_method.values() for c in cs for k in c if k.startswith("loss")})
  for i, (method, curves) in enumerate(by_method.items()):
    colour = f"C{i % 10}"
    for key in [*streams, "stream_cosine"]:
      series = [dict(c[key]) for c in curves if key in c]
      if not series:
        continue
      steps = sorted(set.intersection(*(set(s) for s in series)))
      values = np.array([[s[t] for t in steps] for s in series])
      ax = ax_cos if key == "stream_cosine" else ax_loss
      style = "-" if key == "stream_cosine" else styles[streams.index(key) % len(styles)]
      label = method if key == "stream_cosine" else f"{method} {key[5:]}"
      ax.plot(steps, values.mean(0), style, color=colour, label=label, lw=1.2)
      if len(series) > 1:
        ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.15, lw=0)
  ax_loss.set(xlabel="step", ylabel="BCE", title="per-stream training loss")
  ax_loss.axhline(np.log(2), color="k", lw=0.6, ls=":")
  ax_cos.set(xlabel="step", title="cosine between the stream gradients")
  ax_cos.axhline(0, color="k", lw=0.6)
  for ax in (ax_loss, ax_cos):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path


# ----------------------------------------------------------------------------- the study


def run_study(
  base_config,
  methods: list[str],
  seeds: list[int],
  workdir: str,
  *,
  log=print,
  samples: int = BOOTSTRAP_SAMPLES,
) -> dict[str, Any]:
  """Trains and scores every run not yet done, then writes the study's tables and plot.
  Returns {"table", "paths", "runs": [{"run", "method", "seed", "train_s", "eval_s", ...}]}."""
  import jax

  from csdfd_jax import methods as methods_lib
  from csdfd_jax import train_lib
  from csdfd_jax import workdir as workdir_lib

  runs = plan(methods, seeds, workdir)
  for m in methods:  # a mistyped method fails before any training
    methods_lib.module_of(m)
  os.makedirs(workdir, exist_ok=True)
  cache = os.path.abspath(os.path.join(workdir, "data"))
  # The runs of one method over seeds compile the same graphs: XLA's persistent cache turns the
  # second seed's compilation into a read.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  results, timings = {}, []
  start = time.perf_counter()
  with workdir_lib.lock(workdir):
    for i, run in enumerate(runs, 1):
      config = run_config(base_config, run, cache)
      head = f"[{i}/{len(runs)}] {run.method} seed {run.seed}"
      t_train = t_eval = 0.0
      state = "done earlier"
      if not trained(run, config):
        log(f"{head}: training ({config.train.num_steps} steps) in {run.path}")
        t = time.perf_counter()
        train_lib.train_and_evaluate(config, run.path)
        t_train, state = time.perf_counter() - t, "trained"
      if not evaluated(run, config):
        t = time.perf_counter()
        evaluate_run(run, config)
        t_eval = time.perf_counter() - t
        state = "evaluated" if state == "done earlier" else state
      jax.clear_caches()  # every run compiles its own step; keep the memory of one
      with open(results_path(run)) as f:
        results[run] = json.load(f)["runs"][0]
      aucs = ", ".join(
        f"{n} {100 * s['video']['auc']:.1f}" for n, s in results[run]["sets"].items()
      )
      log(f"{head}: {state}; train {t_train:.0f} s, eval {t_eval:.0f} s; video AUC {aucs}")
      timings.append(
        {
          "run": run.name,
          "method": run.method,
          "seed": run.seed,
          "state": state,
          "train_s": round(t_train, 1),
          "eval_s": round(t_eval, 1),
        }  # fmt: skip
      )
    table = aggregate(results, samples=samples)
    for row in table["rows"]:
      row["diagnostics"] = method_diagnostics([run for run in runs if run.method == row["method"]])
    table["runs"] = [
      {**t, "sets": {n: s["video"] for n, s in results[run]["sets"].items()}}
      for t, run in zip(timings, runs, strict=True)
    ]
    table["config"] = json.loads(base_config.to_json_best_effort())
    table["methods"], table["seeds"] = methods, seeds
    paths = write_study(table, workdir)
    curves = plot_curves(runs, os.path.join(workdir, "curves.png"))
  if curves:
    paths["curves"] = curves
  return {"table": table, "paths": paths, "runs": timings, "seconds": time.perf_counter() - start}


def format_timings(timings: list[dict], seconds: float) -> str:
  lines = [f"{'run':<28}{'state':>14}{'train s':>9}{'eval s':>8}"]
  lines += [
    f"{t['run']:<28}{t['state']:>14}{t['train_s']:>9.0f}{t['eval_s']:>8.0f}" for t in timings
  ]
  lines.append(f"study wall time {seconds:.0f} s")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  from absl import flags, logging
  from ml_collections import config_flags

  flags_ = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", "configs/demo.py", "Config file[:variant].", flag_values=flags_
  )
  flags.DEFINE_string("methods", "O,S,O+S,uvs,cgr,csdfd", "Comma-separated.", flag_values=flags_)
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated training seeds.", flag_values=flags_)
  flags.DEFINE_string("workdir", None, "Study directory (resumed).", flag_values=flags_)
  argv = sys.argv if argv is None else argv
  try:
    flags_(argv)
  except Exception as e:  # noqa: BLE001 - config_flags raises several kinds
    sys.exit(f"study: bad flag or config ({type(e).__name__}): {' '.join(str(e).split())}")
  if not flags_.workdir:
    sys.exit("study: --workdir is required")
  try:
    seeds = [int(s) for s in flags_.seeds.split(",") if s.strip()]
  except ValueError:
    sys.exit(f"study: --seeds={flags_.seeds!r}: comma-separated integers")
  methods = [m.strip() for m in flags_.methods.split(",") if m.strip()]
  logging.set_verbosity(logging.WARNING)
  from csdfd_jax import train_lib
  from csdfd_jax.workdir import WorkdirError

  try:
    out = run_study(flags_.config, methods, seeds, flags_.workdir)
  except (train_lib.TrainingError, WorkdirError, ValueError, FileNotFoundError) as e:
    sys.exit(f"study: {e}")
  print()
  print(format_table(out["table"]))
  print()
  print(format_timings(out["runs"], out["seconds"]))
  print(f"written: {', '.join(out['paths'].values())}")


if __name__ == "__main__":
  main()
