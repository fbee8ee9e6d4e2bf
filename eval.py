"""Evaluate trained runs: ``python eval.py --workdir=RUN [--workdir=RUN2 ...]``.

Scores the checkpoint each run's ``config.train.select`` names (``last`` by default;
``--checkpoint=best|last|STEP`` to override) on the test sets of its config
(``--test_sets=name=records[:split][@datasets][#domains],...`` to override; the first set is
the source domain, the rest are averaged as targets) and writes results.{md,csv,tex,json} and
PNG plots to ``--out`` (default: the first workdir's ``eval/``). The protocol's open choices
(checkpoint, frames per video, faces per frame, videos without a face) come from the run's
``config.eval`` unless a flag overrides them, and every table carries them as footnotes.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "train.py run directory; repeat for side-by-side rows.")
flags.DEFINE_string(
  "checkpoint", None, "'best' (validation AUC), 'last' or a step (default: config.train.select)."
)
flags.DEFINE_string(
  "test_sets", "", "name=records_dir[:split][@datasets][#domains],... (default: config's)."
)
flags.DEFINE_string("out", None, "Output folder (default: <first workdir>/eval).")
flags.DEFINE_integer("frames_per_video", None, "Frames per video (default: config.eval's, 32).")
flags.DEFINE_integer("batch_size", None, "Eval batch size (default: the config's).")
flags.DEFINE_enum(
  "faces_per_frame", None, ["all", "largest"], "Faces scored per frame (default: config.eval's)."
)
flags.DEFINE_enum(
  "no_face", None, ["chance", "drop"], "Videos with no face: score 0.5 or drop (default: config's)."
)
flags.DEFINE_bool("gradcam", True, "Also draw Grad-CAM grids of sample test faces (Fig. 4).")
flags.DEFINE_float(
  "p_real", 0.5, "Prior of GM-DF's EER and M_EER (0.5: the plain equal error rate).", lower_bound=0
)
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
    out = FLAGS.out or os.path.join(first, "eval")
    runs, paths = eval_lib.evaluate(
      FLAGS.workdir,
      test_sets,
      out,
      which=FLAGS.checkpoint,
      frames_per_video=FLAGS.frames_per_video,
      batch_size=FLAGS.batch_size,
      faces=FLAGS.faces_per_frame,
      no_face=FLAGS.no_face,
      gradcam=FLAGS.gradcam,
      p_real=FLAGS.p_real,
    )
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"eval.py: {e}")
  print("video-level AUC (%), first set = source domain:")
  names = [t.name for t in test_sets]
  print(eval_lib.format_table(runs, names))
  print("".join(f"\n  {n}" for n in eval_lib.footnotes(runs, names)))
  print(f"\nvideo-level EER (%) at P_real = {FLAGS.p_real}; M_EER = the worst target set's:")
  print(eval_lib.format_table(runs, names, eer=FLAGS.p_real))
  print(f"\nwritten: {', '.join(paths[k] for k in ('md', 'csv', 'tex', 'json'))}")
  print(f"plots:   {', '.join(paths['plots'])}")


if __name__ == "__main__":
  app.run(main)
