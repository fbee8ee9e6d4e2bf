"""ResNet: numerical parity with timm and torchvision for random weights (eval and train-mode
batch statistics), parameter counts of the full-size variants, strict key mapping."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


import backbone_parity as bp  # noqa: E402

from csdfd_jax.models import layers, resnet  # noqa: E402
from csdfd_jax.models.weights import WeightMappingError  # noqa: E402

_apply, _eval_both, _matmul_dtypes, _state = bp.apply, bp.eval_both, bp.matmul_dtypes, bp.state

TOL = dict(rtol=1e-3, atol=1e-4)


_randomize = bp.randomize_bn


def _check_parity(tmodel, variables, flax_model, size=48, batch=3):
  """Logits and pooled features in eval mode; logits and running stats after one train step."""
  x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  tmodel.eval()
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x)).numpy()
    want_pooled = tmodel.forward_head(tmodel.forward_features(torch.from_numpy(x)), True)
  (got, _), pooled = _eval_both(flax_model, variables, xj)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled.numpy(), **TOL)

  tmodel.train()
  with torch.no_grad():
    want_train = tmodel(torch.from_numpy(x)).numpy()
  got_train, updated = _apply(flax_model, variables, xj, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got_train), want_train, **TOL)
  stats = layers.variables_from_torch(_state(tmodel), variables, what="updated")["batch_stats"]
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), b, **TOL), updated["batch_stats"], stats
  )


@pytest.mark.parametrize(
  "timm_name,variant", [("resnet34", "tiny"), ("resnet50", "tiny_bottleneck")]
)
def test_timm_parity_tiny(timm_name, variant):
  cfg = resnet.VARIANTS[variant]
  tmodel = timm.create_model(
    timm_name,
    pretrained=False,
    num_classes=7,
    layers=cfg["layers"],
    channels=cfg["channels"],
  )
  _randomize(tmodel)
  variables = resnet.convert_timm(_state(tmodel), variant)
  _check_parity(tmodel, variables, resnet.create(variant, num_classes=7))


def test_torchvision_parity_shallow():
  """torchvision's own ResNet class (bottleneck, one block per stage, full widths)."""
  tv = torchvision.models.resnet
  layers = (1, 1, 1, 1)
  tmodel = _randomize(tv.ResNet(tv.Bottleneck, list(layers), num_classes=5), seed=1)
  variables = resnet.convert_torchvision(_state(tmodel), "resnet50", layers=layers)
  flax_model = resnet.create("resnet50", num_classes=5, layers=layers)
  x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
  tmodel.eval()
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x)).numpy()
  got = _apply(flax_model, variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_full_size_parameter_counts(name):
  with torch.device("meta"):
    tm = timm.create_model(name, pretrained=False)
    tv = getattr(torchvision.models, name)()
  assert tm.state_dict().keys() == tv.state_dict().keys()  # one mapping serves both
  want = sum(p.numel() for p in tm.parameters())
  assert want == sum(p.numel() for p in tv.parameters())
  abstract = layers.abstract_variables(resnet.create(name, num_classes=1000))
  assert layers.param_count(abstract["params"]) == want
  assert resnet.num_features(name) == tm.num_features


def test_backbone_drops_head_and_sows_stages():
  tmodel = timm.create_model("resnet34", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
  variables = resnet.convert_timm(_state(tmodel), "tiny", num_classes=0)
  assert "fc" not in variables["params"]
  model = resnet.create("tiny")
  x = jnp.zeros((2, 64, 64, 3))
  run = functools.partial(model.apply, mutable=["intermediates"])
  pooled, inter = jax.eval_shape(run, variables, x)
  assert pooled.shape == (2, resnet.num_features("tiny"))
  shapes = {k: v[0].shape for k, v in inter["intermediates"].items()}
  assert shapes == {
    "layer1": (2, 16, 16, 8),
    "layer2": (2, 8, 8, 16),
    "layer3": (2, 4, 4, 32),
    "layer4": (2, 2, 2, 64),
    "features": (2, 2, 2, 64),
  }


def test_strict_mapping_names_bad_keys():
  tmodel = timm.create_model("resnet34", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
  sd = _state(tmodel)
  renamed = dict(sd)
  renamed["layer2.0.downsample.0.weight_typo"] = renamed.pop("layer2.0.downsample.0.weight")
  with pytest.raises(WeightMappingError, match=r"layer2\.0\.downsample\.0\.weight"):
    resnet.convert_timm(renamed, "tiny")
  reshaped = dict(sd, **{"layer3.0.bn1.running_var": np.ones(5, np.float32)})
  with pytest.raises(WeightMappingError, match=r"shape mismatch for 'layer3\.0\.bn1\.running_var'"):
    resnet.convert_timm(reshaped, "tiny")
  with pytest.raises(WeightMappingError, match="fc.weight"):
    resnet.convert_timm(sd, "tiny", num_classes=3)


def test_bfloat16_compute_keeps_float32_params():
  torch.manual_seed(0)  # the conv weights: the relative error below is ~1% for any seed
  tmodel = _randomize(
    timm.create_model("resnet34", num_classes=4, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
  )
  variables = resnet.convert_timm(_state(tmodel), "tiny")
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  out = _apply(resnet.create("tiny", num_classes=4, dtype=jnp.bfloat16), variables, x)
  assert out.dtype == jnp.bfloat16
  assert _matmul_dtypes(resnet.create("tiny", dtype=jnp.bfloat16), variables, x) == {"bfloat16"}
  ref = _apply(resnet.create("tiny", num_classes=4), variables, x)
  assert np.linalg.norm(np.asarray(out, np.float32) - ref) < 0.03 * np.linalg.norm(ref)


def _calibrate(model: torch.nn.Module, size: int) -> torch.nn.Module:
  """Running statistics of one random batch, so activations keep a realistic scale through
  the full depth (random statistics make logits of ~1e3, where float32 summation order alone
  exceeds atol on the entries near zero)."""
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in bns:
    m.reset_running_stats()
    m.momentum = None  # cumulative average: after one batch, exactly its statistics
  model.train()
  with torch.no_grad():
    model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(5)))
  for m in bns:
    m.momentum = 0.1
  return model


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_preprocessing_matches_timm_pretrained_cfgs(arch):
  """Every timm weight tag of the architecture: same input size and normalisation."""
  from timm.models import get_pretrained_cfg

  tags = [n for n in timm.list_pretrained(f"{arch}.*") if n.split(".")[0] == arch]
  assert tags
  for name in tags:
    cfg = get_pretrained_cfg(name)
    want = dict(mean=tuple(cfg.mean), std=tuple(cfg.std), input_size=cfg.input_size[-1])
    assert resnet.preprocessing(name) == want, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_full_size_parity(name):
  tmodel = _calibrate(_randomize(timm.create_model(name, pretrained=False)), 224)
  variables = resnet.convert_timm(_state(tmodel), name)
  _check_parity(tmodel, variables, resnet.create(name, num_classes=1000), size=224, batch=2)
