"""Train a deepfake detector: ``python train.py --config=configs/effnet.py --workdir=DIR``.

Overrides: ``--config.method=uvs --config.data.records=/data/ffpp_records``. The config is
locked after overrides, so a mistyped key fails with the valid keys listed. Running again
with the same ``--workdir`` resumes from its last checkpoint. Multi-host: pass
``--distributed`` on every host (jax.distributed.initialize reads the cluster from the
environment).
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
flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  from csdfd_jax import train_lib

  config = FLAGS.config
  config.lock()
  logging.set_verbosity(logging.WARNING)
  try:
    summary = train_lib.train_and_evaluate(config, FLAGS.workdir)
  except (train_lib.TrainingError, ValueError, FileNotFoundError) as e:
    sys.exit(f"train.py: {e}")
  print(train_lib.format_summary(summary))
  print(json.dumps({"summary": f"{FLAGS.workdir}/summary.json"}))


if __name__ == "__main__":
  app.run(main)
