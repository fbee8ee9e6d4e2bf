"""CS-DFD and its ablations (paper Sec. IV, Algorithm 1; Table III's rows), over K streams.

``uvs``: Update Vector Search (Eq. 9-16) on every parameter, phi included.
``cgr``: Conflict Gradient Reduction on the projection phi, the plain sum of the stream
  gradients (Eq. 3) on the rest.
``csdfd``: both — CGR on phi, UVS on the rest (Algorithm 1, steps 2-4).

Streams: (o, s) by default; ``config.data.streams`` declares others (``pipeline.default_spec``),
e.g. one stream per FF++ manipulation plus SBI (``configs/effnet.py:k_streams``). UVS's K >= 3
solver and CGR's pairwise sum (the conflict loss is the sum of pairwise negative cosines) carry
any K.

CGR comes in two forms (``config.cgr.mode``):

* ``"eq24"`` (the paper's, the default): Eq. 24's diagonal-Hessian step on phi, in the gradient
  transformation. It is cubic in the gradient entries over two norms, so with tau = 0.01 it is
  about tau/P of g1 + g2 for P parameters in phi (8e-8 on the default head): numerically the sum.
* ``"exact"``: the exact gradient of the conflict loss L_phi = -sum_{i<j} cos(g_i, g_j)
  (Eq. 18), g_k = grad_{theta_p} L_k, with the backbone features and the classifier held fixed,
  weighted by ``config.cgr.weight`` (the paper has no weight: tau plays that role only through
  its approximation). With t_k = sum_{j != k} [g_j / (n_k n_j) - cos_kj g_k / n_k^2],
  grad L_phi = -sum_k H_k t_k, where H_k is the Hessian of L_k in theta_p: one forward-over-
  reverse Hessian-vector product per stream on the head alone, from the cached features. The
  term is added to every stream's phi gradient (divided by K under reduction "sum"), so the
  transform on phi is the plain reduction and the update on phi is reduce(g) + weight * grad
  L_phi. The logged stream Gram metrics then include it on phi.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from csdfd_jax.methods import Method, stream_names
from csdfd_jax.methods.step import Gradients, bce, per_stream
from csdfd_jax.transforms import csdfd, gram_matrix, sum_streams, uvs

CGR_MODES = ("eq24", "exact")


def conflict_coefficients(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(A, L_phi) for the pairwise conflict loss: t_k = sum_j A_kj g_j (module docstring)."""
  n = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 1e-30))
  outer = n[:, None] * n[None, :]
  cos = gram / outer
  off = 1.0 - jnp.eye(gram.shape[0], dtype=gram.dtype)
  a = off / outer - jnp.diag(jnp.sum(cos * off, axis=1) / n**2)
  loss = -jnp.sum(jnp.triu(cos, 1))
  return a, loss


def conflict_gradient(head_losses, theta_p, grads_p):
  """The exact gradient of L_phi (Eq. 18, pairwise for K > 2) in ``theta_p``.

  ``head_losses(theta_p, k)`` is stream k's loss as a function of the projection parameters
  alone (features fixed), ``grads_p`` the stacked [K, ...] gradients g_k = grad L_k at
  ``theta_p``. Returns (grad L_phi, L_phi)."""
  k = jax.tree.leaves(grads_p)[0].shape[0]
  a, loss = conflict_coefficients(gram_matrix(grads_p))
  t = jax.tree.map(lambda g: jnp.tensordot(a.astype(g.dtype), g, axes=1), grads_p)

  def hvp(i, t_i):
    grad_i = jax.grad(lambda th: head_losses(th, i))
    return jax.jvp(grad_i, (theta_p,), (t_i,))[1]

  hvps = jax.vmap(hvp)(jnp.arange(k), t)
  return jax.tree.map(lambda h: -jnp.sum(h, axis=0), hvps), loss


def exact_cgr_gradients(model, streams, projection: str, weight: float, reduction: str):
  """``per_stream(bce)`` plus weight * grad L_phi on every stream's projection gradient."""
  base = per_stream(bce(model, features=True), streams)
  share = 1.0 / len(streams) if reduction == "sum" else 1.0

  def gradients(params, model_state, batch, rng) -> Gradients:
    if projection not in params:
      raise ValueError(
        f"cgr.projection={projection!r} names no top-level parameter collection (have "
        f"{sorted(params)}): the exact conflict gradient needs the projection layer phi"
      )
    g = base(params, model_state, batch, rng)
    pooled = g.aux["pooled"]
    labels = jnp.stack([batch[s]["label"] for s in streams]).astype(jnp.float32)
    rngs = jax.random.split(rng, len(streams))

    def head_losses(theta_p, i):
      p = dict(params) | {projection: theta_p}
      logits = model.apply(
        {"params": p, "batch_stats": model_state},
        None,
        pooled=pooled[i],
        train=True,
        rngs={"dropout": rngs[i]},
      )
      return optax.sigmoid_binary_cross_entropy(logits, labels[i]).mean()

    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    term, loss = conflict_gradient(head_losses, f32(params[projection]), f32(g.grads[projection]))
    grads = dict(g.grads) | {
      projection: jax.tree.map(
        lambda gp, d: (gp + (weight * share) * d[None]).astype(gp.dtype),
        g.grads[projection],
        term,
      )
    }
    summed = optax.tree.norm(jax.tree.map(lambda x: jnp.sum(x, 0), f32(g.grads[projection])))
    metrics = g.metrics | {
      "conflict_loss": loss,
      "cgr_exact_ratio": weight * optax.tree.norm(term) / jnp.maximum(summed, 1e-30),
    }
    return Gradients(grads, g.losses, g.model_state, metrics)

  return gradients


def build(name: str, config) -> Method:
  streams = stream_names(config)
  k = len(streams)
  c, tau = float(config.uvs.c), float(config.cgr.tau)
  reduction = config.reduction
  opts = dict(reduction=reduction, rescale=config.uvs.rescale)
  projection = config.cgr.projection
  mode = config.cgr.get("mode", "eq24")
  if mode not in CGR_MODES:
    raise ValueError(f"config.cgr.mode={mode!r}; valid: {', '.join(CGR_MODES)}")
  if name == "uvs":
    return Method(name, streams, uvs(c, num_streams=k, **opts))
  rest = sum_streams(reduction) if name == "cgr" else None
  exact = mode == "exact"
  tx = csdfd(
    optax.identity(),
    projection=projection,
    c=c,
    tau=tau,
    num_streams=k,
    rest=rest,
    phi=sum_streams(reduction) if exact else None,
    **opts,
  )
  gradients = None
  if exact:
    weight = float(config.cgr.get("weight", 1.0))
    gradients = lambda model: exact_cgr_gradients(model, streams, projection, weight, reduction)  # noqa: E731
  return Method(name, streams, tx, gradients)
