"""GM-DF's domain-conditioned parts for CLIP's image tower (Lai et al., ACM MM 2025, Sec. 3.2).

This module holds the pieces that GM-DF adds inside every visual block; the method (prompts,
losses, the meta-learning step) builds on them. Choices follow ``../shared/notes/peers.md`` 3.5,
where the paper is wrong or silent:

* ``DNorm`` (Eq. 2): LayerNorm statistics with a domain-conditioned affine,
  ``x_hat * (gamma0 + W_gamma c_d) + (beta0 + W_beta c_d)``, c_d in R^k per sample. Every
  parameter starts at 0 (notes item 4), so the expert branch it ends adds exactly nothing at
  initialisation and training starts at the converted CLIP; gamma0 still gets a gradient at once.
  The wildcard domain is c_d = 0: the base affine (gamma0, beta0) alone.
* ``aggregate_experts`` (Eq. 4-5): the paper's Q = K = Concat(...) in R^{1 x N} cannot be
  multiplied as written. Per token, with the N expert outputs as rows of E in R^{N x d}:
  A = softmax(E E' / sqrt(d)), and the aggregate is the mean over the rows of A E (notes item 3).
  Parameter-free, as written.
* ``ExpertBranch``: N bottleneck experts d -> r -> d with QuickGELU (r = 16), aggregated, then
  DNorm. CLIP is pre-norm, so Eq. 3's post-norm block is not applied literally (it would break
  the pretrained tower); the branch sits beside the MLP on the same input:
  ``x + mlp(ln_2(x)) + branch(ln_2(x), c_d)`` (notes item 1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from csdfd_jax.models.clip import quick_gelu

EPS = 1e-5  # CLIP's LayerNorm epsilon


class DNorm(nn.Module):
  """Eq. 2: ``(x - mu) / sigma * (gamma0 + W_gamma c) + (beta0 + W_beta c)`` over the last axis.

  ``x`` [B, ..., C]; ``domain`` [B, k] (one code per sample, broadcast over the middle axes),
  or None for the wildcard (c = 0). All parameters are zero-initialised (``init_scale`` > 0
  draws W and gamma0 from N(0, init_scale), for tests)."""

  features: int
  domain_dims: int = 16
  init_scale: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, domain: jnp.ndarray | None = None) -> jnp.ndarray:
    c = self.features
    if x.shape[-1] != c:
      raise ValueError(f"DNorm({c}) got features of width {x.shape[-1]}")
    init = nn.initializers.normal(self.init_scale) if self.init_scale else nn.initializers.zeros
    gamma0 = self.param("gamma0", init, (c,), jnp.float32)
    beta0 = self.param("beta0", init, (c,), jnp.float32)
    w_gamma = self.param("w_gamma", init, (self.domain_dims, c), jnp.float32)
    w_beta = self.param("w_beta", init, (self.domain_dims, c), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    x_hat = (x32 - mean) * jax.lax.rsqrt(var + EPS)
    scale, shift = gamma0, beta0
    if domain is not None:
      if domain.shape != (x.shape[0], self.domain_dims):
        raise ValueError(
          f"DNorm: domain codes {domain.shape}, expected ({x.shape[0]}, {self.domain_dims})"
        )
      middle = (1,) * (x.ndim - 2)
      d = domain.astype(jnp.float32)
      scale = scale + (d @ w_gamma).reshape(x.shape[0], *middle, c)
      shift = shift + (d @ w_beta).reshape(x.shape[0], *middle, c)
    return (x_hat * scale + shift).astype(self.dtype)


def aggregate_experts(experts: jnp.ndarray) -> jnp.ndarray:
  """Eq. 4-5 with the shape fixed: ``experts`` [..., N, d] (the N expert outputs of a token)
  -> [..., d], the mean over rows of softmax(E E' / sqrt(d)) E."""
  d = experts.shape[-1]
  scores = jnp.einsum("...nd,...md->...nm", experts, experts) / jnp.sqrt(
    jnp.asarray(d, jnp.float32)
  )
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(experts.dtype)
  return jnp.mean(jnp.einsum("...nm,...md->...nd", weights, experts), axis=-2)


class ExpertBranch(nn.Module):
  """N bottleneck experts (d -> ``bottleneck`` -> d, QuickGELU), ``aggregate_experts``, then
  ``DNorm`` on the sample's domain code: [B, T, d] -> [B, T, d], exactly 0 at initialisation."""

  num_experts: int
  bottleneck: int = 16
  domain_dims: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jnp.ndarray, domain: jnp.ndarray | None = None) -> jnp.ndarray:
    d = h.shape[-1]
    outs = []
    for i in range(self.num_experts):
      z = nn.Dense(self.bottleneck, dtype=self.dtype, name=f"expert_{i}_down")(h)
      outs.append(nn.Dense(d, dtype=self.dtype, name=f"expert_{i}_up")(quick_gelu(z)))
    agg = aggregate_experts(jnp.stack(outs, axis=-2))
    return DNorm(d, self.domain_dims, dtype=self.dtype, name="dnorm")(agg, domain)
