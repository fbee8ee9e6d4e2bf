"""The step every method shares, and the gradient contract a method fills in.

A method (``csdfd_jax.methods.Method``) produces its own gradients: ``gradients(model)``
returns a pure ``GradFn (params, model_state, batch, rng) -> Gradients`` whose ``grads`` are
stacked ``[K, ...]`` over the method's streams (K = 1 for a method that combines them itself),
with the per-stream losses, the new model state (BatchNorm statistics) and the method's own
scalars. Its ``transform`` then maps the stacked gradients to one update and the base optimizer
follows. ``make_step`` keeps everything generic around that: the finite guard, the norms, the
stream Gram metrics, the method's diagnostics, the learning rate; no method is named here.

``bce`` is the gradient of one stream's binary cross-entropy on one fake logit, and
``per_stream`` turns any such stream gradient into a ``GradFn`` over K streams: ``jax.vmap``
over the stream axis, so each stream k has its own sub-batch (its own reals) and the stacked
gradients cost K half-size backward passes, not K full ones (DESIGN). Inside the vmap every
stream normalises with its own BatchNorm batch statistics, exactly as if it were a separate
forward pass. A method that needs extra forward passes (SAM-like perturbations) keeps the
BatchNorm statistics of its clean pass and discards the others.

BatchNorm running statistics: each stream's forward proposes updated running statistics;
the new running statistics are their mean over the streams. For an EMA with momentum m this
equals one EMA update with the mean of the streams' batch moments. The running mean therefore
tracks the mean of the mixture of the streams the model is evaluated on; the running variance
tracks the mean *within-stream* variance, which misses the mixture's between-stream term (for
two equal-sized streams, a quarter of the squared difference of their batch means). That term
is small when the streams share their reals' statistics, as O and S do here.

A step whose loss or gradient is not finite leaves the state unchanged (params, optimizer
state and statistics; only ``step`` advances) and reports ``finite = 0`` so the loop can
stop with the step named and the last good checkpoint intact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from csdfd_jax.transforms import gram_matrix, opt_state_scalars, stream_sum

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array


def create_train_state(variables: PyTree, tx: optax.GradientTransformation, rng) -> TrainState:
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=rng,
  )


def _up(tree):
  """The tree in at least float32 (float64 stays float64)."""
  return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def tree_norm(tree) -> jax.Array:
  """The global L2 norm of a tree, in at least float32."""
  return optax.tree.norm(_up(tree))


def tree_vdot(a, b) -> jax.Array:
  """<a, b> over all leaves, in at least float32."""
  pairs = zip(jax.tree.leaves(_up(a)), jax.tree.leaves(_up(b)), strict=True)
  return sum(jnp.vdot(x, y) for x, y in pairs)


def tree_axpy(alpha, x, y):
  """y + alpha * x, leafwise, in y's dtypes."""
  return jax.tree.map(lambda a, b: (b + alpha * a).astype(b.dtype), x, y)


def stream_metrics(grads: PyTree, streams: tuple[str, ...]) -> dict[str, jax.Array]:
  """Per-stream gradient norms, the norm of their sum and, for two streams, their cosine
  (paper Fig. 2/5), all from one Gram matrix: ||sum_k g_k||^2 = sum_ij <g_i, g_j>."""
  gram = gram_matrix(grads)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  out = {f"grad_norm/{s}": norms[i] for i, s in enumerate(streams)}
  out["grad_norm"] = jnp.sqrt(jnp.maximum(jnp.sum(gram), 0.0))
  if len(streams) == 2:
    out["stream_cosine"] = gram[0, 1] / jnp.maximum(norms[0] * norms[1], 1e-30)
  return out


class Gradients(NamedTuple):
  """What a method's gradient function returns for one step."""

  grads: PyTree  # stacked [K, ...] over the method's streams
  losses: jax.Array  # [K], the per-stream losses (logged as loss/<stream>)
  model_state: PyTree  # the new BatchNorm statistics, already merged over streams
  metrics: dict[str, jax.Array]  # the method's own scalars, logged as they are
  aux: dict[str, Any] = {}  # extra outputs (e.g. features) for a method that builds on this


GradFn = Callable[[PyTree, PyTree, dict, jax.Array], Gradients]
# (params, model_state, stream batch, rng) -> (loss, grads, new model state, aux)
StreamGradFn = Callable[[PyTree, PyTree, dict, jax.Array], tuple[jax.Array, PyTree, PyTree, dict]]


LossFn = Callable[[PyTree, PyTree, dict, jax.Array], tuple[jax.Array, tuple[PyTree, dict]]]
# (params, model_state, one stream's batch, rng) -> (loss, (proposed model state, aux))


def bce_loss(model: nn.Module, *, features: bool = False) -> LossFn:
  """One stream's mean sigmoid binary cross-entropy on the detector's fake logit (paper Eq. 1),
  with the proposed BatchNorm statistics and ``aux["accuracy"]`` (plus the backbone features
  ``aux["pooled"]`` when ``features``). A method that differentiates the loss its own way
  (perturbed passes, Hessian-vector products) starts from this."""
  mutable = ["batch_stats", "intermediates"] if features else ["batch_stats"]

  def loss_fn(params, model_state, stream, rng):
    logits, mutated = model.apply(
      {"params": params, "batch_stats": model_state},
      stream["image"],
      train=True,
      rngs={"dropout": rng},
      mutable=mutable,
    )
    labels = stream["label"].astype(jnp.float32)
    loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    aux = {"accuracy": jnp.mean((logits > 0) == (labels > 0.5))}
    if features:
      aux["pooled"] = mutated["intermediates"]["pooled"][0]
    return loss, (mutated.get("batch_stats", {}), aux)

  return loss_fn


def bce(model: nn.Module, *, features: bool = False) -> StreamGradFn:
  """The gradient of ``bce_loss``: (loss, grads, proposed statistics, aux) for one stream."""
  loss_fn = bce_loss(model, features=features)

  def stream_grad(params, model_state, stream, rng):
    (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, model_state, stream, rng
    )
    return loss, grads, stats, aux

  return stream_grad


def stack_batch(batch: dict, streams: tuple[str, ...]) -> dict:
  """``{field: [K, B, ...]}`` from ``{stream: {field: [B, ...]}}`` in the order of ``streams``."""
  return {k: jnp.stack([batch[s][k] for s in streams]) for k in batch[streams[0]]}


def stream_rngs(rng: jax.Array, streams: tuple[str, ...]) -> jax.Array:
  """One rng per stream, the same for every pass of a step over that stream (a perturbed pass
  reuses its clean pass's dropout and drop-path masks)."""
  return jax.random.split(rng, len(streams))


def mean_stats(stats: PyTree) -> PyTree:
  """The new running statistics: the mean over the stream axis of the streams' proposals."""
  return jax.tree.map(lambda x: stream_sum(x) / x.shape[0], stats)


def per_stream(stream_grad: StreamGradFn, streams: tuple[str, ...]) -> GradFn:
  """The stacked gradients of ``stream_grad`` over ``streams``, each on its own sub-batch
  (one vmap), with one rng per stream and the BatchNorm proposals averaged (module docstring).
  Scalar aux values are logged as ``<name>/<stream>``; the rest stay in ``Gradients.aux``
  stacked over the streams."""
  vmapped = jax.vmap(stream_grad, in_axes=(None, None, 0, 0))

  def gradients(params, model_state, batch, rng) -> Gradients:
    stacked = stack_batch(batch, streams)
    losses, grads, stats, aux = vmapped(params, model_state, stacked, stream_rngs(rng, streams))
    metrics = {
      f"{k}/{s}": v[i] for k, v in aux.items() if v.ndim == 1 for i, s in enumerate(streams)
    }
    extra = {k: v for k, v in aux.items() if v.ndim > 1}
    return Gradients(grads, losses, mean_stats(stats), metrics, extra)

  return gradients


def make_step(
  gradients: GradFn,
  tx: optax.GradientTransformation,
  streams: tuple[str, ...],
  *,
  diagnostics: Callable[[PyTree], dict[str, jax.Array]] = opt_state_scalars,
  learning_rate: Callable[[jax.Array], jax.Array] | None = None,
  max_loss: float | None = None,
  axes: tuple[str, ...] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure ``train_step(state, batch) -> (state, metrics)`` of a method's ``gradients``
  (stacked over ``axes``, by default the ``streams``) and ``tx`` (stacked -> one update, then
  the base optimizer); ``batch[s]`` for each of ``streams`` holds ``image`` uint8 [B,H,W,3],
  ``label`` [B] and any field the method reads. A method that combines its streams itself
  names its own stacked axis (GM-DF: ``("meta",)``); losses and gradient norms are logged per
  entry of ``axes``. ``diagnostics(opt_state)`` gives the method's scalars read from the
  optimizer state. A step is not applied (``finite = 0``) when the loss, the update or the new
  parameters are not finite, or when a loss exceeds ``max_loss`` (a divergence that stays
  finite)."""
  axes = axes or streams

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    g = gradients(state.params, state.batch_stats, batch, jax.random.fold_in(state.rng, state.step))
    updates, opt_state = tx.update(g.grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    metrics = {f"loss/{s}": g.losses[i] for i, s in enumerate(axes)}
    metrics |= g.metrics
    metrics |= stream_metrics(g.grads, axes)
    metrics |= diagnostics(opt_state)
    metrics["loss/total"] = jnp.sum(g.losses)
    metrics["update_norm"] = tree_norm(updates)
    metrics["param_norm"] = tree_norm(params)
    if learning_rate is not None:
      metrics["learning_rate"] = learning_rate(state.step)
    finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(metrics["update_norm"])
    finite &= jnp.isfinite(metrics["param_norm"])
    if max_loss is not None:
      finite &= jnp.max(g.losses) <= max_loss
    metrics["finite"] = finite.astype(jnp.int32)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(g.model_state, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
    )
    return new_state, metrics

  return train_step


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  streams: tuple[str, ...],
  learning_rate: Callable[[jax.Array], jax.Array] | None = None,
  *,
  diagnostics: Callable[[PyTree], dict[str, jax.Array]] = opt_state_scalars,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``make_step`` with the default gradients, ``per_stream(bce(model), streams)``."""
  return make_step(
    per_stream(bce(model), streams),
    tx,
    streams,
    diagnostics=diagnostics,
    learning_rate=learning_rate,
  )
