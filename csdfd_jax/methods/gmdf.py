"""GM-DF's Meta-Domain-Embedding Optimizer (Lai et al., ACM MM 2025, Eq. 12-15): the meta split
and the inner/outer gradients. The method's model side is ``csdfd_jax.models.gmdf``; the method
itself (prompts, L_sis, MIM, the step and its config) is not registered yet.

Per step one domain is the meta-test domain and the others are meta-train (``meta_split``; the
paper's Eq. 13 text calls the meta-train set "meta-test", a typo). With theta_E the expert and
domain parameters, theta_O the rest (the base), L_S the classification loss on the meta-train
domains (Eq. 12) and L_T the total loss on the meta-test domain (Eq. 14):

    inner (Eq. 13):  theta'_E = theta_E - beta grad_E L_S(theta_E, theta_O)        (committed)
    outer (Eq. 15):  g_O = d/d theta_O of L_T(theta'_E, theta_O)

Eq. 15 writes a partial derivative with theta_E as a separate argument, so the literal reading is
first order: theta'_E is a constant of the outer gradient (``order=1``, the default). Exact MAML
(``order=2``) adds the path through the inner step:

    g_O = grad_O L_T(theta'_E, theta_O) - beta D_E[grad_O L_S](theta_E, theta_O)[v],
    v = grad_E L_T(theta'_E, theta_O),

where the mixed term is one forward-over-reverse product (a ``jax.jvp`` of ``grad_O L_S`` along
v; by the symmetry of mixed partials it is the transpose of the mixed Hessian block applied to
v). The outer loop does not update theta_E (the paper: "theta_E is updated during meta-train,
theta_O during meta-test"). ``../shared/notes/peers.md`` 3.5 items 13-15 and 3.6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from csdfd_jax.methods.step import tree_axpy, tree_norm

Params = Any
LossFn = Callable[[Params, Params], jax.Array]  # (theta_E, theta_O) -> scalar


class MetaGradients(NamedTuple):
  """new_e: theta'_E after the inner step; grad_o: the outer gradient g_O; loss_train: L_S at
  (theta_E, theta_O); loss_test: L_T at (theta'_E, theta_O); step_norm: ||theta'_E - theta_E||."""

  new_e: Params
  grad_o: Params
  loss_train: jax.Array
  loss_test: jax.Array
  step_norm: jax.Array


def meta_split(rng: jax.Array, num_domains: int) -> tuple[jax.Array, jax.Array]:
  """(meta-test index [], meta-train indices [num_domains - 1]): a random permutation of the
  domain axis, its first entry the meta-test domain. Static shapes, so the step compiles once."""
  if num_domains < 2:
    raise ValueError(
      f"GM-DF's meta split needs at least 2 domains, got {num_domains}: with one source dataset, "
      "declare its manipulation types as the domains"
    )
  order = jax.random.permutation(rng, num_domains)
  return order[0], order[1:]


def meta_gradients(
  loss_train: LossFn,
  loss_test: LossFn,
  params_e: Params,
  params_o: Params,
  inner_lr: float,
  order: int = 1,
) -> MetaGradients:
  """The inner SGD step on theta_E (Eq. 13) and the outer gradient on theta_O (Eq. 15), first
  order (the paper's partial derivative) or second order (exact MAML)."""
  if order not in (1, 2):
    raise ValueError(f"order must be 1 (first-order, Eq. 15 literally) or 2 (exact), got {order}")
  loss_s, grad_e = jax.value_and_grad(loss_train, argnums=0)(params_e, params_o)
  new_e = tree_axpy(-inner_lr, grad_e, params_e)
  loss_t, (v, grad_o) = jax.value_and_grad(loss_test, argnums=(0, 1))(new_e, params_o)
  if order == 2:

    def grad_o_train(e):
      return jax.grad(loss_train, argnums=1)(e, params_o)

    _, mixed = jax.jvp(grad_o_train, (params_e,), (v,))
    grad_o = tree_axpy(-inner_lr, mixed, grad_o)
  step = jax.tree.map(lambda a, b: a - b, new_e, params_e)
  return MetaGradients(new_e, grad_o, loss_s, loss_t, tree_norm(step))


def domain_dropout(rng: jax.Array, domain_ids: jax.Array, prob: float) -> jax.Array:
  """Replaces each sample's domain id (1..D) by the wildcard 0 with probability ``prob``, which
  trains the wildcard path that unseen test domains use (the paper never says how it is
  trained; notes 3.5 item 5)."""
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"wildcard probability must be in [0, 1], got {prob}")
  drop = jax.random.bernoulli(rng, prob, domain_ids.shape)
  return jnp.where(drop, 0, domain_ids)
