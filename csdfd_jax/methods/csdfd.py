"""CS-DFD and its ablations (paper Sec. IV, Algorithm 1; Table III's rows).

``uvs``: Update Vector Search (Eq. 9-16) on every parameter, phi included.
``cgr``: Conflict Gradient Reduction (Eq. 24) on the projection phi, the plain sum of the
  stream gradients (Eq. 3) on the rest.
``csdfd``: both — CGR on phi, UVS on the rest (Algorithm 1, steps 2-4).
"""

from __future__ import annotations

import optax

from csdfd_jax.methods import Method
from csdfd_jax.methods.erm import sum_streams
from csdfd_jax.transforms import cgr, csdfd, path_labels, uvs


def build(name: str, config) -> Method:
  c, tau = float(config.uvs.c), float(config.cgr.tau)
  opts = dict(reduction=config.reduction, rescale=config.uvs.rescale)
  projection = config.cgr.projection
  if name == "uvs":
    tx = uvs(c, num_streams=2, **opts)
  elif name == "cgr":
    is_phi = lambda path: projection in path  # noqa: E731
    tx = optax.partition(
      {
        "cgr": cgr(tau, num_streams=2, reduction=opts["reduction"]),
        "uvs": sum_streams(opts["reduction"]),
      },
      lambda params: path_labels(params, is_phi),
    )
  else:
    tx = csdfd(optax.identity(), projection=projection, c=c, tau=tau, num_streams=2, **opts)
  return Method(name, ("o", "s"), tx)
