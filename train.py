"""Train a deepfake detector: ``python train.py --config=configs/effnet.py --workdir=DIR``.

Overrides: ``--config.method=uvs --config.data.records=/data/ffpp_records``. The config is
locked after overrides, so a mistyped key fails with the valid keys listed. Running again
with the same ``--workdir`` resumes from its last checkpoint.

Multi-host: run the same command on every host with ``--distributed``. On SLURM, Open MPI
and Kubernetes/Cloud TPU ``jax.distributed.initialize`` finds the cluster itself; elsewhere
add ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. Each process reads
its own shard of every batch; the workdir must be on a filesystem all hosts share.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/effnet.py", "Training config file[:variant].")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); resumed if it exists.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
flags.mark_flags_as_required(["workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-file and override errors (a missing file, a mistyped
  key, a wrongly typed value) as one clear line instead of ml_collections' traceback."""
  try:
    return FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - config_flags raises AttributeError, KeyError, ...
    text = str(e.args[0] if e.args else e).strip().strip("'\"").replace("\\n", " ")
    text = " ".join(line.strip() for line in text.replace("\\'", "'").splitlines() if line.strip())
    sys.exit(f"train.py: bad flag or config ({type(e).__name__}): {text}")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax

  manual = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(v is not None for v in manual) and not FLAGS.distributed:
    raise app.UsageError("--coordinator_address/--num_processes/--process_id need --distributed")
  if FLAGS.distributed:
    jax.distributed.initialize(*manual)
  from csdfd_jax import train_lib
  from csdfd_jax.workdir import WorkdirError

  try:
    config = FLAGS.config
    config.lock()
  except OSError as e:  # ml_collections defers a config file's load error to its first use
    sys.exit(f"train.py: {' '.join(str(e).split())}")
  logging.set_verbosity(logging.WARNING)
  try:
    summary = train_lib.train_and_evaluate(config, FLAGS.workdir)
  except (train_lib.TrainingError, WorkdirError, ValueError, FileNotFoundError) as e:
    sys.exit(f"train.py: {e}")
  print(train_lib.format_summary(summary))
  print(json.dumps({"summary": f"{FLAGS.workdir}/summary.json"}))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
