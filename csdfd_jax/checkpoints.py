"""The checkpoint format of a run, in one place for train, eval and predict.

A run's ``checkpoints/`` (the last ``keep`` steps) and ``best/`` (the best validation AUC, with
``config.train.select=best``) are orbax ``CheckpointManager`` folders of two items: ``state``
(the ``TrainState``: step, params, batch_stats, opt_state, rng) and ``data`` (every process's
loader position, one ``process_<i>-of-<n>.json`` per process, written by grain's handler).
"""

from __future__ import annotations

import os
from typing import Any

import grain.checkpoint  # grain's orbax handler for the loader positions
import jax
import orbax.checkpoint as ocp


def manager(path: str, keep: int, best: bool = False) -> ocp.CheckpointManager:
  """The manager a training run writes through (``best``: keeps the max ``val_auc``)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    best_fn=(lambda m: m["val_auc"]) if best else None,
    best_mode="max",
    keep_checkpoints_without_metrics=not best,
  )
  return ocp.CheckpointManager(os.path.abspath(path), options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, iterator, metrics=None) -> None:
  """Saves the train state and every process's data-iterator position."""
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
  )
  mngr.save(step, args=args, metrics=metrics)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, iterator) -> Any:
  """The train state of ``step``; ``iterator`` is moved to where this process's was."""
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(iterator),
    ),
  )
  return restored["state"]


def steps(path: str) -> list[int]:
  """The steps saved in a checkpoint folder (empty when it holds none, or does not exist)."""
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def read_state(path: str, step: int) -> dict[str, Any]:
  """The saved train state of ``step`` (a dict of arrays) on this process's first device,
  whatever devices or hosts the run trained on; the loader position is not read."""
  mngr = ocp.CheckpointManager(
    os.path.abspath(path),
    item_names=("state", "data"),
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
    },
  )
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    mngr.item_metadata(step)["state"],
  )
  restore_args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
  return mngr.restore(step, args=restore_args)["state"]
