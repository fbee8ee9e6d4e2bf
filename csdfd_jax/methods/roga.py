"""RoGA, robust gradient alignment over declared domains (Qiu, Jiang, Tan, ICME 2025, Eq. 3-6).

Each declared stream is a domain i with its own reals and fakes (``config.data.streams``: the
FF++ manipulation types in ``configs/roga.py``; (o, s) by default). Per domain, with the loss
L_i on its sub-batch, g_i = grad L_i(theta) and the SAM perturbation (Eq. 4)

    eps_i = rho g_i / (||g_i|| + 1e-12),     held fixed (the text after Eq. 6 "decouples" it),

RoGA minimises (Eq. 6)

    (1/K) sum_i [ L_i(theta + eps_i) - alpha <grad L_i(theta + eps_i), grad L_i(theta)> ].

Its gradient per domain, g_i^p = grad L_i(theta + eps_i) and H_i the Hessian of L_i, is

    u_i = g_i^p - alpha [ H_i(theta + eps_i) g_i + H_i(theta) g_i^p ].

``roga.mode`` says how that is computed:

* ``exact`` (default): the formula above. ``jax.linearize`` of the clean gradient gives g_i and
  v -> H_i(theta) v from one pass; one forward-over-reverse ``jax.jvp`` of the gradient at
  theta + eps_i gives g_i^p and H_i(theta + eps_i) g_i together.
* ``stopgrad_target``: grad L_i(theta) in the alignment term is a constant, dropping
  H_i(theta) g_i^p (one Hessian-vector product).
* ``first_order``: SAGM's Hessian-free form (Wang et al., CVPR 2023), u_i = grad L_i(theta +
  eps_i - alpha g_i) = stopgrad_target + O(alpha^2). The paper's code could not be obtained;
  this is probably what it runs, as its alpha = 0.001 is SAGM's default.

``roga.robust = False`` is Table III's row (c): the clean loss L_i(theta) replaces the robust
L_i(theta + eps_i) in front of the alignment term, u_i = g_i - alpha [H_i(theta + eps_i) g_i +
H_i(theta) g_i^p]. ``roga.clean_weight`` adds w * g_i (a SAGM-like clean term; Eq. 6 has
none). alpha = 0 skips the Hessian-vector products: the mean of per-domain SAM gradients
(Table III's row (b)).

Choices where the paper is silent or contradicts itself (``../shared/notes/peers.md`` 1.5):
alpha = 0.001 and rho = 0.1 (Table VI's optimum; Sec. V-A's alpha = 0.0002 is the variant
``configs/roga.py:alpha_text``). The domains combine by their mean (Eq. 6's 1/K); ``roga.combine
= "uvs"`` hands the per-domain directions u_i to UVS instead. BatchNorm running statistics come
from the clean passes only (SAGM; DeepfakeBench and SBI update them in both), averaged over
domains; the perturbed pass reuses its clean pass's dropout and drop-path rng. Under ``jit``
with sharded batches every norm is global: this is global-batch SAM, not per-device
m-sharpness. The domains run as a Python unroll, not a ``vmap`` over perturbed parameters
(that batches the convolution kernels, which XLA lowers to slow grouped convolutions).
Scale: alpha multiplies <g^p, g> ~ ||g||^2, so it depends on the loss (mean 1-logit BCE here,
2-logit CE in DeepfakeBench); the logged ``roga/align/<d>`` shows the size of the term.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from csdfd_jax.methods import Method, stream_names
from csdfd_jax.methods.step import (
  GradFn,
  Gradients,
  LossFn,
  bce_loss,
  mean_stats,
  stack_batch,
  stream_rngs,
  tree_axpy,
  tree_norm,
  tree_vdot,
)
from csdfd_jax.transforms import stack_streams, sum_streams, uvs

MODES = ("exact", "stopgrad_target", "first_order")
COMBINE = ("mean", "uvs")


def sam_perturbation(g, rho: float):
  """eps = rho g / (||g|| + 1e-12) (Eq. 4; SAM), a constant for differentiation."""
  scale = rho / (tree_norm(g) + 1e-12)
  return jax.lax.stop_gradient(jax.tree.map(lambda x: (scale * x).astype(x.dtype), g))


def domain_update(
  loss_fn: LossFn,
  params,
  model_state,
  stream: dict,
  rng,
  *,
  rho: float,
  alpha: float,
  mode: str = "exact",
  robust: bool = True,
  clean_weight: float = 0.0,
):
  """One domain's RoGA direction u_i (module docstring), its clean loss, the clean pass's
  proposed statistics and its scalars. ``loss_fn`` is ``step.LossFn``."""
  if mode not in MODES:
    raise ValueError(f"roga.mode={mode!r}; valid: {', '.join(MODES)}")
  if mode == "first_order" and alpha != 0.0 and not robust:
    raise ValueError(
      "roga.mode='first_order' with roga.robust=False is not defined (SAGM's trick needs the "
      "robust loss); use mode 'exact' or 'stopgrad_target' for Table III's row (c)"
    )

  def grad_fn(q):
    (loss, (stats, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(q, model_state, stream, rng)
    return g, (loss, stats, aux)

  second_order = alpha != 0.0 and mode != "first_order"
  if second_order and mode == "exact":
    g, hvp_clean, (loss, stats, aux) = jax.linearize(grad_fn, params, has_aux=True)
  else:
    g, (loss, stats, aux) = grad_fn(params)
    hvp_clean = None
  eps = sam_perturbation(g, rho)
  perturbed = tree_axpy(1.0, eps, params)

  if not second_order:
    if mode == "first_order" and alpha != 0.0:
      perturbed = tree_axpy(-alpha, g, perturbed)  # theta + eps - alpha g
    gp, (loss_p, _, _) = grad_fn(perturbed)
    u = gp if robust else g
  else:
    gp, hg, (loss_p, _, _) = jax.jvp(lambda q: grad_fn(q), (perturbed,), (g,), has_aux=True)
    correction = hg if hvp_clean is None else jax.tree.map(jnp.add, hg, hvp_clean(gp))
    u = tree_axpy(-alpha, correction, gp if robust else g)
  if clean_weight:
    u = tree_axpy(clean_weight, g, u)

  g_norm, gp_norm = tree_norm(g), tree_norm(gp)
  align = tree_vdot(gp, g)
  metrics = {
    "loss_perturbed": loss_p,
    "align": align,
    "cos": align / jnp.maximum(g_norm * gp_norm, 1e-30),
    "eps_norm": tree_norm(eps),
    "accuracy": aux["accuracy"],
  }
  return u, loss, stats, metrics


def domain_gradients(
  loss_fn: LossFn, streams: tuple[str, ...], *, prefix: str = "roga", **options
) -> GradFn:
  """The ``GradFn`` of ``domain_update`` over ``streams`` (a Python unroll), stacked [K, ...].

  Logs ``loss/perturbed/<d>``, ``<prefix>/align/<d>`` (<g^p, g>), ``<prefix>/cos/<d>``,
  ``<prefix>/eps_norm/<d>`` (equals rho) and ``accuracy/<d>``."""

  def gradients(params, model_state, batch, rng) -> Gradients:
    stacked = stack_batch(batch, streams)
    rngs = stream_rngs(rng, streams)
    outs = [
      domain_update(
        loss_fn,
        params,
        model_state,
        jax.tree.map(lambda x, i=i: x[i], stacked),
        rngs[i],
        **options,
      )
      for i in range(len(streams))
    ]
    us, losses, stats, per = zip(*outs, strict=True)
    metrics = {}
    for s, m in zip(streams, per, strict=True):
      metrics[f"loss/perturbed/{s}"] = m["loss_perturbed"]
      metrics[f"accuracy/{s}"] = m["accuracy"]
      for k in ("align", "cos", "eps_norm"):
        metrics[f"{prefix}/{k}/{s}"] = m[k]
    return Gradients(
      stack_streams(*us), jnp.stack(losses), mean_stats(stack_streams(*stats)), metrics
    )

  return gradients


def options(config) -> dict:
  r = config.roga
  return dict(
    rho=float(r.rho),
    alpha=float(r.alpha),
    mode=r.mode,
    robust=bool(r.robust),
    clean_weight=float(r.clean_weight),
  )


def build(name: str, config) -> Method:
  """RoGA over the declared streams (``config.data.streams``, at least two domains)."""
  streams = stream_names(config)
  opts = options(config)
  if opts["mode"] not in MODES:
    raise ValueError(f"config.roga.mode={opts['mode']!r}; valid: {', '.join(MODES)}")
  if opts["mode"] == "first_order" and opts["alpha"] and not opts["robust"]:
    raise ValueError(
      "config.roga.mode='first_order' with config.roga.robust=False is not defined (SAGM's "
      "trick needs the robust loss); use mode 'exact' or 'stopgrad_target' for row (c)"
    )
  if opts["rho"] < 0:
    raise ValueError(f"config.roga.rho={opts['rho']} must be >= 0")
  combine = config.roga.combine
  if combine not in COMBINE:
    raise ValueError(f"config.roga.combine={combine!r}; valid: {', '.join(COMBINE)}")
  if combine == "mean":
    tx = sum_streams("mean")
  else:
    tx = uvs(float(config.uvs.c), num_streams=len(streams), reduction="mean")
  make: Callable = lambda model: domain_gradients(bce_loss(model), streams, **opts)  # noqa: E731
  return Method(name, streams, tx, make)
