"""SAM, sharpness-aware minimisation (Foret et al., ICLR 2021), around any method.

SBI's own recipe is S + SAM (Shiohara & Yamasaki 2022; ``configs/effnet.py:sbi_recipe``), and
SAM is the baseline of RoGA's Table IV and the beta corner of DualFlat. ``config.sam.base``
names the method SAM wraps (default ``S``): its streams, its gradients and its transform. The
base method's stacked stream gradients are taken a second time at theta + eps:

* ``sam.epsilon = "joint"`` (default): eps = rho g / (||g|| + 1e-12) with g the gradient of
  the base method's summed stream loss, sum_k g_k; one perturbation for all streams, so for
  one stream this is plain SAM, for O+S it is SAM on L1 + L2, and for uvs or csdfd the
  perturbed stream gradients go to UVS. Any base method's gradients work (exact CGR too).
* ``sam.epsilon = "per_stream"``: eps_k from stream k's own gradient, each stream's gradient
  taken at its own theta + eps_k: per-domain SAM, RoGA at alpha = 0 (``methods.roga``). Only
  for base methods with the default per-stream BCE gradients.

rho = 0.05 (SAM's, SBI's and DeepfakeBench's default). BatchNorm running statistics come from
the clean pass only; the perturbed pass reuses the clean pass's dropout rng (SBI's code and
DeepfakeBench update the statistics in both passes; keeping them from the parameters the
update is applied to is the cleaner choice, as ``optax.contrib.sam``'s opaque mode notes).
``loss/<stream>`` stays the clean loss, comparable with the other methods; the perturbed one is
logged as ``loss/perturbed/<stream>``. Under ``jit`` with sharded batches the norm is global:
global-batch SAM, not per-device m-sharpness. A step costs two of the base method's.
"""

from __future__ import annotations

import jax

from csdfd_jax import methods
from csdfd_jax.methods import Method
from csdfd_jax.methods.roga import domain_gradients, sam_perturbation
from csdfd_jax.methods.step import GradFn, Gradients, bce_loss, tree_axpy, tree_norm
from csdfd_jax.transforms import stream_sum

EPSILON = ("joint", "per_stream")


def joint_sam(base: GradFn, streams: tuple[str, ...], rho: float) -> GradFn:
  """``base``'s stacked gradients at theta + rho g/||g||, g = the summed stream gradient."""

  def gradients(params, model_state, batch, rng) -> Gradients:
    clean = base(params, model_state, batch, rng)
    eps = sam_perturbation(jax.tree.map(stream_sum, clean.grads), rho)
    perturbed = tree_axpy(1.0, eps, params)
    adv = base(perturbed, model_state, batch, rng)
    metrics = dict(clean.metrics)
    metrics |= {f"loss/perturbed/{s}": adv.losses[i] for i, s in enumerate(streams)}
    metrics["sam/eps_norm"] = tree_norm(eps)
    return Gradients(adv.grads, clean.losses, clean.model_state, metrics, clean.aux)

  return gradients


def build(name: str, config) -> Method:
  """SAM around ``config.sam.base`` (any method but sam)."""
  s = config.sam
  rho, epsilon, base_name = float(s.rho), s.epsilon, s.base
  if rho < 0:
    raise ValueError(f"config.sam.rho={rho} must be >= 0")
  if epsilon not in EPSILON:
    raise ValueError(f"config.sam.epsilon={epsilon!r}; valid: {', '.join(EPSILON)}")
  if base_name == name or methods.METHODS.get(base_name) == "sam":
    raise ValueError(f"config.sam.base={base_name!r}: SAM wraps another method, not itself")
  base = methods.get(base_name, config)
  if epsilon == "per_stream":
    if base.gradients is not None:
      raise ValueError(
        f"config.sam.epsilon='per_stream' needs a base method with the default per-stream BCE "
        f"gradients; {base_name!r} computes its own. Use sam.epsilon='joint'"
      )

    def make(model):
      return domain_gradients(bce_loss(model), base.streams, prefix="sam", rho=rho, alpha=0.0)
  else:

    def make(model):
      return joint_sam(base.gradient_fn(model), base.streams, rho)

  return base._replace(name=name, gradients=make)
