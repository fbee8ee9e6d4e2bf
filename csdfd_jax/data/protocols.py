"""Where a run's training records come from: the embedded demo, the FFHQ mini protocol, or a
records build named by ``config.data.records``.

``prepare(config, workdir)`` builds what is missing (the demo's procedural store and records,
or the FFHQ mini store and records, by the first process) and returns the records directory.
The data goes inside the workdir, or, with ``config.data.cache`` set, into
``<cache>/<protocol>_seed<config.data.seed>``, which every run of that data seed shares (the
study command's runs do: one build for all methods). A shared cache takes one writer at a time.

``locate(config, workdir)`` only finds it: evaluation and ``predict`` read a run's data through
``locate`` and never write into a store or re-run preprocessing.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

DEMO_RECORDS = "demo_records"
DEMO_STORE = "demo_store"
MINI_DIR = "ffhq_mini"


def data_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the demo faces / the mini split; a run from before ``data.seed`` existed used
  its training seed."""
  seed = config.data.get("seed")
  return config.seed if seed is None else int(seed)


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the demo or mini data of the run in ``workdir`` lives (module docstring)."""
  cache = config.data.get("cache") or ""
  if not cache:
    return workdir
  protocol = "demo" if config.data.demo else "ffhq_mini"
  name = f"{protocol}_seed{data_seed(config)}"
  if config.data.demo:  # a demo drawn with other grain or fingerprint factors is other data
    for key, value in demo_factors(config).items():
      if value != 1.0:
        name += f"_{key.removesuffix('_scale')}{value:g}"
  return os.path.join(cache, name)


def demo_factors(config: ml_collections.ConfigDict) -> dict[str, float]:
  """``make_demo_store``'s factors from ``config.data.demo_grain`` / ``demo_fingerprint``."""
  return {
    "grain_scale": config.data.get("demo_grain", 1.0),
    "fingerprint_scale": config.data.get("demo_fingerprint", 1.0),
  }


def _demo(root: str, config: ml_collections.ConfigDict) -> str:
  """Generates the procedural demo faces and their ArrayRecords once under ``root``."""
  from csdfd_jax.data import builder, demo

  store = os.path.join(root, DEMO_STORE)
  records = os.path.join(root, DEMO_RECORDS)
  if not os.path.exists(os.path.join(records, "DONE")):
    if not os.path.exists(os.path.join(store, "index.jsonl")):
      demo.make_demo_store(store, seed=data_seed(config), **demo_factors(config))
    builder.build_records(store, records)
    with open(os.path.join(records, "DONE"), "w") as f:
      f.write("ok\n")
  return records


def prepare(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The training records, prepared if needed (see the module docstring)."""
  if not (config.data.demo or config.data.mini_root):
    return config.data.records

  root = data_dir(config, workdir)

  def build() -> str:
    if config.data.demo:
      return _demo(root, config)
    from csdfd_jax.data import mini

    out = os.path.join(root, MINI_DIR)
    return str(
      mini.prepare_ffhq_mini(config.data.mini_root, out, seed=data_seed(config))["records"]
    )

  import jax

  if jax.process_count() == 1:
    return build()
  # Several processes share the workdir: the first writes the data, the others then find it.
  from jax.experimental import multihost_utils

  if jax.process_index() == 0:
    build()
  multihost_utils.sync_global_devices("csdfd_jax: training data prepared")
  return build()


def locate(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The records ``prepare`` made for the run in ``workdir``, read-only; FileNotFoundError when
  they are not there (the run's data was moved or deleted)."""
  if not (config.data.demo or config.data.mini_root):
    return config.data.records
  from csdfd_jax.data.pipeline import find_build

  workdir = data_dir(config, workdir)
  if config.data.demo:
    records = Path(workdir) / DEMO_RECORDS
    if not (records / "DONE").exists():
      raise FileNotFoundError(
        f"{records}: the demo records of this run are missing; run train.py on the workdir again "
        "to rebuild them (nothing is rebuilt by evaluation)"
      )
    return str(records)
  root = Path(workdir) / MINI_DIR / "records"
  try:
    return str(find_build(root))
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"the FFHQ mini records of this run are missing ({e}); run train.py on the workdir again "
      "to rebuild them (nothing is rebuilt by evaluation)"
    ) from None
