"""Xception: numerical parity with timm ``legacy_xception`` for random weights (eval mode and
train-mode batch statistics), parameter count, intermediates, strict key mapping."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


import backbone_parity as bp  # noqa: E402

from csdfd_jax.models import xception  # noqa: E402
from csdfd_jax.models.layers import abstract_variables, param_count, variables_from_torch  # noqa: E402
from csdfd_jax.models.weights import WeightMappingError  # noqa: E402

_apply, _eval_both, _matmul_dtypes = bp.apply, bp.eval_both, bp.matmul_dtypes

TOL = dict(rtol=1e-3, atol=1e-4)


@functools.cache
def _timm_xception() -> dict[str, np.ndarray]:
  """State dict of a full-size timm legacy_xception (10 classes) with every tensor random."""
  torch.manual_seed(0)
  model = timm.create_model("legacy_xception", pretrained=False, num_classes=10)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _torch_model(state: dict[str, np.ndarray]) -> torch.nn.Module:
  model = timm.create_model("legacy_xception", pretrained=False, num_classes=10)
  model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
  return model


def test_timm_parity_full_size_small_input():
  """The real legacy_xception topology at 64 px (final map 2x2): eval logits, pooled
  features and intermediates; train-mode logits and updated running statistics."""
  state = _timm_xception()
  tmodel = _torch_model(state).eval()
  variables = xception.convert_timm(state, "legacy_xception")
  model = xception.create("legacy_xception", num_classes=10)
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  with torch.no_grad():
    feats, taps = tmodel.forward_intermediates(torch.from_numpy(x))
    want_pooled = tmodel.forward_head(feats, pre_logits=True).numpy()
    want = tmodel.forward_head(feats).numpy()
  (got, inter), pooled = _eval_both(model, variables, xj)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  names = ["stem", "entry1", "entry2", "middle", "features"]
  for name, tap in zip(names, taps, strict=True):
    ours = np.asarray(inter["intermediates"][name][0]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, tap.numpy(), **TOL, err_msg=name)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled, **TOL)

  tmodel.train()
  with torch.no_grad():
    want_train = tmodel(torch.from_numpy(x)).numpy()
  got_train, updated = _apply(model, variables, xj, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got_train), want_train, **TOL)
  torch_state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  want_stats = variables_from_torch(torch_state, variables, what="updated")["batch_stats"]
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), b, **TOL),
    updated["batch_stats"],
    want_stats,
  )


def test_parameter_count_and_preprocessing():
  with torch.device("meta"):
    tmodel = timm.create_model("legacy_xception", pretrained=False)
  abstract = abstract_variables(xception.create("legacy_xception", num_classes=1000), size=96)
  assert param_count(abstract["params"]) == sum(p.numel() for p in tmodel.parameters())
  assert xception.num_features("legacy_xception") == tmodel.num_features == 2048
  cfg = xception.preprocessing("legacy_xception")
  assert (cfg["mean"], cfg["std"]) == (tmodel.default_cfg["mean"], tmodel.default_cfg["std"])
  assert cfg["input_size"] == tmodel.default_cfg["input_size"][-1] == 299


def test_tiny_variant_shapes():
  model = xception.create("tiny", num_classes=3)
  variables = abstract_variables(model, size=64)
  run = functools.partial(model.apply, mutable=["intermediates"])
  out, inter = jax.eval_shape(run, variables, jnp.zeros((2, 64, 64, 3)))
  assert out.shape == (2, 3)
  shapes = {k: v[0].shape for k, v in inter["intermediates"].items()}
  assert shapes == {
    "stem": (2, 29, 29, 8),
    "entry1": (2, 15, 15, 16),
    "entry2": (2, 8, 8, 24),
    "middle": (2, 4, 4, 32),
    "features": (2, 2, 2, 96),
  }


def test_strict_mapping_names_bad_keys():
  state = _timm_xception()
  missing = {k: v for k, v in state.items() if k != "block5.rep.5.running_var"}
  with pytest.raises(WeightMappingError, match=r"missing key 'block5\.rep\.5\.running_var'"):
    xception.convert_timm(missing, "legacy_xception")
  bad = dict(state, **{"block12.skip.weight": np.zeros((1024, 728, 3, 3), np.float32)})
  with pytest.raises(WeightMappingError, match=r"shape mismatch for 'block12\.skip\.weight'"):
    xception.convert_timm(bad, "legacy_xception")
  backbone = xception.convert_timm(state, "legacy_xception", num_classes=0)
  assert "fc" not in backbone["params"]


def test_bfloat16_compute_float32_params():
  model = xception.create("tiny", num_classes=3, dtype=jnp.bfloat16)
  abstract = abstract_variables(model, size=64)
  variables = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract)} == {np.dtype("float32")}
  x = jnp.zeros((1, 64, 64, 3))
  assert _matmul_dtypes(model, variables, x) == {"bfloat16"}
  assert jax.eval_shape(model.apply, variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("arch", ["legacy_xception"])
def test_preprocessing_matches_timm_pretrained_cfgs(arch):
  """Every timm weight tag of the architecture: same input size and normalisation."""
  from timm.models import get_pretrained_cfg

  tags = [n for n in timm.list_pretrained(f"{arch}.*") if n.split(".")[0] == arch]
  assert tags
  for name in tags:
    cfg = get_pretrained_cfg(name)
    want = dict(mean=tuple(cfg.mean), std=tuple(cfg.std), input_size=cfg.input_size[-1])
    assert xception.preprocessing(name) == want, name
