"""``train_and_evaluate(config, workdir)``: wiring, the loop, checkpoints and logs.

One run = one ``workdir``: ``checkpoints/`` (orbax, the last ``keep_checkpoints`` steps:
train state + data-iterator state), ``best/`` (the state with the best validation AUC,
selected on the validation split — never on a test set), ``tensorboard/``, ``metrics.jsonl``
(every logged scalar; eval.py plots the paper's Fig. 2/5 from it), ``config.json`` and
``summary.json``. Starting again with the same ``workdir`` resumes from the last checkpoint,
data iterator included, and ends bitwise where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from csdfd_jax import checkpoints, eval_lib, methods
from csdfd_jax import workdir as workdir_lib
from csdfd_jax.data import pipeline, protocols
from csdfd_jax.methods.step import create_train_state, make_step
from csdfd_jax.models.detector import build as build_model
from csdfd_jax.models.detector import init_variables, predict_fn

__all__ = ["TrainingError", "build_model", "check_config", "init_variables", "train_and_evaluate"]

# config.data.val_fakes -> the eval pipeline's ``fakes``.
VAL_FAKES = {"original": "stored", "sbi": "sbi", "both": "both"}


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, an inconsistent config or workdir)."""


# ---------------------------------------------------------------------------- set-up


def check_config(config: ml_collections.ConfigDict) -> None:
  """Cross-field checks that a locked ConfigDict cannot express."""
  methods.module_of(config.method)  # an unknown method fails here, before any compile
  positive = {
    "optim.learning_rate": config.optim.learning_rate,
    "data.image_size": config.data.image_size,
    "data.batch_size": config.data.batch_size,
    "train.num_steps": config.train.num_steps,
    "train.log_every": config.train.log_every,
    "train.eval_every": config.train.eval_every,
    "train.checkpoint_every": config.train.checkpoint_every,
    "train.eval_batch_size": config.train.eval_batch_size,
  }
  for key, value in positive.items():
    if not value > 0:
      raise ValueError(
        f"config.{key}={value!r} must be > 0"
        + (" (a negative learning rate is gradient ascent)" if key == "optim.learning_rate" else "")
      )
  if not (config.data.demo or config.data.records or config.data.mini_root):
    raise ValueError(
      "no training data: set --config.data.records=DIR (ArrayRecords written by "
      "`python -m csdfd_jax.data.builder`), use the demo (configs/demo.py) or "
      "the FFHQ mini protocol (configs/effnet.py:ffhq_mini --config.data.mini_root=../shared/data)"
    )
  if config.data.batch_size % 2:
    raise ValueError(
      f"data.batch_size={config.data.batch_size} must be even (half real, half fake)"
    )
  if config.data.val_split.startswith("test"):
    raise ValueError(
      f"data.val_split={config.data.val_split!r} is a test split: model selection and "
      "validation must not see test data. Use the records' validation split (default 'val')"
    )
  choices = {
    "reduction": (config.reduction, ("sum", "mean")),
    "data.val_fakes": (config.data.val_fakes, tuple(VAL_FAKES)),
    "train.select": (config.train.select, ("last", "best")),
    "eval.faces_per_frame": (config.eval.faces_per_frame, pipeline.EVAL_FACES),
    "eval.no_face": (config.eval.no_face, ("chance", "drop")),
  }
  for key, (value, valid) in choices.items():
    if value not in valid:
      raise ValueError(f"config.{key}={value!r}; valid: {', '.join(valid)}")
  if config.data.train_frames < 0:
    raise ValueError(f"data.train_frames={config.data.train_frames}: use >= 1, or 0 for all")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, constant, then linear decay to 0 from ``decay_start`` of training."""
  o, n = config.optim, config.train.num_steps
  decay_at = max(int(o.decay_start * n), o.warmup_steps)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
      optax.constant_schedule(o.learning_rate),
      optax.linear_schedule(o.learning_rate, 0.0, max(n - decay_at, 1)),
    ],
    [max(o.warmup_steps, 1), decay_at],
  )


# The optim options each optimizer reads; a non-default value of any other is an error.
_OPTIM_OPTIONS = {"sgd": {"momentum", "weight_decay"}, "adam": set(), "adamw": {"weight_decay"}}
_OPTIM_NEUTRAL = {"momentum": 0.0, "weight_decay": 0.0}


def base_optimizer(config: ml_collections.ConfigDict, lr: optax.Schedule):
  o = config.optim
  if o.name not in _OPTIM_OPTIONS:
    raise ValueError(f"config.optim.name={o.name!r}; valid: {', '.join(_OPTIM_OPTIONS)}")
  ignored = [
    f"{k}={o[k]}" for k, neutral in _OPTIM_NEUTRAL.items()
    if k in o and k not in _OPTIM_OPTIONS[o.name] and o[k] != neutral
  ]  # fmt: skip
  if ignored:
    raise ValueError(
      f"config.optim.name={o.name!r} ignores {', '.join(ignored)}: set them to 0, or use "
      f"an optimizer that reads them ({', '.join(n for n in _OPTIM_OPTIONS if _OPTIM_OPTIONS[n])})"
    )
  if o.name == "sgd":
    tx = optax.sgd(lr, momentum=o.momentum or None)
    return optax.chain(optax.add_decayed_weights(o.weight_decay), tx) if o.weight_decay else tx
  if o.name == "adam":
    return optax.adam(lr)
  return optax.adamw(lr, weight_decay=o.weight_decay)


# ---------------------------------------------------------------------------- loop


class _Logger:
  """TensorBoard scalars + metrics.jsonl (the latter is what eval.py plots)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self._tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.warning("tensorboardX not installed: TensorBoard logs disabled")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _io_cause(e: BaseException) -> str:
  """The first OSError in an exception's chain, as one line (ENOSPC, EROFS, ...)."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError):
      where = f" ({seen.filename})" if seen.filename else ""
      return f"{seen.strerror or seen}{where}"
    seen = seen.__cause__ or seen.__context__
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _save(mngr, step: int, state, iterator, metrics_=None) -> None:
  """Saves a checkpoint; an earlier asynchronous save that failed stops training here, at the
  first save after it, with one line naming the folder and the cause."""
  try:
    mngr.check_for_errors()
    checkpoints.save(mngr, step, state, iterator, metrics_)
  except Exception as e:  # noqa: BLE001 - orbax wraps the I/O error in its own types
    raise TrainingError(
      f"saving the checkpoint of step {step} in {mngr.directory} failed: {_io_cause(e)}"
    ) from None


def _finish(mngr) -> None:
  try:
    mngr.wait_until_finished()
    mngr.check_for_errors()
  except Exception as e:  # noqa: BLE001
    raise TrainingError(
      f"the last checkpoint save in {mngr.directory} failed: {_io_cause(e)}"
    ) from None


def _device_batch(batch: dict, sharding) -> dict:
  """Every field of every stream (image, label, domain, ...) as a global array."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config.method`` for ``config.train.num_steps`` steps in ``workdir``
  (resuming if it holds checkpoints) and returns the run summary. One run per workdir: the
  first process holds ``<workdir>/LOCK`` (``csdfd_jax.workdir``)."""
  check_config(config)
  is_main = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    try:
      os.makedirs(workdir, exist_ok=True)
      if is_main:
        stack.enter_context(workdir_lib.lock(workdir))
    except OSError as e:
      raise workdir_lib.WorkdirError(
        f"cannot write to the workdir {workdir}: {e.strerror or e} ({type(e).__name__}). "
        "Pick a writable --workdir"
      ) from None
    return _train_and_evaluate(config, workdir, is_main)


def _train_and_evaluate(config, workdir: str, is_main: bool) -> dict[str, Any]:
  saved = checkpoints.steps(os.path.join(workdir, "checkpoints"))
  if saved:  # a resume: refused if it changes the run, recorded if it changes the schedule
    workdir_lib.check_resume(workdir, config, max(saved), record=is_main)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  devices = jax.devices()
  if config.train.num_devices:
    if config.train.num_devices > len(devices):
      raise ValueError(f"train.num_devices={config.train.num_devices} > {len(devices)} devices")
    devices = devices[: config.train.num_devices]
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(AxisType.Auto,))
  if config.data.batch_size % len(devices):
    raise ValueError(
      f"data.batch_size={config.data.batch_size} is not divisible by the {len(devices)} devices"
    )
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  method = methods.get(config.method, config)
  model = build_model(config)
  lr = learning_rate_schedule(config)
  tx = method.full_optimizer(base_optimizer(config, lr))
  variables = init_variables(model, config, config.seed)
  state = create_train_state(variables, tx, jax.random.PRNGKey(config.seed))
  # Fresh buffers per leaf: optimizer states may alias arrays, and the step donates them.
  state = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), state), replicated)

  records = protocols.prepare(config, workdir)
  local_batch = config.data.batch_size // jax.process_count()
  iterator = pipeline.train_iterator(
    records,
    streams=method.stream_specs(),
    batch_size=local_batch,
    image_size=config.data.image_size,
    seed=config.seed,
    worker_count=config.data.workers,
    fake_domains=config.data.fake_domains,
    frames_per_video=config.data.train_frames,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )

  ckpt = checkpoints.manager(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
  best = checkpoints.manager(os.path.join(workdir, "best"), 1, best=True)
  start = ckpt.latest_step()
  if start is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = jax.device_put(checkpoints.restore(ckpt, start, abstract, iterator), replicated)
    logging.info("resumed from step %d in %s", start, workdir)
  start = int(start or 0)

  step_fn = jax.jit(
    make_step(
      method.gradient_fn(model),
      tx,
      method.streams,
      diagnostics=method.diagnostics,
      learning_rate=lr,
      max_loss=config.train.max_loss or None,
      axes=method.update_axes,
    ),
    in_shardings=(replicated, data_sharding),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  predict = jax.jit(predict_fn(model), out_shardings=replicated)
  earlier_rows = []
  if is_main:  # rows of steps after the checkpoint are logged again by this run
    earlier_rows = workdir_lib.trim_log(os.path.join(workdir, "metrics.jsonl"), start)
  logger = _Logger(workdir, is_main)
  summary: dict[str, Any] = {"method": config.method, "start_step": start, "workdir": workdir}
  num_steps = config.train.num_steps
  images_per_step = config.data.batch_size * len(method.streams)
  pending: list[dict] = []
  best_auc, last_val = -np.inf, {}
  if config.train.select == "best":  # the best of the whole run, not of this segment
    earlier = [
      r["val/video_auc"] for r in earlier_rows if np.isfinite(r.get("val/video_auc", np.nan))
    ]
    best_auc = max(earlier, default=-np.inf)

  from tqdm import tqdm

  bar = tqdm(total=num_steps, initial=start, disable=not is_main, unit="step", dynamic_ncols=True)
  t0, steps_timed = time.perf_counter(), 0
  try:
    for step in range(start, num_steps):
      batch = _device_batch(next(iterator), data_sharding)
      state, step_metrics = step_fn(state, batch)
      pending.append(step_metrics)
      if step == start:  # the first step compiles: time the rest
        jax.block_until_ready(step_metrics)
        t0 = time.perf_counter()
      else:
        steps_timed += 1
      done = step + 1
      bar.update(1)
      is_log = done % config.train.log_every == 0 or done == num_steps
      is_eval = done % config.train.eval_every == 0 or done == num_steps
      is_ckpt = done % config.train.checkpoint_every == 0 or done == num_steps
      if not (is_log or is_eval or is_ckpt):
        continue
      fetched = jax.device_get(pending)
      for offset, m in enumerate(fetched):
        if not m["finite"]:
          bad = done - len(fetched) + offset + 1
          ckpt.wait_until_finished()
          last = ckpt.latest_step()
          kept = (
            f"Last good checkpoint: step {last} in {os.path.join(workdir, 'checkpoints')}"
            if last is not None
            else "No checkpoint was saved before it"
          )
          losses = {k: float(v) for k, v in m.items() if k.startswith("loss/")}
          cause = (
            "non-finite loss or update"
            if not all(np.isfinite(list(losses.values()))) or not np.isfinite(m["update_norm"])
            else f"loss above config.train.max_loss={config.train.max_loss} (diverging)"
          )
          raise TrainingError(
            f"{cause} at step {bad} (losses {losses}); the update was not applied and "
            f"training stopped. {kept}. Lower config.optim.learning_rate or check the data "
            "of that step."
          )
      mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k != "finite"}
      pending = []
      elapsed = time.perf_counter() - t0
      mean["images_per_second"] = steps_timed * images_per_step / max(elapsed, 1e-9)
      logger.write(done, mean)
      bar.set_postfix(
        loss=f"{mean['loss/total']:.4f}", img_s=f"{mean['images_per_second']:.1f}", refresh=False
      )
      if is_eval:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        scored = eval_lib.score_split(
          predict,
          variables,
          records,
          config.data.val_split,
          mesh,
          batch_size=config.train.eval_batch_size,
          image_size=config.data.image_size,
          fake_domains=config.data.fake_domains,
          fakes=VAL_FAKES[config.data.val_fakes],
          sbi_seed=config.seed,
        )
        last_val = eval_lib.face_and_video_auc(scored)
        logger.write(done, {f"val/{k}": v for k, v in last_val.items()})
        select_best = config.train.select == "best"
        if select_best and np.isfinite(last_val["video_auc"]) and last_val["video_auc"] > best_auc:
          best_auc = last_val["video_auc"]
          _save(best, done, state, iterator, {"val_auc": best_auc})
      if is_ckpt:
        _save(ckpt, done, state, iterator)
  finally:
    bar.close()
    logger.close()
    failed = []
    for mngr in (ckpt, best):
      try:
        _finish(mngr)
      except TrainingError as e:  # raised below unless another error is on its way
        failed.append(e)
  if failed:
    raise failed[0]

  elapsed = time.perf_counter() - t0
  previous = {}
  if start and os.path.isfile(os.path.join(workdir, "summary.json")):
    with open(os.path.join(workdir, "summary.json")) as f:
      previous = json.load(f)
  segments = [
    *previous.get("segments", []),
    {"start": start, "end": num_steps, "seconds": round(elapsed, 1)},
  ]
  summary |= {
    "segments": segments,
    "end_step": num_steps,
    "steps_run": num_steps - start,
    "seconds": round(elapsed, 1),
    "images_per_second": round(steps_timed * images_per_step / max(elapsed, 1e-9), 1),
    "devices": len(devices),
    "val": last_val,
    "select": config.train.select,
    "val_fakes": config.data.val_fakes,
    "best_val_video_auc": None if best_auc == -np.inf else best_auc,
    "checkpoint": os.path.join(workdir, "checkpoints"),
    "best_checkpoint": os.path.join(workdir, "best"),
  }
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run table printed by train.py."""
  val = summary.get("val") or {}
  rows = [
    ("method", summary["method"]),
    ("steps", f"{summary['start_step']} -> {summary['end_step']} ({summary['steps_run']} run)"),
    ("time", f"{summary['seconds']} s, {summary['images_per_second']} images/s"),
    ("devices", summary["devices"]),
    ("val frame AUC", f"{val.get('frame_auc', float('nan')):.4f}"),
    ("val video AUC", f"{val.get('video_auc', float('nan')):.4f}"),
    ("validation fakes", summary["val_fakes"]),
    ("checkpoints", summary["checkpoint"]),
  ]
  if summary["select"] == "best":
    rows += [
      ("best val video AUC", summary["best_val_video_auc"]),
      ("best checkpoint", f"{summary['best_checkpoint']} (what eval.py scores)"),
    ]
  else:
    rows += [("eval.py scores", "the last checkpoint (config.train.select=last)")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
