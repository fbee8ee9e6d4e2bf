"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") in Flax Linen: the ViT image tower, the text tower and the learned temperature.

The layout is OpenAI's, and the Flax module names are its state-dict keys:

* image tower ``visual``: ``conv1`` (patch embedding, no bias) -> prepend ``class_embedding``
  -> add ``positional_embedding`` -> ``ln_pre`` -> ``transformer.resblocks.<i>`` -> ``ln_post``
  on the class token -> ``@ proj`` (width -> embed_dim);
* text tower ``text`` (top-level keys in OpenAI's file): ``token_embedding`` + the first L rows
  of ``positional_embedding`` -> the same blocks with a causal mask -> ``ln_final`` -> the
  features at the end-of-text token, which is the largest id of the vocabulary, so its position
  is ``argmax(ids)`` -> ``@ text_projection``;
* ``logit_scale``: logits = exp(logit_scale) * cos(image, text).

A block is pre-norm: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``, with torch
``nn.MultiheadAttention``'s fused ``in_proj`` (rows q, k, v), an MLP ``c_fc -> act -> c_proj``
with QuickGELU x * sigmoid(1.702 x) (OpenAI's weights; ``quick_gelu=False`` gives exact GELU,
as open_clip's non-"quickgelu" models), and LayerNorm eps 1e-5 (the timm ViT uses 1e-6). The
blocks build their two norms with the ``norm`` factory, so a method can swap them (e.g. for a
domain-conditioned norm) without touching the rest; ``ln_pre``/``ln_post``/``ln_final`` stay
plain. ``return_layers=(i, ...)`` makes a tower also return the tokens [B, N, width] after the
listed blocks (zero-indexed). Inputs of another size than ``image_size`` resample the patch
grid of the position embeddings as ``vit.resample_pos_embed`` does (open_clip's
``resize_pos_embed`` uses the same bicubic, antialiased kernel).

As a backbone of this project, ``create(variant)`` is the image tower alone and returns the
image embedding [B, embed_dim] (``project=False``: the ``ln_post`` class token [B, width], as
Hugging Face's ``pooler_output``); ``create_clip(variant)`` is the two-tower model. Weights come
from local files: ``convert_openai`` (OpenAI's TorchScript archive or a plain state dict; read
it with :func:`load_openai`), ``convert_open_clip`` and ``convert_hf`` (``CLIPModel``); with
``num_classes=0`` they return the image tower alone (what ``Detector`` loads as its backbone;
the text tower's keys are dropped on purpose), with ``None`` both towers. The head count is the
one number a checkpoint does not hold: the variant fixes it (64-wide heads in every released
model).
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from csdfd_jax.models import weights
from csdfd_jax.models.layers import variant_config
from csdfd_jax.models.vit import CLIP_MEAN, CLIP_STD, resample_pos_embed

_TEXT = dict(width=512, layers=12, heads=8, context_length=77, vocab_size=49408)
_TEXT_L = dict(_TEXT, width=768, heads=12)
_B = dict(width=768, layers=12, heads=12)
_L = dict(width=1024, layers=24, heads=16)
VARIANTS: dict[str, dict[str, Any]] = {
  "vit_b32": dict(embed_dim=512, vision=dict(_B, image_size=224, patch_size=32), text=_TEXT),
  "vit_b16": dict(embed_dim=512, vision=dict(_B, image_size=224, patch_size=16), text=_TEXT),
  "vit_l14": dict(embed_dim=768, vision=dict(_L, image_size=224, patch_size=14), text=_TEXT_L),
  "vit_l14_336": dict(embed_dim=768, vision=dict(_L, image_size=336, patch_size=14), text=_TEXT_L),
  "tiny": dict(
    embed_dim=32,
    vision=dict(image_size=32, patch_size=8, width=64, layers=2, heads=2),
    text=dict(_TEXT, width=32, layers=2, heads=2),
  ),
}

layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-5, use_fast_variance=False)


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """x * sigmoid(1.702 x), the GELU approximation OpenAI's CLIP was trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


class Attention(nn.Module):
  """Multi-head self-attention, torch ``nn.MultiheadAttention`` layout: one ``in_proj`` whose
  output columns are q, k, v (each heads x head_dim), then ``out_proj``. With ``record`` it also
  returns ``cls_attn`` [B, heads, N] (the first token's attention weights) and ``cls_out``
  [B, d] (the output at the first token), for GM-DF's second-order term."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, causal: bool = False, record: bool = False):
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by {self.num_heads} heads")
    qkv = nn.Dense(3 * d, dtype=self.dtype, name="in_proj")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
    if q.dtype == jnp.float64:  # dot_product_attention takes its softmax in float32
      scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // self.num_heads)
      if causal:
        scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -jnp.inf)
      out = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(scores, axis=-1), v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    out = nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(b, n, d))
    if not record:
      return out
    scores = jnp.einsum("bhe,bnhe->bhn", q[:, 0], k) / math.sqrt(d // self.num_heads)
    weights = jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), axis=-1)
    return out, {"cls_attn": weights, "cls_out": out[:, 0]}


class Mlp(nn.Module):
  """``c_fc`` -> QuickGELU (or exact GELU) -> ``c_proj``."""

  hidden: int
  quick_gelu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = nn.Dense(self.hidden, dtype=self.dtype, name="c_fc")(x)
    h = quick_gelu(h) if self.quick_gelu else nn.gelu(h, approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="c_proj")(h)


class ResidualAttentionBlock(nn.Module):
  """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); ``norm(dtype=, name=)`` builds
  ``ln_1`` and ``ln_2``. ``branch(dtype=, name=)``, when given, builds a module added beside the
  MLP on the same input, ``x + mlp(h) + branch(h, domain)`` with h = ln_2(x) (GM-DF's expert
  branch, ``csdfd_jax.models.gmdf``; ``domain`` is the per-sample code it is conditioned on).
  With ``record`` it returns ``(out, record)``: ln_1's per-token std ``ln1_std`` [B, N], the
  MLP output ``mlp_out`` [B, N, d], the attention's ``cls_attn`` and ``cls_out`` and, with a
  branch, the RMS of the branch's output ``branch_rms`` []."""

  num_heads: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = True
  norm: Callable[..., nn.Module] = layer_norm
  dtype: Any = jnp.float32
  branch: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    *,
    causal: bool = False,
    domain: jnp.ndarray | None = None,
    record: bool = False,
  ):
    rec = {}
    if record:  # ln_1's statistic (LayerNorm eps 1e-5), for GM-DF's Eq. 7
      up = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      rec["ln1_std"] = jnp.sqrt(jnp.var(up, axis=-1) + 1e-5)
    y = self.norm(dtype=self.dtype, name="ln_1")(x)
    attn = Attention(self.num_heads, self.dtype, name="attn")(y, causal=causal, record=record)
    if record:
      attn, more = attn
      rec |= more
    x = x + attn
    y = self.norm(dtype=self.dtype, name="ln_2")(x)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    mlp = Mlp(hidden, self.quick_gelu, self.dtype, name="mlp")(y)
    out = x + mlp
    if self.branch is not None:
      extra = self.branch(dtype=self.dtype, name="branch")(y, domain)
      out = out + extra
      if record:
        rec["branch_rms"] = jnp.sqrt(jnp.mean(jnp.square(extra.astype(jnp.float32))))
    if not record:
      return out
    return out, rec | {"mlp_out": mlp}


class Transformer(nn.Module):
  """``layers`` blocks ``resblocks_<i>``; returns the last tokens and those after each block
  of ``return_layers`` (zero-indexed, in that order), and with ``record`` each block's record
  (``ResidualAttentionBlock``) as a third element."""

  layers: int
  heads: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = True
  norm: Callable[..., nn.Module] = layer_norm
  dtype: Any = jnp.float32
  branch: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    *,
    causal: bool = False,
    return_layers: Sequence[int] = (),
    domain: jnp.ndarray | None = None,
    record: bool = False,
  ) -> tuple:
    bad = [i for i in return_layers if not 0 <= i < self.layers]
    if bad:
      raise ValueError(f"return_layers {bad} out of range: blocks are 0..{self.layers - 1}")
    kept, records = {}, []
    for i in range(self.layers):
      block = ResidualAttentionBlock(
        self.heads,
        self.mlp_ratio,
        self.quick_gelu,
        self.norm,
        self.dtype,
        self.branch,
        name=f"resblocks_{i}",
      )
      x = block(x, causal=causal, domain=domain, record=record)
      if record:
        x, rec = x
        records.append(rec)
      kept[i] = x
    layers = tuple(kept[i] for i in return_layers)
    return (x, layers, tuple(records)) if record else (x, layers)


class VisionTransformer(nn.Module):
  """CLIP's image tower: NHWC images (normalised with the CLIP mean/std) -> the image
  embedding [B, embed_dim], or the ``ln_post`` class token [B, width] with ``project=False``
  (``proj`` exists either way, so one checkpoint serves both). With ``return_layers`` it
  returns ``(output, tokens after those blocks)``. Sows ``features`` (the last block's tokens)
  into "intermediates". ``train`` is the backbone interface's flag; CLIP has no dropout.
  ``branch`` adds a module beside every block's MLP (``ResidualAttentionBlock``), conditioned on
  ``domain`` [B, k] (None: the wildcard, as eval and predict call it). ``record=True`` returns
  ``(output, tokens after return_layers, per-block records)`` (GM-DF's Eq. 7 reads them).
  ``mask`` [B, grid * grid] (bool) replaces the masked patches' embeddings by ``mask_token``
  [width] before the position embeddings are added (masked image modelling, SimMIM-style)."""

  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  embed_dim: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = True
  project: bool = True
  norm: Callable[..., nn.Module] = layer_norm
  dtype: Any = jnp.float32
  branch: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    *,
    train: bool = False,
    return_layers: Sequence[int] = (),
    domain: jnp.ndarray | None = None,
    record: bool = False,
    mask: jnp.ndarray | None = None,
    mask_token: jnp.ndarray | None = None,
  ) -> jnp.ndarray | tuple:
    p, w, grid = self.patch_size, self.width, self.image_size // self.patch_size
    h, wd = x.shape[1:3]
    if h % p or wd % p or min(h, wd) < p:
      raise ValueError(
        f"CLIP input {h}x{wd} px is not a positive multiple of its {p} px patch "
        f"(--config.data.image_size); its weights were trained at {self.image_size} px"
      )
    x = nn.Conv(w, (p, p), (p, p), "VALID", use_bias=False, dtype=self.dtype, name="conv1")(
      x.astype(self.dtype)
    )
    b, gh, gw, _ = x.shape
    init = nn.initializers.normal(w**-0.5)
    cls = self.param("class_embedding", init, (w,), jnp.float32)
    pos = self.param("positional_embedding", init, (1 + grid * grid, w), jnp.float32)
    patch_pos = resample_pos_embed(pos[1:].reshape(grid, grid, w), (gh, gw))
    pos = jnp.concatenate([pos[:1], patch_pos.reshape(gh * gw, w)]).astype(self.dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, w))
    x = x.reshape(b, gh * gw, w)
    if mask is not None:
      if mask_token is None or mask.shape != (b, gh * gw):
        raise ValueError(f"mask {mask.shape} needs shape ({b}, {gh * gw}) and a mask_token")
      x = jnp.where(mask[..., None], mask_token.astype(self.dtype), x)
    x = jnp.concatenate([cls, x], axis=1) + pos
    x = layer_norm(dtype=self.dtype, name="ln_pre")(x)
    x, layers, *records = _trunk(self)(x, return_layers=return_layers, domain=domain, record=record)
    self.sow("intermediates", "features", x)
    x = layer_norm(dtype=self.dtype, name="ln_post")(x[:, 0])
    proj = self.param("proj", init, (w, self.embed_dim), jnp.float32)
    if self.project:
      x = x @ proj.astype(self.dtype)
    if record:
      return x, layers, records[0]
    return (x, layers) if return_layers else x


class TextTransformer(nn.Module):
  """CLIP's text tower: token ids [B, L] (L <= context_length, end-of-text = the largest id,
  padding after it) -> the text embedding [B, embed_dim]. ``token_embeds`` [B, L, width]
  replaces the embedding lookup (learned prompt vectors); the ids still mark the end-of-text
  position. ``slots`` {position: [B, width]} replaces the looked-up embeddings at those
  positions only (a prompt template with learned words: GM-DF's Eq. 9). ``return_layers`` as
  for the image tower."""

  width: int
  layers: int
  heads: int
  context_length: int
  vocab_size: int
  embed_dim: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = True
  norm: Callable[..., nn.Module] = layer_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    ids: jnp.ndarray,
    *,
    token_embeds: jnp.ndarray | None = None,
    slots: Mapping[int, jnp.ndarray] | None = None,
    return_layers: Sequence[int] = (),
  ) -> jnp.ndarray | tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
    b, n = ids.shape
    if n > self.context_length:
      raise ValueError(f"{n} tokens exceed the context length {self.context_length}")
    embed = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      name="token_embedding",
    )
    x = embed(ids) if token_embeds is None else token_embeds.astype(self.dtype)
    for position, vectors in (slots or {}).items():
      x = x.at[:, position].set(jnp.broadcast_to(vectors, (b, self.width)).astype(self.dtype))
    pos = self.param(
      "positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width)
    )
    x = x + pos[:n].astype(self.dtype)
    x, layers = _trunk(self)(x, causal=True, return_layers=return_layers)
    x = layer_norm(dtype=self.dtype, name="ln_final")(x)
    x = x[jnp.arange(b), jnp.argmax(ids, axis=-1)]
    proj = self.param(
      "text_projection", nn.initializers.normal(self.width**-0.5), (self.width, self.embed_dim)
    )
    x = x @ proj.astype(self.dtype)
    return (x, layers) if return_layers else x


def _trunk(tower: nn.Module) -> Transformer:
  """A tower's ``transformer`` submodule, built with the tower's block settings."""
  return Transformer(
    tower.layers,
    tower.heads,
    tower.mlp_ratio,
    tower.quick_gelu,
    tower.norm,
    tower.dtype,
    getattr(tower, "branch", None),
    name="transformer",
  )


def _normalize(x: jnp.ndarray) -> jnp.ndarray:
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIP(nn.Module):
  """Both towers and ``logit_scale``; ``__call__(images, ids)`` gives the image-to-text logits
  exp(logit_scale) * cos(image_i, text_j) [B_images, B_texts] (float32)."""

  visual: VisionTransformer
  text: TextTransformer

  def setup(self):
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (), jnp.float32
    )

  def encode_image(self, images: jnp.ndarray, **kw: Any):
    return self.visual(images, **kw)

  def encode_text(self, ids: jnp.ndarray, **kw: Any):
    return self.text(ids, **kw)

  def __call__(self, images: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    image, text = _normalize(self.encode_image(images)), _normalize(self.encode_text(ids))
    return jnp.exp(self.logit_scale) * image @ text.T


def _config(variant: str) -> dict[str, Any]:
  return variant_config(VARIANTS, variant, "CLIP")


def create(
  variant: str, *, num_classes: int = 0, dtype: Any = jnp.float32, **kw: Any
) -> VisionTransformer:
  """The image tower of ``variant`` (see ``VARIANTS``), a backbone returning the image
  embedding; ``kw`` overrides fields (``project``, ``quick_gelu``, ``norm``, ...)."""
  if num_classes:
    raise ValueError("CLIP's image tower has no classifier: use num_classes=0 (a backbone)")
  cfg = _config(variant)
  return VisionTransformer(**cfg["vision"], embed_dim=cfg["embed_dim"], dtype=dtype, **kw)


def create_clip(variant: str, *, dtype: Any = jnp.float32, **kw: Any) -> CLIP:
  """Both towers of ``variant``; ``kw`` overrides fields both towers have (``quick_gelu``,
  ``mlp_ratio``, ``norm``)."""
  cfg = _config(variant)
  visual = create(variant, dtype=dtype, **kw)
  text = TextTransformer(**cfg["text"], embed_dim=cfg["embed_dim"], dtype=dtype, **kw)
  return CLIP(visual, text)


def num_features(variant: str) -> int:
  """Width of the backbone's output (the image embedding)."""
  return _config(variant)["embed_dim"]


def preprocessing(variant: str) -> dict[str, Any]:
  """Input size and the CLIP mean/std (0..1 units) every CLIP checkpoint expects."""
  return dict(mean=CLIP_MEAN, std=CLIP_STD, input_size=_config(variant)["vision"]["image_size"])


def abstract_clip(variant: str) -> Any:
  """Shapes of ``create_clip(variant).init`` variables (``jax.eval_shape``, no compute)."""
  cfg = _config(variant)
  size = cfg["vision"]["image_size"]
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  ids = jnp.zeros((1, cfg["text"]["context_length"]), jnp.int32)
  model = create_clip(variant)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, ids))


# ------------------------------------------------------------------------------ conversion

_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final")
_TEXT_KEYS += ("text_projection", "logit_scale", "context_length", "vocab_size")
_HF_TEXT_KEYS = ("text_model", "text_projection", "logit_scale")


def load_openai(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """OpenAI's released ``ViT-*.pt`` (a TorchScript archive, fp16) as a float32 state dict,
  via ``torch.jit.load(...).state_dict()``; any other file through
  ``weights.load_state_dict`` (plain state dicts, also fp16). ``torch.jit.load`` reads the
  archive with TorchScript's own unpickler, not Python's, but the archive carries TorchScript
  code: load files you trust. The conversion CLI reads ``--source openai`` inputs with this
  function (``convert.convert`` uses a family's ``load_<source>`` where one exists)."""
  path = os.fspath(path)
  scripted = zipfile.is_zipfile(path)
  if scripted:
    with zipfile.ZipFile(path) as z:
      scripted = any(n.endswith("/constants.pkl") for n in z.namelist())
  if not scripted:
    return weights.load_state_dict(path)
  import torch

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the format
    state = torch.jit.load(path, map_location="cpu").state_dict()
  return {
    k: (v.float() if v.is_floating_point() else v).detach().cpu().numpy() for k, v in state.items()
  }


_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _openai_key(path: tuple[str, ...]) -> str:
  """Flax path -> OpenAI key: ('params', 'text', 'transformer', 'resblocks_0', 'ln_1',
  'scale') -> 'transformer.resblocks.0.ln_1.weight'; the fused attention input is
  ``attn.in_proj_weight``. (``layers.torch_key`` would read ``ln_1`` as a list index.)"""
  _, *modules, leaf = path
  modules = [re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", m) for m in modules]
  key = ".".join([*modules, _LEAF.get(leaf, leaf)]).removeprefix("text.")
  return re.sub(r"in_proj\.(weight|bias)$", r"in_proj_\1", key)


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] != "kernel":
    return tuple(shape)
  return tuple(shape[::-1]) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])


def _to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)


def _take_openai(mapping: weights.StrictMapping, key: str, shape: tuple[int, ...]):
  return mapping.take(key, shape)


_HF_RENAMES = (
  (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
  (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
  (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
  (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),  # sic
  (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
  (r"^visual\.proj$", "visual_projection.weight"),
  (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
  (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
  (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
  (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
  (r"^ln_final\.", "text_model.final_layer_norm."),
  (r"^text_projection$", "text_projection.weight"),
  (r"\.ln_(\d)\.", r".layer_norm\1."),
  (r"\.mlp\.c_fc\.", ".mlp.fc1."),
  (r"\.mlp\.c_proj\.", ".mlp.fc2."),
  (r"\.attn\.", ".self_attn."),
)


def hf_key(openai_key: str) -> str:
  """The Hugging Face ``CLIPModel`` key holding OpenAI's ``openai_key`` (for ``in_proj_*``,
  the stem of its ``{q,k,v}_proj`` keys)."""
  for pattern, replacement in _HF_RENAMES:
    openai_key = re.sub(pattern, replacement, openai_key)
  return openai_key


def _take_hf(mapping: weights.StrictMapping, key: str, shape: tuple[int, ...]):
  name = hf_key(key)
  if key in ("visual.proj", "text_projection"):  # nn.Linear [embed, width]; OpenAI x @ proj
    return mapping.take(name, shape, np.transpose)
  stem, _, leaf = name.rpartition(".in_proj_")
  if stem:  # separate q, k, v projections, stacked as torch's fused in_proj
    part = (shape[0] // 3, *shape[1:])
    parts = [mapping.take(f"{stem}.{c}_proj.{leaf}", part) for c in "qkv"]
    return None if any(p is None for p in parts) else np.concatenate(parts)
  return mapping.take(name, shape)


def _convert(
  state_dict: Mapping[str, np.ndarray],
  variant: str,
  num_classes: int | None,
  take: Callable[[weights.StrictMapping, str, tuple[int, ...]], np.ndarray | None],
  text_keys: tuple[str, ...],
  what: str,
) -> dict:
  """Fills the variables of ``variant`` with ``take(mapping, openai_key, torch_shape)``,
  strictly. ``num_classes=0`` keeps the image tower and drops the keys whose first part is in
  ``text_keys`` (the text tower and ``logit_scale``)."""
  if num_classes not in (None, 0):
    raise ValueError("CLIP has no classifier: num_classes=0 (image tower) or None (both)")
  reference = abstract_clip(variant)["params"]
  if num_classes == 0:
    reference = {"visual": reference["visual"]}
    state_dict = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] not in text_keys}
  mapping = weights.StrictMapping(state_dict)
  out = {}
  for path, leaf in traverse_util.flatten_dict({"params": reference}).items():
    value = take(mapping, _openai_key(path), _torch_shape(path, leaf.shape))
    out[path] = None if value is None else _to_flax(path, np.asarray(value, np.float32))
  mapping.finish(what)
  variables = traverse_util.unflatten_dict(out)
  return {"params": variables["params"]["visual"]} if num_classes == 0 else variables


def convert_openai(
  state_dict: Mapping[str, np.ndarray], variant: str, *, num_classes: int | None = None
) -> dict:
  """OpenAI CLIP state dict (``load_openai``: TorchScript archive or plain, fp16 or fp32) ->
  Flax variables {"params"}: ``{"visual", "text", "logit_scale"}``, or the image tower alone
  with ``num_classes=0``. The archive's ``input_resolution``/``context_length``/``vocab_size``
  entries, when present, must equal the variant's."""
  cfg = _config(variant)
  sd = dict(state_dict)
  expected = dict(
    input_resolution=cfg["vision"]["image_size"],
    context_length=cfg["text"]["context_length"],
    vocab_size=cfg["text"]["vocab_size"],
  )
  for key, want in expected.items():
    if key in sd and int(np.asarray(sd[key])) != want:
      raise weights.WeightMappingError(
        f"the checkpoint's {key} is {int(np.asarray(sd[key]))}, CLIP {variant!r} has {want}"
      )
    sd.pop(key, None)
  return _convert(sd, variant, num_classes, _take_openai, _TEXT_KEYS, f"OpenAI CLIP {variant!r}")


def convert_open_clip(
  state_dict: Mapping[str, np.ndarray], variant: str, *, num_classes: int | None = None
) -> dict:
  """open_clip ``CLIP`` state dict (OpenAI's key layout; a ``module.`` prefix on every key,
  as DDP training writes it, is removed) -> Flax variables, as :func:`convert_openai`. A
  ``quick_gelu=False`` model loads the same keys: pass ``quick_gelu`` to ``create``."""
  sd = dict(state_dict)
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
  return _convert(sd, variant, num_classes, _take_openai, _TEXT_KEYS, f"open_clip {variant!r}")


def convert_hf(
  state_dict: Mapping[str, np.ndarray], variant: str, *, num_classes: int | None = None
) -> dict:
  """Hugging Face ``CLIPModel`` state dict (``vision_model.*``, ``text_model.*``,
  ``visual_projection``, ``text_projection``, ``logit_scale``) -> Flax variables, as
  :func:`convert_openai`: q/k/v are stacked into ``in_proj``, the projections transposed.
  ``position_ids`` buffers (older files) must be 0..n-1 and are not loaded."""
  sd = dict(state_dict)
  for tower in ("vision_model", "text_model"):
    ids = sd.pop(f"{tower}.embeddings.position_ids", None)
    if ids is not None and not np.array_equal(np.ravel(ids), np.arange(np.size(ids))):
      raise weights.WeightMappingError(f"{tower}.embeddings.position_ids is not 0, 1, 2, ...")
  return _convert(sd, variant, num_classes, _take_hf, _HF_TEXT_KEYS, f"HF CLIP {variant!r}")
