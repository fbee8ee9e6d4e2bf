"""Vision Transformer (Dosovitskiy et al. 2021) in Flax Linen, loading timm weights.

CS-DFD (Table II) uses ViT-B/16 and ViT-L/16. The layout is timm's ``vit_*_patch16_*``:
a 16x16 patch embedding conv, a class token, learned position embeddings (one for the class
token plus one per patch), pre-norm blocks (LayerNorm eps 1e-6, fused ``qkv`` projection,
exact-erf GELU MLP), a final LayerNorm, and the class token as the pooled feature ("token"
pooling). Module names mirror timm's keys (``blocks_3.attn.qkv`` for ``blocks.3.attn.qkv``).

Other input sizes: the position embeddings of the patch grid are resampled at call time,
bicubic with antialiasing (PIL-style Keys kernel, a = -0.5) and half-pixel centres, as timm's
``resample_abs_pos_embed`` does with ``F.interpolate(mode='bicubic', antialias=True)``;
``jax.image.resize`` implements the same kernel, so e.g. ViT-B/16@224 weights run at 256 or
384 px exactly like timm with ``dynamic_img_size=True``. The class-token embedding is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csdfd_jax.models.layers import (
  abstract_variables,
  drop_path,
  split_head,
  variables_from_torch,
  variant_config,
  variant_preprocessing,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

VARIANTS: dict[str, dict[str, Any]] = {
  "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, img_size=224),
  "vit_base_patch16_384": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, img_size=384),
  "vit_large_patch16_224": dict(
    patch_size=16, embed_dim=1024, depth=24, num_heads=16, img_size=224
  ),
  "vit_large_patch16_384": dict(
    patch_size=16, embed_dim=1024, depth=24, num_heads=16, img_size=384
  ),
  "tiny": dict(patch_size=16, embed_dim=64, depth=2, num_heads=2, img_size=64),
}
# timm's in21k -> in1k ViT weights (augreg, orig) are trained with inception-style [-1, 1] inputs.
PREPROCESSING = {
  v: dict(mean=INCEPTION_MEAN, std=INCEPTION_STD, input_size=cfg["img_size"])
  for v, cfg in VARIANTS.items()
}
# timm tags whose normalisation differs: self-supervised MAE / DINO (ImageNet), BAMBOO (CLIP).
for _tag in ("vit_base_patch16_224.mae", "vit_base_patch16_224.dino", "vit_large_patch16_224.mae"):
  PREPROCESSING[_tag] = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224)
PREPROCESSING["vit_base_patch16_224.bamboo"] = dict(mean=CLIP_MEAN, std=CLIP_STD, input_size=224)
_LN_EPS = 1e-6


def resample_pos_embed(grid_embed: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Bicubic, antialiased resampling of a [gh, gw, D] position-embedding grid to ``size``
  (timm ``resample_abs_pos_embed`` defaults). Identity when the size already matches."""
  if grid_embed.shape[:2] == tuple(size):
    return grid_embed
  out = jax.image.resize(
    grid_embed.astype(jnp.float32), (*size, grid_embed.shape[-1]), "bicubic", antialias=True
  )
  return out.astype(grid_embed.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping ``patch_size`` conv: [B, H, W, 3] -> [B, H/p, W/p, D]."""

  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    p = self.patch_size
    h, w = x.shape[1:3]
    if h % p or w % p or h < p or w < p:
      near = sorted({max(p, h // p * p), h // p * p + p})
      raise ValueError(
        f"ViT input {h}x{w} px is not a multiple of its {p} px patch: the border would be "
        f"dropped (below {p} px the model would see nothing). Use a multiple of {p}, e.g. "
        f"{' or '.join(map(str, near))} (--config.data.image_size)"
      )
    return nn.Conv(self.embed_dim, (p, p), (p, p), "VALID", dtype=self.dtype, name="proj")(x)


class Attention(nn.Module):
  """Multi-head self-attention with one fused ``qkv`` Dense (timm layout: 3, heads, dim)."""

  num_heads: int
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, head_dim), 2, 0)
    if train and self.attn_drop > 0:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      weights = nn.Dropout(self.attn_drop, deterministic=False)(weights)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v)
    out = nn.Dense(d, dtype=self.dtype, name="proj")(out.reshape(b, n, d))
    return nn.Dropout(self.proj_drop, deterministic=not train)(out)


class Mlp(nn.Module):
  """fc1 -> GELU (exact erf, as torch ``nn.GELU``) -> dropout -> fc2 -> dropout."""

  hidden: int
  drop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = x.shape[-1]
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x), approximate=False)
    x = nn.Dropout(self.drop, deterministic=not train)(x)
    x = nn.Dense(d, dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.drop, deterministic=not train)(x)


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  """LayerNorm with torch's two-pass variance and eps 1e-6 (timm ViT/ConvNeXt)."""
  return nn.LayerNorm(_LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


class Block(nn.Module):
  """Pre-norm block: x + DropPath(Attn(LN(x))), then x + DropPath(Mlp(LN(x)))."""

  num_heads: int
  mlp_ratio: float = 4.0
  proj_drop: float = 0.0
  attn_drop: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = layer_norm("norm1", self.dtype)(x)
    y = Attention(self.num_heads, self.attn_drop, self.proj_drop, self.dtype, name="attn")(y, train)
    x = x + drop_path(self, y, self.drop_path_rate, train)
    y = layer_norm("norm2", self.dtype)(x)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    y = Mlp(hidden, self.proj_drop, self.dtype, name="mlp")(y, train)
    return x + drop_path(self, y, self.drop_path_rate, train)


class VisionTransformer(nn.Module):
  """ViT with class token and "token" pooling.

  Sows ``block<i>`` (each block's output tokens) and ``features`` (all tokens after the final
  norm, [B, 1 + h*w, D]) into "intermediates". Returns logits when ``num_classes > 0``, else
  the pooled feature (class token after the final norm, [B, D]). ``drop_path_rate`` rises
  linearly over the blocks from 0, as in timm.
  """

  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  img_size: int
  mlp_ratio: float = 4.0
  num_classes: int = 0
  drop_rate: float = 0.0
  pos_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    d, grid = self.embed_dim, self.img_size // self.patch_size
    x = PatchEmbed(d, self.patch_size, self.dtype, name="patch_embed")(x.astype(self.dtype))
    b, h, w, _ = x.shape
    cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
    pos_embed = self.param(
      "pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + grid * grid, d), jnp.float32
    )
    patch_pos = resample_pos_embed(pos_embed[0, 1:].reshape(grid, grid, d), (h, w))
    pos = jnp.concatenate([pos_embed[0, :1], patch_pos.reshape(h * w, d)])
    cls = jnp.broadcast_to(cls_token, (b, 1, d)).astype(self.dtype)
    x = jnp.concatenate([cls, x.reshape(b, h * w, d)], axis=1) + pos.astype(self.dtype)
    x = nn.Dropout(self.pos_drop_rate, deterministic=not train)(x)
    for i in range(self.depth):
      x = Block(
        self.num_heads,
        self.mlp_ratio,
        self.proj_drop_rate,
        self.attn_drop_rate,
        self.drop_path_rate * i / max(self.depth - 1, 1),
        self.dtype,
        name=f"blocks_{i}",
      )(x, train)
      self.sow("intermediates", f"block{i}", x)
    x = layer_norm("norm", self.dtype)(x)
    self.sow("intermediates", "features", x)
    x = x[:, 0]
    if not self.num_classes:
      return x
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


def _config(variant: str) -> dict[str, Any]:
  return variant_config(VARIANTS, variant, "ViT")


def create(
  variant: str, *, num_classes: int = 0, dtype: Any = jnp.float32, **kw: Any
) -> VisionTransformer:
  """ViT for ``variant`` (see ``VARIANTS``); ``kw`` overrides fields (drop rates, sizes)."""
  return VisionTransformer(**{**_config(variant), **kw}, num_classes=num_classes, dtype=dtype)


def num_features(variant: str) -> int:
  return _config(variant)["embed_dim"]


def preprocessing(variant: str) -> dict[str, Any]:
  """Input size and mean/std (0..1 units) the weights of ``variant`` (optionally with its timm
  tag) expect."""
  _config(variant)
  return variant_preprocessing(PREPROCESSING, variant)


def convert_timm(
  state_dict: Mapping[str, np.ndarray], variant: str, *, num_classes: int | None = None, **kw: Any
) -> dict:
  """timm ``vit_*_patch16_*`` state dict -> Flax variables {"params"}.

  ``num_classes``: see ``layers.split_head`` (None keeps the checkpoint's ``head``). The
  checkpoint's position-embedding grid must match the variant's ``img_size``; inputs of other
  sizes are handled at call time.
  """
  num_classes, sd = split_head(state_dict, "head", num_classes)
  model = create(variant, num_classes=num_classes, **kw)
  reference = abstract_variables(model, size=model.img_size)
  return variables_from_torch(sd, reference, what=f"ViT {variant!r} checkpoint")
