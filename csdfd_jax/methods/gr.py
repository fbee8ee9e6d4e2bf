"""Gradient regularisation with a Perturbation Injection Module (PIM), and DualFlat
(Guan, Wang, Dong, Peng, IEEE TIFS 19, 2024; Eq. 5-14, Algorithm 1).

The regulariser is the sensitivity of the loss to the instance statistics of shallow features
(Eq. 5): min L + lambda ||grad_{mu,sigma} L||. The PIM sits at a shallow site of the backbone.
With the per-sample, per-channel statistics mu, sigma of the site's output f (over the spatial
axes, or the tokens of a ViT), it replaces f by (Eq. 6-7)

    f' = (f - mu) / sigma * (sigma + d_sigma) + (mu + d_mu),     sigma = sqrt(var + 1e-6),

so the mean of f' moves by exactly d_mu and its std by d_sigma. The perturbation
Delta = (d_mu, d_sigma) is one vector per channel shared over the batch (Sec. III-D) and is set
by a first pass at Delta = 0 (Eq. 9):

    Delta = r grad_Delta L / ||grad_Delta L||,     one norm over every site, mu and sigma.

A second pass gives g2 = grad_theta L(f'); the update is (1 - alpha) g1 + alpha g2 (Eq. 12,
Algorithm 1), g1 = grad_theta L at Delta = 0. It equals the gradient of Eq. 5 with lambda =
alpha r up to O(r^2). At the paper's alpha = 1 the first pass needs only grad_Delta L; that
path is taken (XLA then drops the weight gradients of the first pass). alpha = 0 or r = 0 is
ERM. ``gr.delta="per_sample"`` gives one Delta per sample and channel, as two public student
re-implementations do (not the paper's; for comparison).

DualFlat (Eq. 14) adds flatness in the weights: (1 - alpha - beta) g1 + alpha g2 + beta g3 with
g3 = grad L(theta + r' g1/||g1||) (SAM with rho = r', without the PIM). beta = 0 is GR;
alpha = 0, beta = 1 is SAM.

The module has no parameters: it is injected with ``flax.linen.intercept_methods`` around the
site module's ``__call__`` during training only. Inference runs the unchanged model and a
checkpoint has the plain detector's parameter tree. Sites are module paths under the backbone
(``gr.sites``, comma-separated; default per family in ``DEFAULT_SITES``; an index ``-1`` names
the last block of a stage). A site that does not exist is an error listing the ones that do.

Choices where the paper is silent (``../shared/notes/peers.md`` 2.5): the default site is the
output of the first stage (the paper's ConvNeXt-B: "all three blocks of the first stage");
BatchNorm running statistics come from the clean first pass; both passes use the same dropout
rng; each stream gets its own Delta from its own sub-batch, and the streams combine as O+S
(``config.reduction``). r is in feature units, so its effect depends on the site's scale; the
logged ``pim/loss_gap`` (L' - L) and ``pim/sensitivity`` (||grad_Delta L||) show it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from csdfd_jax.methods import Method
from csdfd_jax.methods.roga import sam_perturbation
from csdfd_jax.methods.step import (
  Gradients,
  mean_stats,
  stack_batch,
  stream_rngs,
  tree_axpy,
  tree_norm,
  tree_vdot,
)
from csdfd_jax.transforms import stack_streams, sum_streams

# Module paths under the backbone; "-1" is the last block of the stage.
DEFAULT_SITES = {
  "convnext": ("stages_0",),
  "resnet": ("layer1_-1",),
  "efficientnet": ("blocks_0_-1",),
  "xception": ("block1",),
  "vit": ("blocks_0",),
}
DELTA = ("shared", "per_sample")
EPS = 1e-6


def perturb(f: jax.Array, d_mu: jax.Array, d_sigma: jax.Array) -> jax.Array:
  """Eq. 6-7 on features [B, ..., C] (statistics over the middle axes), in at least float32.
  ``d_mu``/``d_sigma``: [C] (shared) or [B, C] (per sample)."""
  dtype = jnp.promote_types(f.dtype, jnp.float32)
  x = f.astype(dtype)
  axes = tuple(range(1, x.ndim - 1))
  mu = jnp.mean(x, axes, keepdims=True)
  sigma = jnp.sqrt(jnp.var(x, axes, keepdims=True) + EPS)
  shape = (-1,) + (1,) * len(axes) + (x.shape[-1],)
  d_mu = d_mu.astype(dtype).reshape(shape if d_mu.ndim == 2 else (1,) * (x.ndim - 1) + (-1,))
  d_sigma = d_sigma.astype(dtype).reshape(d_mu.shape)
  return ((x - mu) / sigma * (sigma + d_sigma) + (mu + d_mu)).astype(f.dtype)


def _path(context) -> str:
  return "/".join(context.module.path)


def module_outputs(model: nn.Module, variables, images) -> dict[str, Any]:
  """Every module path the forward calls, with its output's shape and dtype (a probe)."""
  seen: dict[str, Any] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and hasattr(out, "shape"):
      seen.setdefault(_path(context), jax.ShapeDtypeStruct(out.shape, out.dtype))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  return seen


def resolve_sites(sites: tuple[str, ...], outputs: dict[str, Any]) -> tuple[str, ...]:
  """Full module paths ("backbone/<site>") of ``sites``; "-1" is the highest block index."""
  out = []
  for site in sites:
    path = f"backbone/{site}"
    if path.endswith("_-1"):
      stem = re.escape(path[: -len("-1")])
      found = [p for p in outputs if re.fullmatch(stem + r"\d+", p)]
      path = max(found, key=lambda p: int(p.rsplit("_", 1)[1])) if found else path
    if path not in outputs:
      shallow = [p[len("backbone/") :] for p in outputs if p.count("/") == 1]
      raise ValueError(
        f"gr.sites: {site!r} is no module of this backbone; its top-level modules are "
        f"{', '.join(shallow)}"
      )
    out.append(path)
  return tuple(out)


def pim_loss(model: nn.Module) -> Callable:
  """``loss(params, model_state, stream, rng, delta)``: the BCE of ``step.bce_loss`` with the
  PIM applied at each site of ``delta`` ({path: (d_mu, d_sigma)}); ``delta=None`` is the plain
  model. Each site must fire exactly once."""

  def loss_fn(params, model_state, stream, rng, delta):
    fired: list[str] = []

    def inject(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = _path(context)
      if context.method_name == "__call__" and path in delta:
        fired.append(path)
        out = perturb(out, *delta[path])
      return out

    def apply():
      return model.apply(
        {"params": params, "batch_stats": model_state},
        stream["image"],
        train=True,
        rngs={"dropout": rng},
        mutable=["batch_stats"],
      )

    if delta:
      with nn.intercept_methods(inject):
        logits, mutated = apply()
      if sorted(fired) != sorted(delta):
        raise ValueError(f"PIM sites fired {fired}, expected each of {sorted(delta)} once")
    else:
      logits, mutated = apply()
    labels = stream["label"].astype(jnp.float32)
    loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    aux = {"accuracy": jnp.mean((logits > 0) == (labels > 0.5))}
    return loss, (mutated.get("batch_stats", {}), aux)

  return loss_fn


def zero_delta(outputs: dict[str, Any], sites, batch: int, mode: str):
  """Delta = 0 at every site: (d_mu, d_sigma) of [C] (shared) or [B, C] (per sample), in the
  site's compute dtype promoted to at least float32."""
  out = {}
  for s in sites:
    shape = ((batch,) if mode == "per_sample" else ()) + outputs[s].shape[-1:]
    dtype = jnp.promote_types(outputs[s].dtype, jnp.float32)
    out[s] = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  return out


def stream_update(
  loss_fn,
  params,
  model_state,
  stream,
  rng,
  zero,
  *,
  r: float,
  alpha: float,
  beta: float = 0.0,
  r_sam: float = 0.05,
):
  """One stream's GR / DualFlat direction (module docstring), its clean loss, the clean pass's
  statistics and scalars. Terms with a zero weight are not computed (static)."""
  w_clean = 1.0 - alpha - beta
  need_g1 = w_clean != 0.0 or beta != 0.0
  metrics: dict[str, jax.Array] = {}
  g1 = g_delta = None
  if need_g1 and alpha != 0.0:
    (loss, (stats, aux)), (g1, g_delta) = jax.value_and_grad(loss_fn, argnums=(0, 4), has_aux=True)(
      params, model_state, stream, rng, zero
    )
  elif need_g1:  # no PIM term: the plain gradient
    (loss, (stats, aux)), g1 = jax.value_and_grad(loss_fn, has_aux=True)(
      params, model_state, stream, rng, None
    )
  else:  # alpha = 1: the first pass needs only grad_Delta (Sec. III-D)
    (loss, (stats, aux)), g_delta = jax.value_and_grad(
      lambda d: loss_fn(params, model_state, stream, rng, d), has_aux=True
    )(zero)
  terms = []
  if alpha != 0.0:
    sensitivity = tree_norm(g_delta)
    scale = r / (sensitivity + 1e-12)
    delta = jax.lax.stop_gradient(jax.tree.map(lambda g: (scale * g).astype(g.dtype), g_delta))
    (loss_p, _), g2 = jax.value_and_grad(loss_fn, has_aux=True)(
      params, model_state, stream, rng, delta
    )
    terms.append((alpha, g2))
    metrics |= {
      "sensitivity": sensitivity,
      "delta_norm": tree_norm(delta),
      "loss_gap": loss_p - loss,
    }
    if g1 is not None:
      metrics["cos_g1_g2"] = tree_vdot(g1, g2) / jnp.maximum(tree_norm(g1) * tree_norm(g2), 1e-30)
  if w_clean != 0.0:
    terms.append((w_clean, g1))
  if beta != 0.0:
    moved = tree_axpy(1.0, sam_perturbation(g1, r_sam), params)
    (loss_s, _), g3 = jax.value_and_grad(loss_fn, has_aux=True)(
      moved, model_state, stream, rng, None
    )
    terms.append((beta, g3))
    metrics["loss_sam_gap"] = loss_s - loss
  (w, first), rest = terms[0], terms[1:]
  u = first if w == 1.0 else jax.tree.map(lambda x: (w * x).astype(x.dtype), first)
  for w, g in rest:
    u = tree_axpy(w, g, u)
  metrics["accuracy"] = aux["accuracy"]
  return u, loss, stats, metrics


def pim_gradients(
  model: nn.Module,
  streams: tuple[str, ...],
  sites: tuple[str, ...],
  *,
  delta_mode: str = "shared",
  **options,
) -> Callable:
  """The ``GradFn`` of GR / DualFlat over ``streams`` (a Python unroll), logging
  ``pim/<scalar>/<stream>``. ``alpha = beta = 0`` is plain per-stream BCE."""
  loss_fn = pim_loss(model)

  def gradients(params, model_state, batch, rng) -> Gradients:
    stacked = stack_batch(batch, streams)
    rngs = stream_rngs(rng, streams)
    first = jax.tree.map(lambda x: x[0], stacked)
    variables = {"params": params, "batch_stats": model_state}
    shapes = module_outputs(model, variables, first["image"])
    paths = resolve_sites(sites, shapes)
    zero = zero_delta(shapes, paths, first["image"].shape[0], delta_mode)
    outs = []
    for i in range(len(streams)):
      stream = jax.tree.map(lambda x, i=i: x[i], stacked)
      outs.append(stream_update(loss_fn, params, model_state, stream, rngs[i], zero, **options))
    us, losses, stats, per = zip(*outs, strict=True)
    metrics = {}
    for s, m in zip(streams, per, strict=True):
      metrics[f"accuracy/{s}"] = m.pop("accuracy")
      metrics |= {f"pim/{k}/{s}": v for k, v in m.items()}
    return Gradients(
      stack_streams(*us), jnp.stack(losses), mean_stats(stack_streams(*stats)), metrics
    )

  return gradients


def default_sites(family: str) -> tuple[str, ...]:
  if family not in DEFAULT_SITES:
    raise ValueError(f"gr.sites: no default PIM site for model family {family!r}; name one")
  return DEFAULT_SITES[family]


def build(name: str, config) -> Method:
  """``gr`` (``config.gr.alpha``) or ``dualflat`` (``config.dualflat.{alpha, beta, r_sam}``)
  over ``config.gr.streams``, with ``config.gr``'s r, sites and delta for both. DualFlat keeps its
  weights in its own section so that a study can run gr and dualflat side by side."""
  g = config.gr
  streams = tuple(s.strip() for s in g.streams.split(",") if s.strip())
  if not streams:
    raise ValueError("config.gr.streams is empty: name the streams, e.g. 'o' or 'o,s'")
  sites = tuple(s.strip() for s in g.sites.split(",") if s.strip())
  sites = sites or default_sites(config.model.name)
  if g.delta not in DELTA:
    raise ValueError(f"config.gr.delta={g.delta!r}; valid: {', '.join(DELTA)}")
  if name == "dualflat":
    d = config.dualflat
    alpha, beta, r_sam = float(d.alpha), float(d.beta), float(d.r_sam)
    checks = (
      ("gr.r", g.r),
      ("dualflat.alpha", alpha),
      ("dualflat.beta", beta),
      ("dualflat.r_sam", r_sam),
    )
    if beta == 0.0:
      raise ValueError("config.dualflat.beta = 0 is GR without the SAM term: use method 'gr'")
  else:
    alpha, beta, r_sam = float(g.alpha), 0.0, 0.0
    checks = (("gr.r", g.r), ("gr.alpha", alpha))
  for key, value in checks:
    if float(value) < 0:
      raise ValueError(f"config.{key}={value} must be >= 0")
  if alpha > 1.0 + 1e-9:
    raise ValueError(f"alpha = {alpha} > 1 (Eq. 12 weights)")
  if alpha + beta > 1.0 + 1e-9:
    raise ValueError(f"config.dualflat.alpha + beta = {alpha + beta} > 1 (Eq. 14 weights)")
  options = dict(r=float(g.r), alpha=alpha, beta=beta, r_sam=r_sam)

  def make(model):
    return pim_gradients(model, streams, sites, delta_mode=g.delta, **options)

  return Method(name, streams, sum_streams(config.reduction), make)
