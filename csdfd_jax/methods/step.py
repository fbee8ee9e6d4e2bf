"""The one pure train step every method shares: ``train_step(state, batch) -> (state, metrics)``.

Per-stream gradients at the price of one step (DESIGN): each stream k has its own
sub-batch (its own reals), and ``jax.vmap`` of ``value_and_grad`` over the stream axis
returns the stacked gradients [K, ...] that ``uvs``/``cgr`` expect, at the cost of K
half-size backward passes. Inside the vmap every stream normalises with its own
BatchNorm batch statistics, exactly as if it were a separate forward pass.

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
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from csdfd_jax.transforms import gram_matrix, stream_sum

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


def _norm(tree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


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


def opt_state_metrics(opt_state: PyTree) -> dict[str, jax.Array]:
  """The UVS weights and CGR correction ratio kept in the transforms' states, if present."""
  out = {}
  for field in ("weights", "correction_ratio"):
    try:
      value = optax.tree_utils.tree_get(opt_state, field)
    except KeyError:
      continue
    if value is None:
      continue
    if field == "weights":
      out.update({f"uvs_weight/{i}": value[i] for i in range(value.shape[0])})
    else:
      out["cgr_correction_ratio"] = value
  return out


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  streams: tuple[str, ...],
  learning_rate: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure step for ``model`` trained by ``tx`` (stacked -> one update, then the base
  optimizer) on ``streams``; ``batch[s]`` holds ``image`` uint8 [B,H,W,3], ``label`` [B]."""

  def loss_fn(params, batch_stats, images, labels, rng):
    logits, mutated = model.apply(
      {"params": params, "batch_stats": batch_stats},
      images,
      train=True,
      rngs={"dropout": rng},
      mutable=["batch_stats"],
    )
    labels = labels.astype(jnp.float32)
    loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    accuracy = jnp.mean((logits > 0) == (labels > 0.5))
    return loss, (mutated.get("batch_stats", {}), accuracy)

  grad_fn = jax.vmap(jax.value_and_grad(loss_fn, has_aux=True), in_axes=(None, None, 0, 0, 0))

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    images = jnp.stack([batch[s]["image"] for s in streams])
    labels = jnp.stack([batch[s]["label"] for s in streams])
    rngs = jax.random.split(jax.random.fold_in(state.rng, state.step), len(streams))
    (losses, (stats, accuracy)), grads = grad_fn(
      state.params, state.batch_stats, images, labels, rngs
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = jax.tree.map(lambda s: stream_sum(s) / s.shape[0], stats)

    metrics = {f"loss/{s}": losses[i] for i, s in enumerate(streams)}
    metrics |= {f"accuracy/{s}": accuracy[i] for i, s in enumerate(streams)}
    metrics |= stream_metrics(grads, streams)
    metrics |= opt_state_metrics(opt_state)
    metrics["loss/total"] = jnp.sum(losses)
    metrics["update_norm"] = _norm(updates)
    metrics["param_norm"] = _norm(params)
    if learning_rate is not None:
      metrics["learning_rate"] = learning_rate(state.step)
    finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(metrics["update_norm"])
    metrics["finite"] = finite.astype(jnp.int32)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
    )
    return new_state, metrics

  return train_step


def make_predict_fn(model: nn.Module) -> Callable[[PyTree, jax.Array], jax.Array]:
  """``predict(variables, images) -> fake probability [B]`` in eval mode."""

  def predict(variables, images):
    return jax.nn.sigmoid(model.apply(variables, images, train=False))

  return predict
