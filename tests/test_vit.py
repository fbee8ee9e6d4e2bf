"""ViT: numerical parity with timm for random weights (default and resampled input sizes),
parameter counts of the full-size variants, dropout/drop-path in train mode, strict mapping."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


import backbone_parity as bp  # noqa: E402

from csdfd_jax.models import vit  # noqa: E402
from csdfd_jax.models.layers import abstract_variables, param_count  # noqa: E402
from csdfd_jax.models.weights import WeightMappingError  # noqa: E402

_apply, _eval_both, _matmul_dtypes, _state = bp.apply, bp.eval_both, bp.matmul_dtypes, bp.state

TOL = dict(rtol=1e-3, atol=1e-4)
TINY = vit.VARIANTS["tiny"]


def _timm_tiny(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
  """timm's ViT-B/16 entry point shrunk to the "tiny" variant, every tensor randomised (timm
  initialises LayerNorm to identity and the class token near zero)."""
  torch.manual_seed(seed)
  model = timm.create_model(
    "vit_base_patch16_224",
    pretrained=False,
    num_classes=num_classes,
    img_size=TINY["img_size"],
    embed_dim=TINY["embed_dim"],
    depth=TINY["depth"],
    num_heads=TINY["num_heads"],
    dynamic_img_size=True,
  )
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.numel() > 1 else 0.0))
  return model.eval()


@pytest.mark.parametrize("size", [64, 48, 80])
def test_timm_parity_tiny(size):
  """Default grid (4x4) and resampled grids: down (3x3, antialias matters), up (5x5)."""
  tmodel = _timm_tiny()
  variables = vit.convert_timm(_state(tmodel), "tiny")
  x = np.random.default_rng(size).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    tokens = tmodel.forward_features(torch.from_numpy(x))
    want_pooled = tmodel.forward_head(tokens, pre_logits=True).numpy()
    want = tmodel.forward_head(tokens).numpy()
  model = vit.create("tiny", num_classes=10)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  (got, inter), pooled = _eval_both(model, variables, xj)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  np.testing.assert_allclose(np.asarray(inter["intermediates"]["features"][0]), tokens, **TOL)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled, **TOL)


def test_pos_embed_resampling_matches_timm_function():
  from timm.layers import resample_abs_pos_embed

  posemb = np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  for new in [(24, 24), (7, 7), (16, 12)]:
    want = resample_abs_pos_embed(torch.from_numpy(posemb), list(new), num_prefix_tokens=1)
    got = vit.resample_pos_embed(jnp.asarray(posemb[0, 1:].reshape(14, 14, 8)), new)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, 8), want[0, 1:].numpy(), **TOL)


@pytest.mark.parametrize("name", list(vit.VARIANTS)[:4])
def test_full_size_parameter_counts(name):
  with torch.device("meta"):
    tmodel = timm.create_model(name, pretrained=False)
  abstract = abstract_variables(vit.create(name, num_classes=1000), size=224)
  assert param_count(abstract["params"]) == sum(p.numel() for p in tmodel.parameters())
  assert vit.num_features(name) == tmodel.num_features
  assert vit.preprocessing(name)["mean"] == tmodel.default_cfg["mean"]


def test_train_mode_dropout_and_drop_path():
  tmodel = _timm_tiny(num_classes=0)
  variables = vit.convert_timm(_state(tmodel), "tiny")
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
  eval_out = _apply(vit.create("tiny"), variables, x)
  noisy = vit.create("tiny", drop_path_rate=0.5, proj_drop_rate=0.1, attn_drop_rate=0.1)
  run = jax.jit(lambda v, x, r: noisy.apply(v, x, train=True, rngs={"dropout": r}))
  key = functools.partial(jax.random.key, impl="rbg")  # threefry masks compile slowly on CPU
  a, b = run(variables, x, key(1)), run(variables, x, key(2))
  assert not np.allclose(a, eval_out, atol=1e-3) and not np.allclose(a, b, atol=1e-3)
  np.testing.assert_array_equal(a, run(variables, x, key(1)))
  # all rates 0: train mode is eval mode and needs no rng
  np.testing.assert_allclose(
    _apply(vit.create("tiny"), variables, x, train=True), eval_out, rtol=1e-6
  )


def test_strict_mapping_names_bad_keys():
  sd = _state(_timm_tiny())
  with pytest.raises(WeightMappingError, match=r"missing key 'blocks\.1\.attn\.qkv\.bias'"):
    vit.convert_timm({k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.bias"}, "tiny")
  bad = dict(sd, pos_embed=np.zeros((1, 26, TINY["embed_dim"]), np.float32))
  with pytest.raises(WeightMappingError, match="shape mismatch for 'pos_embed'"):
    vit.convert_timm(bad, "tiny")
  with pytest.raises(WeightMappingError, match="unexpected key.*blocks.0.extra"):
    vit.convert_timm(dict(sd, **{"blocks.0.extra": np.zeros(3)}), "tiny")
  assert "head" not in vit.convert_timm(sd, "tiny", num_classes=0)["params"]


def test_bfloat16_compute_float32_params():
  variables = vit.convert_timm(_state(_timm_tiny()), "tiny")
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {np.dtype("float32")}
  x = jnp.zeros((1, 64, 64, 3))  # (resampling the position embeddings stays float32)
  model = vit.create("tiny", num_classes=10, dtype=jnp.bfloat16)
  assert _matmul_dtypes(model, variables, x) == {"bfloat16"}
  assert jax.eval_shape(model.apply, variables, x).dtype == jnp.bfloat16
  assert _matmul_dtypes(vit.create("tiny"), variables, x) == {"float32"}


@pytest.mark.parametrize(
  "arch",
  [
    "vit_base_patch16_224",
    "vit_base_patch16_384",
    "vit_large_patch16_224",
    "vit_large_patch16_384",
  ],
)
def test_preprocessing_matches_timm_pretrained_cfgs(arch):
  """Every timm weight tag of the architecture: same input size and normalisation."""
  from timm.models import get_pretrained_cfg

  tags = [n for n in timm.list_pretrained(f"{arch}.*") if n.split(".")[0] == arch]
  assert tags
  for name in tags:
    cfg = get_pretrained_cfg(name)
    want = dict(mean=tuple(cfg.mean), std=tuple(cfg.std), input_size=cfg.input_size[-1])
    assert vit.preprocessing(name) == want, name


@pytest.mark.slow
@pytest.mark.parametrize(
  "name,size", [("vit_base_patch16_224", 224), ("vit_base_patch16_224", 384)]
)
def test_full_size_parity(name, size):
  torch.manual_seed(0)
  tmodel = timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
  variables = vit.convert_timm(_state(tmodel), name)
  x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x)).numpy()
  got = _apply(vit.create(name, num_classes=1000), variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


@pytest.mark.parametrize("size, hint", [(72, "64 or 80"), (8, "e.g. 16 (")])
def test_sizes_that_are_not_a_multiple_of_the_patch_are_refused(size, hint):
  """At 72 px an 8 px border would be dropped; below 16 px the model would see nothing."""
  model = vit.create("tiny")
  x = jnp.zeros((1, size, size, 3))
  with pytest.raises(ValueError, match=hint.replace("(", r"\(")):
    model.init(jax.random.PRNGKey(0), x)
