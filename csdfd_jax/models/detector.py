"""Building, initialising and scoring the detector of a config, in one place for train, eval and
predict: ``build(config)``, ``init_variables(model, config, seed)``, ``predict_fn(model)``.

Every detector returns one fake logit per image in eval mode, so evaluation, ``predict`` and
Grad-CAM need no per-method code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from csdfd_jax import models
from csdfd_jax.models.heads import Detector

PyTree = Any


def build(config: ml_collections.ConfigDict) -> Detector:
  """The detector of ``config.model``, normalising with its weight source's mean/std:
  a backbone with the projection/classifier head (``Detector``), or, with
  ``config.model.detector = "gmdf"``, GM-DF's CLIP detector built from ``config.gmdf``."""
  if config.model.get("detector", "linear") == "gmdf":
    return build_gmdf(config)
  family = models.family(config.model.name)
  dtype = jnp.dtype(config.model.dtype)
  backbone = family.create(config.model.variant, num_classes=0, dtype=dtype)
  prep = family.preprocessing(config.model.variant)
  if config.model.init:
    from csdfd_jax.models import weights

    _, meta = weights.load_variables(config.model.init)
    if meta.get("family", config.model.name) != config.model.name:
      raise ValueError(
        f"{config.model.init} holds {meta['family']} weights but config.model.name is "
        f"{config.model.name!r}"
      )
    prep = meta.get("preprocessing") or prep
  return Detector(
    backbone=backbone,
    mean=tuple(prep["mean"]),
    std=tuple(prep["std"]),
    projection_dims=tuple(config.model.projection_dims),
    dropout=config.model.dropout,
    dtype=dtype,
  )


def build_gmdf(config: ml_collections.ConfigDict):
  """``models.gmdf.GMDF`` of ``config.model.variant`` with ``config.gmdf``'s model settings
  (``so_layers`` 1-indexed there, as the paper counts)."""
  from csdfd_jax.models import gmdf

  if config.model.name != "clip":
    raise ValueError(f"the GM-DF detector is built on CLIP, not {config.model.name!r}")
  g = config.gmdf
  domains = [n for n in g.domains.split(",") if n.strip()]
  so_layers = tuple(int(layer) - 1 for layer in g.so_layers)
  if any(layer < 0 for layer in so_layers):
    raise ValueError(f"config.gmdf.so_layers={tuple(g.so_layers)} are 1-indexed (>= 1)")
  return gmdf.GMDF(
    variant=config.model.variant,
    num_domains=len(domains),
    num_experts=int(g.num_experts),
    expert_dim=int(g.expert_dim),
    domain_dim=int(g.domain_dim),
    so_layers=so_layers,
    tau_base=float(g.tau_base),
    phi=float(g.phi),
    mim=float(g.lambda_mim) > 0,
    dtype=jnp.dtype(config.model.dtype),
  )


def _init_gmdf(variables: dict, config: ml_collections.ConfigDict) -> dict:
  """GM-DF's initial parameters: both CLIP towers from ``config.model.init`` (a conversion
  with both towers) when set, and e_cls from the text tower's "real"/"fake" embeddings."""
  from csdfd_jax.models import clip_tokenizer, gmdf

  params = variables["params"]
  if config.model.init:
    from csdfd_jax.models import weights

    loaded, _ = weights.load_variables(config.model.init)
    params = gmdf.init_from_clip(params, loaded["params"], clip_tokenizer.Tokenizer())
    logging.info("both CLIP towers initialised from %s", config.model.init)
  else:
    logging.warning("config.model.init is empty: GM-DF's CLIP starts from random weights")
    params = gmdf.init_class_embeds(params, clip_tokenizer.Tokenizer())
  return {"params": params}


def init_variables(model: Detector, config: ml_collections.ConfigDict, seed: int) -> dict:
  """Random initial variables, with the backbone replaced by ``config.model.init``'s.

  Initialisation is jitted and draws from the "rbg" PRNG: on CPU, compiling Flax's init
  with the default threefry generator costs several times longer than the init itself
  (measured 2-3x slower for EfficientNet-tiny), for no benefit to a one-off draw."""
  size = config.data.image_size
  init = jax.jit(model.init, static_argnames="train")
  key = jax.random.key(seed, impl="rbg")
  variables = init(key, jnp.zeros((1, size, size, 3), jnp.uint8), train=False)
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  if config.model.get("detector", "linear") == "gmdf":
    return _init_gmdf(variables, config)
  if config.model.init:
    from csdfd_jax.models import weights

    loaded, _ = weights.load_variables(config.model.init)
    for collection, tree in loaded.items():
      if collection not in variables:
        raise ValueError(f"{config.model.init}: collection {collection!r} not in the model")
      weights.check_tree_matches(
        variables[collection]["backbone"], tree, f"{config.model.init} [{collection}]"
      )
      variables[collection] = dict(variables[collection]) | {"backbone": tree}
    logging.info("backbone initialised from %s", config.model.init)
  else:
    logging.warning("config.model.init is empty: the backbone starts from random weights")
  return variables


def predict_fn(model: Detector) -> Callable[[PyTree, jax.Array], jax.Array]:
  """``predict(variables, images) -> fake probability [B]`` in eval mode."""

  def predict(variables, images):
    return jax.nn.sigmoid(model.apply(variables, images, train=False))

  return predict
