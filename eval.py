"""Entry point for evaluation (`python eval.py --config=... --workdir=...`).

Evaluation is not implemented yet: this release ships the UVS/CGR optimizer transforms
(csdfd_jax.transforms). This script says so and exits non-zero rather than pretend.
"""

import sys

if __name__ == "__main__":
  sys.exit(
    "eval.py: evaluation is not implemented yet. This release provides the UVS/CGR optax "
    "transformations (csdfd_jax.transforms); see README.md, section Status."
  )
