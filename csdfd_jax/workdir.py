"""One run per workdir, and what a resume may change.

``lock(workdir)`` holds ``<workdir>/LOCK`` (host, pid, start time) for the life of a training
run: a second run on a busy workdir fails at once, naming the holder. A lock whose process is
gone (same host, pid no longer alive: a killed run) is stale and is taken over, so a resume
is never blocked; a lock held from another host cannot be checked and is reported with the
command that removes it.

``check_resume(workdir, config)``: a workdir that holds checkpoints was trained with
``config.json``. A resume that changes what the checkpoints mean (the method and its
settings, the model, the data, the seed) is refused, naming the differing keys; any other
change (learning rate, length, logging, evaluation) is allowed and appended to
``config_history.jsonl``, so the whole history of the run is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import ml_collections

LOCK = "LOCK"
HISTORY = "config_history.jsonl"
# Top-level config sections (and keys) a resume must not change.
IDENTITY = ("method", "seed", "reduction", "model", "data", "uvs", "cgr")


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked (busy, or a resume that changes the run)."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  path = os.path.join(workdir, LOCK)
  me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      break
    except FileExistsError:
      try:
        with open(path) as f:
          held = json.load(f)
      except (OSError, ValueError):
        held = {}
      if held.get("host") == me["host"] and not _alive(int(held.get("pid", -1))):
        os.remove(path)  # stale: the run that held it was killed
        continue
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
      where = (
        f"process {held.get('pid')} on {held.get('host')}, since {since}"
        if held
        else "an unreadable lock"
      )
      raise WorkdirError(
        f"{workdir} is in use by another training run ({where}). Wait for it to finish, or "
        f"use another --workdir; if that run is dead on another host, remove {path}"
      ) from None
  else:
    raise WorkdirError(f"could not take {path}")
  with os.fdopen(fd, "w") as f:
    json.dump(me, f)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


# Keys added to the config after runs were made, with the value that reproduces what those runs
# did: a config.json without the key reads as if it held that value, so adding a key does not
# make every earlier run "another run".
ADDED_KEYS = {"data.demo_grain": 1.0, "data.demo_fingerprint": 1.0}


def saved_config(path: str) -> dict[str, Any]:
  """The flat config of a run's ``config.json`` at ``path``, with ``ADDED_KEYS`` filled in."""
  with open(path) as f:
    return ADDED_KEYS | _flat(json.load(f))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out |= _flat(v, f"{key}.")
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def check_resume(
  workdir: str, config: ml_collections.ConfigDict, step: int, *, record: bool = True
) -> dict[str, Any]:
  """Compares ``config`` with the workdir's ``config.json`` of a run resumed at ``step``;
  raises WorkdirError on a change in ``IDENTITY``, records any other change (``record``: this
  process writes the history); returns the changes {key: [old, new]}."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return {}
  old = saved_config(path)
  new = _flat(json.loads(config.to_json_best_effort()))
  changed = {
    k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
  }
  refused = [k for k in changed if k.split(".")[0] in IDENTITY]
  if refused:
    what = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
    raise WorkdirError(
      f"{workdir} holds checkpoints of another run ({what}); resuming would mix two runs. "
      "Use another --workdir, or pass the run's own settings again"
    )
  if changed and record:
    with open(os.path.join(workdir, HISTORY), "a") as f:
      f.write(json.dumps({"time": time.time(), "resumed_at_step": step, "changed": changed}) + "\n")
  return changed


def trim_log(path: str, step: int) -> list[dict]:
  """Drops the rows of ``path`` (metrics.jsonl) logged after ``step``: a resumed run logs those
  steps again. Returns the rows kept."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  kept = [r for r in rows if r.get("step", 0) <= step]
  if len(kept) != len(rows):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
  return kept
