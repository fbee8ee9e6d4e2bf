"""Gradient regularisation with PIM and DualFlat (methods.gr) against independent references:
central finite differences and the exact double-backprop gradient of Eq. 5 on a smooth float64
model, the statistics shift of Eq. 6-7, the reductions (alpha = 0, r = 0, beta = 0, the SAM
corner vs ``optax.contrib.sam``), every family's default site, and Algorithm 1 written in
PyTorch with a forward hook."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from csdfd_jax import models
from csdfd_jax.methods import gr
from csdfd_jax.methods.step import bce, bce_loss, per_stream

SITE = "backbone/stage0"


def _flat(tree):
  return ravel_pytree(tree)[0]


class Trunk(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = Stage(6, name="stage0")(x)
    x = Stage(5, name="stage1")(x)
    return jnp.mean(x, axis=(1, 2))


class Stage(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Conv(self.width, (3, 3), param_dtype=x.dtype, dtype=x.dtype)(x))


class Smooth(nn.Module):
  """A detector-shaped smooth model: images [B, H, W, 3] -> logits [B], backbone named so."""

  @nn.compact
  def __call__(self, x, train=False):
    f = Trunk(name="backbone")(x)
    return nn.Dense(1, param_dtype=x.dtype, dtype=x.dtype)(f)[..., 0]


def smooth_problem(seed=0, b=6, size=6):
  rng = np.random.default_rng(seed)
  stream = {
    "image": jnp.asarray(rng.normal(size=(b, size, size, 3))),
    "label": jnp.asarray(np.arange(b) % 2, jnp.int32),
  }
  model = Smooth()
  params = model.init(jax.random.key(seed), stream["image"])["params"]
  return model, params, stream


def _zero(model, params, stream, mode="shared"):
  outputs = gr.module_outputs(model, {"params": params}, stream["image"])
  sites = gr.resolve_sites(("stage0",), outputs)
  return gr.zero_delta(outputs, sites, stream["image"].shape[0], mode)


def _update(model, params, stream, **options):
  zero = _zero(model, params, stream)
  return gr.stream_update(
    gr.pim_loss(model), params, {}, stream, jax.random.key(0), zero, **options
  )


def test_the_feature_statistics_move_by_exactly_delta():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    f = jnp.asarray(rng.normal(size=(3, 5, 4, 6)) * 2 + 1)
    d_mu, d_sigma = (jnp.asarray(rng.normal(size=6)) * 0.3 for _ in range(2))
    g = gr.perturb(f, d_mu, d_sigma)
    np.testing.assert_allclose(
      g.mean((1, 2)) - f.mean((1, 2)), np.broadcast_to(d_mu, (3, 6)), atol=1e-12
    )
    # sigma = sqrt(var + eps), so the plain std of f' is (sigma + d_sigma) sqrt(var/(var + eps)):
    # it moves by d_sigma times that factor (1 - 1e-7 here), exactly.
    var = f.var((1, 2))
    shrink = jnp.sqrt(var / (var + gr.EPS))
    np.testing.assert_allclose(
      jnp.sqrt(g.var((1, 2))) - jnp.sqrt(var), d_sigma * shrink, rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(gr.perturb(f, 0 * d_mu, 0 * d_sigma), f, atol=1e-14)
    per_sample = jnp.asarray(rng.normal(size=(3, 6)))
    moved = gr.perturb(f, per_sample, 0 * per_sample)
    np.testing.assert_allclose(moved.mean((1, 2)) - f.mean((1, 2)), per_sample, atol=1e-12)


def test_delta_has_norm_r_and_is_the_finite_difference_gradient_direction():
  with jax.enable_x64(True):
    model, params, stream = smooth_problem()
    loss_fn = gr.pim_loss(model)
    zero = _zero(model, params, stream)
    rng = jax.random.key(0)
    loss_of = lambda d: loss_fn(params, {}, stream, rng, d)[0]  # noqa: E731
    g_delta = jax.grad(loss_of)(zero)
    flat, unravel = ravel_pytree(zero)
    h = 1e-5
    fd = np.array(
      [
        (loss_of(unravel(flat + h * e)) - loss_of(unravel(flat - h * e))) / (2 * h)
        for e in np.eye(flat.size)
      ]
    )
    np.testing.assert_allclose(_flat(g_delta), fd, rtol=1e-6, atol=1e-10)
    _, _, _, metrics = _update(model, params, stream, r=0.1, alpha=1.0)
    assert float(metrics["delta_norm"]) == pytest.approx(0.1, rel=1e-10)
    assert float(metrics["sensitivity"]) == pytest.approx(float(np.linalg.norm(fd)), rel=1e-6)


def test_the_update_is_the_double_backprop_gradient_of_eq5_up_to_r_squared():
  """(1 - alpha) g1 + alpha g2 vs grad_theta [L + alpha r ||grad_Delta L||] (Eq. 5 with
  lambda = alpha r): the difference shrinks as r^2."""
  with jax.enable_x64(True):
    model, params, stream = smooth_problem(seed=1)
    loss_fn = gr.pim_loss(model)
    zero = _zero(model, params, stream)
    rng = jax.random.key(0)
    alpha = 0.5

    def eq5(theta, r):
      g_delta = jax.grad(lambda d: loss_fn(theta, {}, stream, rng, d)[0])(zero)
      return loss_fn(theta, {}, stream, rng, zero)[0] + alpha * r * jnp.linalg.norm(_flat(g_delta))

    ratios = []
    for r in (1e-1, 1e-2, 1e-3):
      u, _, _, _ = _update(model, params, stream, r=r, alpha=alpha)
      ref = jax.grad(eq5)(params, r)
      ratios.append(float(jnp.linalg.norm(_flat(u) - _flat(ref))) / r**2)
    assert ratios[0] > 0 and max(ratios) / min(ratios) < 1.2, ratios
    # and the regulariser is not negligible at these r: the update is not the ERM gradient
    erm = jax.grad(lambda t: loss_fn(t, {}, stream, rng, None)[0])(params)
    u, _, _, _ = _update(model, params, stream, r=1e-2, alpha=alpha)
    assert float(jnp.linalg.norm(_flat(u) - _flat(erm))) > 10 * ratios[1] * 1e-4


def test_alpha_zero_is_erm_bitwise_and_r_zero_is_erm():
  model, params, stream = smooth_problem(seed=2)
  loss_fn = bce_loss(model)
  rng = jax.random.key(0)
  erm = jax.grad(lambda t: loss_fn(t, {}, stream, rng)[0])(params)
  u, _, _, _ = _update(model, params, stream, r=0.1, alpha=0.0)
  pairs = zip(jax.tree.leaves(u), jax.tree.leaves(erm), strict=True)
  assert all(np.array_equal(a, b) for a, b in pairs)
  u, _, _, _ = _update(model, params, stream, r=0.0, alpha=1.0)
  np.testing.assert_allclose(_flat(u), _flat(erm), rtol=1e-5, atol=1e-7)


def test_dualflat_weights_and_corners():
  with jax.enable_x64(True):
    model, params, stream = smooth_problem(seed=3)
    kw = dict(r=0.1, r_sam=0.05)
    g1, _, _, _ = _update(model, params, stream, alpha=0.0, **kw)
    g2, _, _, _ = _update(model, params, stream, alpha=1.0, **kw)
    g3, _, _, _ = _update(model, params, stream, alpha=0.0, beta=1.0, **kw)
    alpha, beta = 0.3, 0.5
    u, _, _, _ = _update(model, params, stream, alpha=alpha, beta=beta, **kw)
    want = (1 - alpha - beta) * _flat(g1) + alpha * _flat(g2) + beta * _flat(g3)
    np.testing.assert_allclose(_flat(u), want, rtol=1e-12)
    gr_only, _, _, _ = _update(model, params, stream, alpha=alpha, beta=0.0, **kw)
    pim_part = (1 - alpha) * _flat(g1) + alpha * _flat(g2)
    np.testing.assert_allclose(_flat(gr_only), pim_part, rtol=1e-12)  # beta = 0 is GR

  # alpha = 0, beta = 1 is SAM with rho = r' (optax.contrib.sam, one SGD step, float32)
  model, params, stream = smooth_problem(seed=3)
  rng = jax.random.key(0)
  g3, _, _, _ = _update(model, params, stream, alpha=0.0, beta=1.0, r=0.1, r_sam=0.05)
  ours = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, g3))
  grad_fn = jax.grad(lambda p, _: bce_loss(model)(p, {}, stream, rng)[0])
  opt = optax.contrib.sam(
    optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True
  )
  updates, _ = opt.update(grad_fn(params, 0), opt.init(params), params, grad_fn=grad_fn)
  np.testing.assert_allclose(
    _flat(ours), _flat(optax.apply_updates(params, updates)), rtol=1e-6, atol=1e-7
  )


FAMILIES = [("resnet", "tiny", 32), ("convnext", "tiny", 32), ("efficientnet", "tiny", 32)]
FAMILIES += [("xception", "tiny", 64), ("vit", "tiny", 64)]


# The ConvNeXt, EfficientNet and Xception cases (about a minute together) run under -m slow.
@pytest.mark.parametrize(
  "family,variant,size",
  [f if f[0] in ("resnet", "vit") else pytest.param(*f, marks=pytest.mark.slow) for f in FAMILIES],
  ids=[f[0] for f in FAMILIES],
)
def test_every_familys_default_site_exists_and_fires_once(family, variant, size):
  from csdfd_jax.models.heads import Detector

  backbone = models.family(family).create(variant, num_classes=0)
  model = Detector(backbone, (0.5,) * 3, (0.25,) * 3, projection_dims=(8,))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, size, size, 3)), jnp.uint8)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(images)
  outputs = gr.module_outputs(model, variables, images)
  sites = gr.resolve_sites(gr.DEFAULT_SITES[family], outputs)
  assert len(sites) == 1 and sites[0].startswith("backbone/")
  zero = gr.zero_delta(outputs, sites, 2, "shared")
  stream = {"image": images, "label": jnp.array([0, 1])}
  loss_fn = gr.pim_loss(model)
  stats = variables.get("batch_stats", {})
  rng = jax.random.key(1)
  # pim_loss raises unless every site fired exactly once; at Delta = 0 the loss is unchanged.
  with_pim = jax.jit(loss_fn)(variables["params"], stats, stream, rng, zero)[0]
  plain = jax.jit(bce_loss(model))(variables["params"], stats, stream, rng)[0]
  assert float(with_pim) == pytest.approx(float(plain), rel=1e-5)
  moved = jax.tree.map(lambda x: x + 0.5, zero)
  assert float(jax.jit(loss_fn)(variables["params"], stats, stream, rng, moved)[0]) != float(plain)


def test_an_unknown_site_is_a_clear_error():
  model, params, stream = smooth_problem()
  outputs = gr.module_outputs(model, {"params": params}, stream["image"])
  with pytest.raises(ValueError, match="'stage9' is no module of this backbone.*stage0, stage1"):
    gr.resolve_sites(("stage9",), outputs)
  with pytest.raises(ValueError, match="no default PIM site for model family 'mlp'"):
    gr.default_sites("mlp")


@pytest.mark.slow  # about 40 s of compiles
def test_running_statistics_come_from_the_clean_pass_and_inference_is_untouched():
  from csdfd_jax.models import resnet
  from csdfd_jax.models.heads import Detector

  model = Detector(resnet.create("tiny", num_classes=0), (0.5,) * 3, (0.25,) * 3, (8,))
  rng = np.random.default_rng(4)
  batch = {
    s: {
      "image": jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3)), jnp.uint8),
      "label": jnp.array([0, 1, 0, 1]),
    }
    for s in ("o", "s")
  }
  variables = model.init(jax.random.key(0), batch["o"]["image"])
  params, stats = variables["params"], variables["batch_stats"]
  fn = gr.pim_gradients(model, ("o", "s"), gr.DEFAULT_SITES["resnet"], r=5.0, alpha=1.0)
  g = jax.jit(fn)(params, stats, batch, jax.random.key(2))
  clean = jax.jit(per_stream(bce(model), ("o", "s")))(params, stats, batch, jax.random.key(2))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    g.model_state,
    clean.model_state,
  )
  assert not np.allclose(_flat(g.grads), _flat(clean.grads), rtol=1e-2)  # the PIM acted
  for s in ("o", "s"):
    assert float(g.metrics[f"pim/delta_norm/{s}"]) == pytest.approx(5.0, rel=1e-5)
    assert np.isfinite(float(g.metrics[f"pim/loss_gap/{s}"]))
  # No interceptor at inference: the plain model's function, bitwise.
  out = model.apply(variables, batch["o"]["image"])
  again = model.apply(variables, batch["o"]["image"])
  assert np.array_equal(out, again)
  assert jax.tree.structure(g.grads) == jax.tree.structure(jax.tree.map(lambda x: x[None], params))


def test_one_update_agrees_with_algorithm_1_in_torch():
  """Algorithm 1 verbatim in PyTorch: a forward hook on the site adds the shared Delta to the
  instance statistics (no detaching), g1 and grad_Delta from pass 1, Delta by Eq. 9, g2 from
  pass 2, (1 - alpha) g1 + alpha g2. Float64 (a float32 reference is not one on a ReLU net:
  see tests/test_roga.py)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from backbone_parity import float64_tiny_resnet, torch_input

  from csdfd_jax.models import resnet

  tmodel, model, to_flax = float64_tiny_resnet()
  sd = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
  f64 = jnp.float64
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
  labels = np.arange(6) % 2
  r, alpha = 0.5, 0.6
  with jax.enable_x64(True):
    params, stats = jax.tree.map(lambda x: jnp.asarray(x, f64), to_flax(sd))
    batch = {"o": {"image": jnp.asarray(images), "label": jnp.asarray(labels)}}
    fn = gr.pim_gradients(model, ("o",), ("layer1_-1",), r=r, alpha=alpha)
    g = jax.jit(fn)(params, stats, batch, jax.random.key(0))
    got = np.asarray(_flat(jax.tree.map(lambda x: x[0], g.grads)), np.float64)

  names = [n for n, _ in tmodel.named_parameters()]
  theta = [p.detach().clone().requires_grad_(True) for _, p in tmodel.named_parameters()]
  buffers = {n: b.clone() for n, b in tmodel.named_buffers()}
  x = torch_input(images)
  y = torch.from_numpy(labels.astype(np.float64))
  channels = resnet.VARIANTS["tiny"]["channels"][0]

  def loss(d_mu, d_sigma):
    def hook(module, inputs, f):
      mu = f.mean((2, 3), keepdim=True)
      sigma = torch.sqrt(f.var((2, 3), keepdim=True, unbiased=False) + gr.EPS)
      return (f - mu) / sigma * (sigma + d_sigma.view(1, -1, 1, 1)) + mu + d_mu.view(1, -1, 1, 1)

    site = tmodel.layer1[-1]
    handle = site.register_forward_hook(hook)
    try:
      state = dict(zip(names, theta, strict=True)) | {k: v.clone() for k, v in buffers.items()}
      logits = torch.func.functional_call(tmodel, state, (x,))[:, 0]
    finally:
      handle.remove()
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)

  d_mu = torch.zeros(channels, dtype=torch.float64, requires_grad=True)
  d_sigma = torch.zeros(channels, dtype=torch.float64, requires_grad=True)
  grads = torch.autograd.grad(loss(d_mu, d_sigma), [*theta, d_mu, d_sigma])
  g1, (gm, gs) = grads[:-2], grads[-2:]
  norm = torch.sqrt((gm**2).sum() + (gs**2).sum())
  g2 = torch.autograd.grad(loss(r * gm / norm, r * gs / norm), theta)
  want = [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2, strict=True)]
  grad_sd = dict(sd) | {n: w.numpy() for n, w in zip(names, want, strict=True)}
  flat_want = np.asarray(_flat(to_flax(grad_sd)[0]), np.float64)
  err = float(np.linalg.norm(got - flat_want) / np.linalg.norm(flat_want))
  assert err < 1e-5, err
  assert float(g.metrics["pim/delta_norm/o"]) == pytest.approx(r, rel=1e-9)


# DualFlat's step is GR's plus a SAM pass (its gradient is tested above); its loop run, another
# 75 s of compiles here, is under -m slow.
@pytest.mark.parametrize(
  "method, streams", [("gr", "o,s"), pytest.param("dualflat", "s", marks=pytest.mark.slow)]
)
def test_trains_through_the_loop_and_eval_and_predict_read_the_checkpoint(
  peer_records, tmp_path, method, streams
):
  from peer_e2e import train_eval_predict
  from test_train import tiny_config

  from csdfd_jax import train_lib

  config = tiny_config(peer_records, method, steps=2)
  config.train.checkpoint_every = 2
  config.gr.streams = streams
  config.gr.alpha = 1.0  # gr; dualflat reads config.dualflat (alpha 0.4, beta 0.1)
  rows, predictor = train_eval_predict(config, peer_records, tmp_path)
  for r in rows:
    for s in streams.split(","):
      assert np.isfinite(r[f"loss/{s}"]) and np.isfinite(r[f"pim/loss_gap/{s}"])
      assert r[f"pim/delta_norm/{s}"] == pytest.approx(0.1, rel=1e-4)
      if method == "dualflat":
        assert np.isfinite(r[f"pim/loss_sam_gap/{s}"]) and -1 <= r[f"pim/cos_g1_g2/{s}"] <= 1
  # The checkpoint holds the plain detector's parameter tree (no PIM parameters).
  model = train_lib.build_model(config)
  plain = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
  )
  restored = predictor.variables["params"]
  assert jax.tree.structure(restored) == jax.tree.structure(plain["params"])


def test_misconfigurations_are_clear_errors():
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from configs import gr as gr_configs
  from csdfd_jax import methods

  def config(**kw):
    c = gr_configs.get_config("demo")
    for k, v in kw.items():
      section, key = k.split(".")
      c[section][key] = v
    return c

  cases = [
    ("gr", {"gr.delta": "each"}, "config.gr.delta='each'; valid: shared, per_sample"),
    ("dualflat", {"dualflat.beta": 0.0}, "use method 'gr'"),
    ("dualflat", {"dualflat.alpha": 0.8, "dualflat.beta": 0.5}, "alpha \\+ beta = 1.3 > 1"),
    ("dualflat", {"dualflat.r_sam": -0.1}, "config.dualflat.r_sam=-0.1 must be >= 0"),
    ("gr", {"gr.r": -1.0}, "config.gr.r=-1.0 must be >= 0"),
    ("gr", {"gr.alpha": 1.5}, "alpha = 1.5 > 1"),
    ("gr", {"gr.streams": ""}, "config.gr.streams is empty"),
  ]
  for method, kw, message in cases:
    with pytest.raises(ValueError, match=message):
      methods.get(method, config(**kw))
