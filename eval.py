"""Evaluate trained runs: ``python eval.py --workdir=RUN [--workdir=RUN2 ...]``.

Scores each run's best-validation checkpoint (``--checkpoint=last`` or a step number for
another) on the test sets of its config (``--test_sets=name=records[:split],...`` to
override; the first set is the source domain, the rest are averaged as targets) and writes
results.{md,csv,tex,json} and PNG plots to ``--out`` (default: the first workdir's ``eval/``).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "train.py run directory; repeat for side-by-side rows.")
flags.DEFINE_string("checkpoint", "best", "'best' (validation AUC), 'last' or a step number.")
flags.DEFINE_string("test_sets", "", "name=records_dir[:split][@datasets],... (default: config's).")
flags.DEFINE_string("out", None, "Output folder (default: <first workdir>/eval).")
flags.DEFINE_integer("frames_per_video", None, "Frames per video (default: config.eval's, 32).")
flags.DEFINE_integer("batch_size", None, "Eval batch size (default: the config's).")
flags.DEFINE_bool("gradcam", True, "Also draw Grad-CAM grids of sample test faces (Fig. 4).")
flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  from csdfd_jax import eval_lib

  first = FLAGS.workdir[0]
  try:
    config, *_ = eval_lib.load_run(first, FLAGS.checkpoint)
    if FLAGS.test_sets:
      test_sets = eval_lib.parse_test_sets(FLAGS.test_sets)
    else:
      test_sets = eval_lib.default_test_sets(config, first)
    frames = FLAGS.frames_per_video or config.eval.frames_per_video
    out = FLAGS.out or os.path.join(first, "eval")
    runs, paths = eval_lib.evaluate(
      FLAGS.workdir,
      test_sets,
      out,
      which=FLAGS.checkpoint,
      frames_per_video=frames,
      batch_size=FLAGS.batch_size,
      gradcam=FLAGS.gradcam,
    )
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"eval.py: {e}")
  print("video-level AUC (%), first set = source domain:")
  print(eval_lib.format_table(runs, [t.name for t in test_sets]))
  print(f"\nwritten: {', '.join(paths[k] for k in ('md', 'csv', 'tex', 'json'))}")
  print(f"plots:   {', '.join(paths['plots'])}")


if __name__ == "__main__":
  app.run(main)
