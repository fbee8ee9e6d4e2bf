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

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csdfd_jax.models import clip
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
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
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
      d = domain.astype(x32.dtype)
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
  up = jnp.promote_types(experts.dtype, jnp.float32)
  weights = jax.nn.softmax(scores.astype(up), axis=-1).astype(experts.dtype)
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


# ----------------------------------------------------------------------------- prompts (Eq. 9-11)

TEMPLATE = "a X Y face showing forgery clues"  # X: the domain slot, Y: the class slot (Eq. 9)


def template_ids(tokenizer, context_length: int = 77) -> tuple[np.ndarray, tuple[int, int]]:
  """The template's token ids [context_length] (SOT a X Y face showing for gery clues EOT, then
  zeros) and the positions of the two slots whose embeddings the learned e_dom and e_cls
  replace. ``tokenizer``: ``csdfd_jax.models.clip_tokenizer.Tokenizer``."""
  ids = tokenizer([TEMPLATE], context_length=context_length)[0]
  pieces = tokenizer.encode(TEMPLATE)
  (x,), (y,) = tokenizer.encode("x"), tokenizer.encode("y")
  slot_x, slot_y = 1 + pieces.index(x), 1 + pieces.index(y)  # + 1: the start token
  return np.asarray(ids, np.int32), (slot_x, slot_y)


def prompt_slots(domain_embeds: jnp.ndarray, class_embeds: jnp.ndarray):
  """The learned words of every (domain, class) prompt, rows in (j, k) order (j = 0 the
  wildcard, k = 0 real, 1 fake): (slot X vectors [2 (D + 1), width], slot Y vectors [same]),
  for ``TextTransformer(..., slots={x: ..., y: ...})`` over the template ids."""
  x = jnp.repeat(domain_embeds, 2, axis=0)
  y = jnp.tile(class_embeds, (domain_embeds.shape[0], 1))
  return x, y


def temperatures(domain_embeds: jnp.ndarray, tau_base: float = 0.07, phi: float = 0.01):
  """Eq. 10: tau_d = tau_base + phi ||e_dom^d||, per domain row (0: the wildcard). The paper
  gives neither value; 0.07 is CLIP's initial temperature and phi = 0.01 our choice."""
  e = domain_embeds.astype(jnp.promote_types(domain_embeds.dtype, jnp.float32))
  return tau_base + phi * jnp.linalg.norm(e, axis=-1)


SIS = ("paper", "paper+wildcard")


def sis_loss(
  image_embeds: jnp.ndarray,
  text_embeds: jnp.ndarray,
  domain_ids: jnp.ndarray,
  labels: jnp.ndarray,
  taus: jnp.ndarray,
  variant: str = "paper+wildcard",
) -> jnp.ndarray:
  """L_sis (Eq. 11), the mean over the batch.

  ``image_embeds`` [B, d], ``text_embeds`` [D + 1, 2, d] (the (domain, class) prompts, row 0 the
  wildcard), ``domain_ids`` [B] in 0..D, ``labels`` [B] (1 = fake), ``taus`` [D + 1]. Each
  sample's logits are the cosines to all 2(D + 1) prompts over its own domain's tau; "paper" is
  the cross-entropy with target (d_i, c_i) over all of them, as Eq. 11 writes it (the paper's
  epsilon in the denominator is dropped: it changes nothing but the value at 0). That makes the
  same-class wildcard prompt a negative of every domain-specific target, against the paper's
  aim of a domain-invariant wildcard, so "paper+wildcard" (the default) adds the 2-way
  cross-entropy over the wildcard pair with target (0, c_i)."""
  if variant not in SIS:
    raise ValueError(f"sis variant must be one of {SIS}, got {variant!r}")
  n_dom = text_embeds.shape[0]
  v = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
  u = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
  tau = taus[domain_ids][:, None]
  logits = jnp.einsum("bd,jkd->bjk", v, u).reshape(v.shape[0], 2 * n_dom) / tau
  target = domain_ids * 2 + labels
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
  if variant == "paper+wildcard":
    wild = jax.nn.log_softmax(logits[:, :2], axis=-1)
    loss = loss - jnp.take_along_axis(wild, labels[:, None], axis=-1)[:, 0]
  return jnp.mean(loss)


# ----------------------------------------------------------------------------- Eq. 7-8


def second_order_effects(
  params: dict, records: tuple[dict, ...], layers: tuple[int, ...], heads: int
) -> dict[int, jnp.ndarray]:
  """Eq. 7, after Gandelsman et al. (ICLR 2024, "second-order effects of neurons"): for each
  (zero-indexed) block l in ``layers``, the part of the class token that block l's MLP output
  reaches through the attention of every later block l' > l, with the attention pattern and
  ln_1's per-token std frozen at the forward pass (so the path is linear in the MLP output):

      Delta_l = sum_{l' > l} sum_h W_O^h sum_i a^{l'}_{h, cls, i} (c_i W_V^h),
      c_i = gamma_{l'} (m_i - mean(m_i)) / sigma_{l', i},

  m_i the MLP output of block l at token i, gamma_{l'} ln_1's scale, sigma_{l', i} ln_1's std
  of the residual at l'; no biases (they do not depend on m). ``params``: the image tower's
  parameters; ``records``: its per-block records from the same forward pass
  (``VisionTransformer(..., record=True)``). GM-DF's layers 8-10 (1-indexed) are blocks 7, 8, 9.
  Returns {l: [B, width]}."""
  p_blocks = params["transformer"]
  num_blocks = len(records)
  out = {}
  for block in layers:
    if not 0 <= block < num_blocks - 1:
      raise ValueError(f"second-order layer {block}: needs a later block among 0..{num_blocks - 1}")
    m = records[block]["mlp_out"]
    m = m.astype(jnp.promote_types(m.dtype, jnp.float32))  # [B, T, d]
    centred = m - jnp.mean(m, axis=-1, keepdims=True)
    total = 0.0
    for later in range(block + 1, num_blocks):
      p = p_blocks[f"resblocks_{later}"]
      d = m.shape[-1]
      gamma = p["ln_1"]["scale"]
      sigma = records[later]["ln1_std"]  # [B, T]
      attn = records[later]["cls_attn"]  # [B, H, T]
      w_v = p["attn"]["in_proj"]["kernel"][:, 2 * d :].reshape(d, heads, d // heads)
      w_o = p["attn"]["out_proj"]["kernel"].reshape(heads, d // heads, d)
      c = gamma * centred / sigma[..., None]
      pooled = jnp.einsum("bht,btd->bhd", attn, c)  # the CLS-weighted token sum first
      total = total + jnp.einsum("bhd,dhe,hef->bf", pooled, w_v, w_o)
    out[block] = total
  return out


# ----------------------------------------------------------------------------- the detector


class GMDF(nn.Module):
  """GM-DF's detector on CLIP (Sec. 3): the image tower with an expert branch in every block,
  conditioned on a learned code per training domain (Eq. 1-5), the second-order aggregation of
  blocks ``so_layers`` (Eq. 7-8: v = Proj(z_cls + sum_l alpha_l Norm(Delta_l)), alpha_l = 0 at
  initialisation), and the text tower over the domain-class prompts (Eq. 9).

  Inputs are uint8 NHWC images (normalised with CLIP's mean/std inside). ``domain_ids`` [B] in
  0..D (0 = the wildcard; None: the wildcard for every sample, what eval and predict use).
  Returns one fake logit per image, the prompt head of notes 3.5 item 6:
  (s(v, u_{d,fake}) - s(v, u_{d,real})) / tau_d with the sample's domain d. ``aux=True`` also
  returns a dict with the image embedding ``v``, the prompt embeddings ``u`` [D + 1, 2, e] and
  the temperatures ``tau`` [D + 1], for L_sis. At initialisation the branch adds exactly 0 and
  alpha_l = 0, so ``v`` is the converted CLIP's image embedding."""

  variant: str
  num_domains: int
  num_experts: int = 0  # 0: one per training domain
  expert_dim: int = 16
  domain_dim: int = 16
  so_layers: tuple[int, ...] = (7, 8, 9)  # zero-indexed: the paper's 1-indexed layers 8-10
  tau_base: float = 0.07
  phi: float = 0.01
  context_length: int = 77
  mim: bool = True  # the training-only MIM parameters (mask token, pixel head; ``mim_loss``)
  dtype: Any = jnp.float32

  def setup(self):
    cfg = clip._config(self.variant)
    if self.num_domains < 1:
      raise ValueError(f"GMDF needs at least one training domain, got {self.num_domains}")
    experts = self.num_experts or self.num_domains
    branch = functools.partial(
      ExpertBranch, num_experts=experts, bottleneck=self.expert_dim, domain_dims=self.domain_dim
    )
    self.visual = clip.VisionTransformer(
      **cfg["vision"], embed_dim=cfg["embed_dim"], project=False, branch=branch, dtype=self.dtype
    )
    self.text = clip.TextTransformer(**cfg["text"], embed_dim=cfg["embed_dim"], dtype=self.dtype)
    width = cfg["text"]["width"]
    init = nn.initializers.normal(0.02)
    self.domain_codes = self.param("domain_codes", init, (self.num_domains, self.domain_dim))
    self.domain_embeds = self.param("domain_embeds", init, (self.num_domains + 1, width))
    self.class_embeds = self.param("class_embeds", init, (2, width))
    self.so_norms = [
      clip.layer_norm(dtype=self.dtype, name=f"so_norm_{l}")
      for l in self.so_layers  # noqa: E741
    ]
    self.so_alpha = self.param("so_alpha", nn.initializers.zeros, (len(self.so_layers),))
    self.heads = cfg["vision"]["heads"]
    vision, pixels = cfg["vision"], 3 * cfg["vision"]["patch_size"] ** 2
    if self.mim:
      self.mim_token = self.param("mim_token", init, (vision["width"],))
      self.mim_kernel = self.param("mim_kernel", init, (vision["width"], pixels))
      self.mim_bias = self.param("mim_bias", nn.initializers.zeros, (pixels,))
    from csdfd_jax.models import clip_tokenizer  # the vocabulary file is needed from here on

    ids, self.slots = template_ids(clip_tokenizer.Tokenizer(), self.context_length)
    self.template = ids

  @property
  def patch_size(self) -> int:
    return clip._config(self.variant)["vision"]["patch_size"]

  def prompts(self) -> jnp.ndarray:
    """The (domain, class) prompt embeddings [D + 1, 2, e], row 0 the wildcard."""
    n = self.num_domains + 1
    ids = jnp.asarray(self.template)
    x, y = prompt_slots(self.domain_embeds, self.class_embeds)
    u = self.text(
      jnp.broadcast_to(ids, (2 * n, ids.shape[0])), slots={self.slots[0]: x, self.slots[1]: y}
    )
    return u.reshape(n, 2, -1)

  def _inputs(self, images, domain_ids):
    """CLIP-normalised images and the per-sample domain codes (None: the wildcard)."""
    mean = jnp.asarray(clip.CLIP_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(clip.CLIP_STD, jnp.float32) * 255.0
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    ids = None if domain_ids is None else jnp.asarray(domain_ids, jnp.int32)
    codes = None
    if ids is not None:
      table = jnp.concatenate([jnp.zeros((1, self.domain_dim)), self.domain_codes], axis=0)
      codes = table[ids]  # row 0: the wildcard's zero code
    return x, ids, codes

  def mim_loss(self, images, mask, domain_ids=None):
    """L_mim, our substitute for Eq. 6 (notes 3.5 item 11; the paper's dVAE tokenizer is not
    available): the patches where ``mask`` [B, N] is True enter the image tower as the learned
    mask token, a linear head on the last block's patch tokens predicts their pixels, and the
    loss is the mean squared error to the per-patch normalised pixels (MAE's norm_pix) of the
    masked patches only. The masked pass uses each sample's domain code."""
    if not self.mim:
      raise ValueError("GMDF(mim=False) has no MIM parameters")
    x, _, codes = self._inputs(images, domain_ids)
    last = self.visual.layers - 1
    _, (tokens,) = self.visual(
      x, domain=codes, return_layers=(last,), mask=mask, mask_token=self.mim_token
    )
    up = jnp.promote_types(tokens.dtype, jnp.float32)
    pred = tokens[:, 1:].astype(up) @ self.mim_kernel + self.mim_bias
    target = patchify(x.astype(up), self.patch_size)
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True)
    target = (target - mean) * jax.lax.rsqrt(var + 1e-6)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    weight = mask.astype(up)
    return jnp.sum(per_patch * weight) / jnp.maximum(jnp.sum(weight), 1.0)

  def __call__(self, images, *, train: bool = False, domain_ids=None, aux: bool = False):
    del train  # no dropout
    x, ids, codes = self._inputs(images, domain_ids)
    if self.mim and self.is_initializing():  # the training-only parameters exist from init
      _ = self.mim_token, self.mim_kernel, self.mim_bias
    z, _, records = self.visual(x, domain=codes, record=True)
    if self.so_layers:
      params = self.visual.variables["params"]
      deltas = second_order_effects(params, records, self.so_layers, self.heads)
      for i, layer in enumerate(self.so_layers):
        z = z + self.so_alpha[i] * self.so_norms[i](deltas[layer])
    v = z @ self.visual.variables["params"]["proj"].astype(self.dtype)
    u = self.prompts()
    tau = temperatures(self.domain_embeds, self.tau_base, self.phi)
    d = jnp.zeros((images.shape[0],), jnp.int32) if ids is None else ids
    vn = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    un = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    sims = jnp.einsum("be,bke->bk", vn, un[d])  # [B, 2]: real, fake prompts of the domain
    logit = (sims[:, 1] - sims[:, 0]) / tau[d]
    if aux:
      rms = jnp.mean(jnp.stack([r["branch_rms"] for r in records]))
      return logit, {"v": v, "u": u, "tau": tau, "branch_rms": rms}
    return logit


TRAINING_ONLY = ("mim_token", "mim_kernel", "mim_bias")  # GMDF parameters inference never reads


def patchify(x: jnp.ndarray, patch: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, (H/p)(W/p), p * p * C], patches in the row-major order of the image
  tower's tokens."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_mask(rng: jax.Array, batch: int, tokens: int, ratio: float) -> jnp.ndarray:
  """[batch, tokens] bool with exactly ``round(ratio * tokens)`` (at least 1) True per row at
  uniformly random positions (random masking; GM-DF's Fig. 4 finds 20% best)."""
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
  k = max(1, round(ratio * tokens))
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, tokens)), axis=-1), axis=-1)
  return ranks < k


E, O, FROZEN = "E", "O", "frozen"  # noqa: E741 - the paper's theta_E / theta_O
GROUPS = (E, O, FROZEN)


def param_labels(params: dict, *, freeze_text: bool = True) -> dict:
  """The parameter groups of the Meta-Domain-Embedding Optimizer (notes 3.5 items 4, 9, 13), a
  tree like ``params`` of labels: "E" (theta_E: the experts, DNorm's W_gamma and W_beta, the
  domain codes and the prompts' domain embeddings), "frozen" (the text tower, with
  ``freeze_text``) and "O" (theta_O: everything else, DNorm's base affine gamma0/beta0
  included, the class embeddings, the second-order norms and weights, the MIM head)."""

  def label(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[0] == "text":
      return FROZEN if freeze_text else O
    if keys[0] in ("domain_codes", "domain_embeds"):
      return E
    if "branch" in keys and keys[-1] not in ("gamma0", "beta0"):
      return E
    return O

  return jax.tree_util.tree_map_with_path(label, params)


def class_token_ids(tokenizer) -> tuple[int, int]:
  """The token ids of "real" and "fake", whose embeddings start e_cls (notes 3.5 item 9)."""
  (real,), (fake,) = tokenizer.encode("real"), tokenizer.encode("fake")
  return real, fake


def init_from_clip(params: dict, clip_params: dict, tokenizer) -> dict:
  """GMDF ``params`` with both CLIP towers taken from ``clip_params`` (``convert_*(...,
  num_classes=None)``: {"visual", "text"[, "logit_scale"]}, strictly: every CLIP leaf the GMDF
  towers have, nothing more, same shapes; the expert branches keep their zero init) and the
  class embeddings set to the text tower's embeddings of "real" and "fake"."""
  from flax import traverse_util

  from csdfd_jax.models import weights

  for tower in ("visual", "text"):
    if tower not in clip_params:
      raise weights.WeightMappingError(
        f"the CLIP weights hold no {tower!r} tower: convert both towers (omit --num-classes)"
      )
  flat = traverse_util.flatten_dict(params)
  expected = {k: v for k, v in flat.items() if k[0] in ("visual", "text") and "branch" not in k}
  loaded = traverse_util.flatten_dict({t: clip_params[t] for t in ("visual", "text")})
  weights.check_tree_matches(
    traverse_util.unflatten_dict(expected), traverse_util.unflatten_dict(loaded), "CLIP weights"
  )
  flat |= {k: jnp.asarray(v, flat[k].dtype) for k, v in loaded.items()}
  return init_class_embeds(traverse_util.unflatten_dict(flat), tokenizer)


def init_class_embeds(params: dict, tokenizer) -> dict:
  """``params`` with e_cls = the text tower's token embeddings of "real" and "fake"."""
  table = params["text"]["token_embedding"]["embedding"]
  ids = jnp.asarray(class_token_ids(tokenizer))
  return dict(params, class_embeds=table[ids].astype(params["class_embeds"].dtype))
