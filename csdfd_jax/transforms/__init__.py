"""optax transformations of CS-DFD: UVS and CGR, on stacked stream gradients.

This subpackage imports nothing else from csdfd_jax, so another JAX project can use
it on its own.
"""

from csdfd_jax.transforms.cgr import CGRState, cgr, cgr_diagnostics
from csdfd_jax.transforms.partition import csdfd, opt_state_scalars, path_labels
from csdfd_jax.transforms.stacked import (
  combine,
  gram_matrix,
  num_streams,
  stack_streams,
  stream_sum,
  sum_streams,
)
from csdfd_jax.transforms.uvs import UVSSolution, UVSState, solve_dual, uvs, uvs_diagnostics

__all__ = [
  "CGRState",
  "UVSSolution",
  "UVSState",
  "cgr",
  "cgr_diagnostics",
  "combine",
  "csdfd",
  "gram_matrix",
  "num_streams",
  "opt_state_scalars",
  "path_labels",
  "solve_dual",
  "stack_streams",
  "stream_sum",
  "sum_streams",
  "uvs",
  "uvs_diagnostics",
]
