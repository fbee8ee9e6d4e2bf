"""ConvNeXt: numerical parity with timm for random weights, parameter counts of the full-size
variants, strict key mapping, bfloat16 compute. (Drop path is the ViT tests' helper.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


import backbone_parity as bp  # noqa: E402

from csdfd_jax.models import convnext  # noqa: E402
from csdfd_jax.models.layers import abstract_variables, param_count  # noqa: E402
from csdfd_jax.models.weights import WeightMappingError  # noqa: E402

_eval_both, _matmul_dtypes, _state = bp.eval_both, bp.matmul_dtypes, bp.state

TOL = dict(rtol=1e-3, atol=1e-4)


def _timm(name: str, variant: str | None = None, num_classes: int = 10) -> torch.nn.Module:
  """timm ConvNeXt (shrunk to ``variant``'s sizes) with random norms, biases and layer scales
  (timm starts ``gamma`` at 1e-6, which would hide every residual branch from the
  comparison); conv and linear weights keep timm's truncated-normal init."""
  torch.manual_seed(0)
  sizes = convnext.VARIANTS[variant] if variant else {}
  model = timm.create_model(name, pretrained=False, num_classes=num_classes, **sizes)
  with torch.no_grad():
    for key, p in model.named_parameters():
      if key.endswith("gamma"):
        p.uniform_(0.2, 1.0)
      elif key.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif p.ndim == 1:  # LayerNorm weights
        p.normal_(1.0, 0.2)
  return model.eval()


def _check_parity(tmodel, variables, model, size=64):
  x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  with torch.no_grad():
    feats = tmodel.forward_features(torch.from_numpy(x))
    want_pooled = tmodel.forward_head(feats, pre_logits=True).numpy()
    want = tmodel.forward_head(feats).numpy()
  (got, inter), pooled = _eval_both(model, variables, xj)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  ours = np.asarray(inter["intermediates"]["features"][0]).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(ours, feats.numpy(), **TOL)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled, **TOL)


def test_timm_parity_tiny():
  tmodel = _timm("convnext_base", "tiny")
  variables = convnext.convert_timm(_state(tmodel), "tiny")
  _check_parity(tmodel, variables, convnext.create("tiny", num_classes=10))


@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_small", "convnext_base"])
def test_full_size_parameter_counts(name):
  with torch.device("meta"):
    tmodel = timm.create_model(name, pretrained=False)
  abstract = abstract_variables(convnext.create(name, num_classes=1000))
  assert param_count(abstract["params"]) == sum(p.numel() for p in tmodel.parameters())
  assert convnext.num_features(name) == tmodel.num_features
  cfg = convnext.preprocessing(name)
  assert (cfg["mean"], cfg["std"]) == (tmodel.default_cfg["mean"], tmodel.default_cfg["std"])


def test_strict_mapping_names_bad_keys():
  sd = _state(_timm("convnext_base", "tiny"))
  missing = {k: v for k, v in sd.items() if k != "stages.2.blocks.1.gamma"}
  with pytest.raises(WeightMappingError, match=r"missing key 'stages\.2\.blocks\.1\.gamma'"):
    convnext.convert_timm(missing, "tiny")
  bad = dict(sd, **{"stages.1.downsample.1.weight": np.zeros((16, 8, 3, 3), np.float32)})
  with pytest.raises(WeightMappingError, match=r"shape mismatch for 'stages\.1\.downsample\.1"):
    convnext.convert_timm(bad, "tiny")
  backbone = convnext.convert_timm(sd, "tiny", num_classes=0)
  assert set(backbone["params"]["head"]) == {"norm"}


def test_bfloat16_compute_float32_params():
  variables = convnext.convert_timm(_state(_timm("convnext_base", "tiny")), "tiny")
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {np.dtype("float32")}
  x = jnp.zeros((1, 64, 64, 3))
  model = convnext.create("tiny", num_classes=10, dtype=jnp.bfloat16)
  assert _matmul_dtypes(model, variables, x) == {"bfloat16"}
  assert jax.eval_shape(model.apply, variables, x).dtype == jnp.bfloat16
  assert _matmul_dtypes(convnext.create("tiny"), variables, x) == {"float32"}


@pytest.mark.parametrize("arch", ["convnext_tiny", "convnext_small", "convnext_base"])
def test_preprocessing_matches_timm_pretrained_cfgs(arch):
  """Every timm weight tag of the architecture: same input size and normalisation."""
  from timm.models import get_pretrained_cfg

  tags = [n for n in timm.list_pretrained(f"{arch}.*") if n.split(".")[0] == arch]
  assert tags
  for name in tags:
    cfg = get_pretrained_cfg(name)
    want = dict(mean=tuple(cfg.mean), std=tuple(cfg.std), input_size=cfg.input_size[-1])
    assert convnext.preprocessing(name) == want, name


@pytest.mark.slow
def test_full_size_parity():
  tmodel = _timm("convnext_base", num_classes=1000)
  variables = convnext.convert_timm(_state(tmodel), "convnext_base")
  _check_parity(tmodel, variables, convnext.create("convnext_base", num_classes=1000), size=224)
