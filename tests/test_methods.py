"""The shared train step of every method: stacked per-stream gradients, BatchNorm rule,
no recompiles, the NaN guard, and the paper's conflict claim (Eq. 4-5) on a built problem."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from csdfd_jax import methods
from csdfd_jax.methods.step import create_train_state, make_step, make_train_step
from csdfd_jax.models.heads import Detector


class ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), strides=2)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return jnp.mean(nn.relu(x), axis=(1, 2))


class Flatten(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return x.reshape(x.shape[0], -1)


def method_config(c=0.5, tau=0.01):
  cfg = ml_collections.ConfigDict()
  cfg.reduction = "sum"
  cfg.uvs = dict(c=c, rescale="none")
  cfg.cgr = dict(tau=tau, projection="projection")
  cfg.sam = dict(rho=0.05, base="O+S", epsilon="joint")
  cfg.roga = dict(rho=0.1, alpha=0.01, mode="exact", robust=True, clean_weight=0.0, combine="mean")
  # the PIM after ConvBN's BatchNorm
  pim = dict(streams="o,s", r=0.1, alpha=0.5, sites="BatchNorm_0", delta="shared")
  cfg.gr = pim
  cfg.dualflat = dict(alpha=0.5, beta=0.2, r_sam=0.05)
  return ml_collections.ConfigDict(cfg)


def conv_detector():
  return Detector(ConvBN(), mean=(0.5,) * 3, std=(0.25,) * 3, projection_dims=(6,))


def random_batch(rng, streams=("o", "s"), b=4, size=8):
  out = {}
  for i, s in enumerate(streams):
    r = np.random.default_rng(rng + i)
    out[s] = {
      "image": r.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
      "label": np.array([0, 1] * (b // 2), np.int32),
    }
  return out


def init_state(model, tx, size=8):
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.uint8))
  return create_train_state(variables, tx, jax.random.PRNGKey(1))


def test_stacked_gradients_equal_separate_per_stream_passes():
  model = conv_detector()
  capture = {}

  def spy(updates, state, params=None):
    capture["g"] = updates
    return jax.tree.map(lambda u: u.sum(0), updates), state

  tx = optax.GradientTransformation(lambda p: optax.EmptyState(), spy)
  state = init_state(model, tx)
  batch = random_batch(0)
  new_state, logged = make_train_step(model, tx, ("o", "s"))(state, batch)

  # The logged norms (read from the stream Gram matrix) are those of the captured gradients.
  norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))  # noqa: E731
  summed = jax.tree.map(lambda g: np.asarray(g).sum(0), capture["g"])
  np.testing.assert_allclose(float(logged["grad_norm"]), norm(summed), rtol=1e-5)
  for k, s in enumerate(("o", "s")):
    per_stream = jax.tree.map(lambda g, k=k: np.asarray(g)[k], capture["g"])
    np.testing.assert_allclose(float(logged[f"grad_norm/{s}"]), norm(per_stream), rtol=1e-5)

  stats_per_stream = []
  for k, s in enumerate(("o", "s")):

    def loss(p, s=s):
      logits, mut = model.apply(
        {"params": p, "batch_stats": state.batch_stats},
        batch[s]["image"],
        train=True,
        mutable=["batch_stats"],
      )
      return optax.sigmoid_binary_cross_entropy(logits, batch[s]["label"]).mean(), mut

    (_, mut), g = jax.value_and_grad(loss, has_aux=True)(state.params)
    stats_per_stream.append(mut["batch_stats"])
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(capture["g"]), strict=True):
      np.testing.assert_allclose(b[k], a, rtol=1e-5, atol=1e-6)
  # BatchNorm rule: the new running statistics are the mean of the streams' proposals.
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *stats_per_stream)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.batch_stats), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


# GM-DF needs its CLIP detector: tests/test_gmdf_method.py steps it (and checks one compile).
@pytest.mark.parametrize("name", [m for m in methods.METHODS if m != "gmdf"])
def test_every_method_steps_finitely_and_compiles_once(name):
  model = conv_detector()
  config = method_config()
  method = methods.get(name, config)
  tx = optax.chain(method.transform, optax.sgd(0.1))
  state = init_state(model, tx)
  gradients = method.gradient_fn(model)  # the method's own (peers: perturbed passes, HVPs)
  step = jax.jit(make_step(gradients, tx, method.streams, diagnostics=method.diagnostics))
  before = state.params
  for i in range(3):
    state, m = step(state, random_batch(i, method.streams))
    assert int(m["finite"]) == 1
    assert all(np.isfinite(float(v)) for v in jax.tree.leaves(m))
  assert step._cache_size() == 1
  assert int(state.step) == 3
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), before, state.params)
  assert max(jax.tree.leaves(moved)) > 0
  if name in ("uvs", "csdfd"):
    assert "uvs_weight/0" in m and "stream_cosine" in m
  if name in ("cgr", "csdfd"):
    assert "cgr_correction_ratio" in m
  if name in ("sam", "roga"):
    assert "loss/perturbed/o" in m and "loss/perturbed/s" in m
  if name in ("gr", "dualflat"):
    assert m["pim/delta_norm/o"] == pytest.approx(0.1, rel=1e-4)


def test_sum_method_update_is_the_summed_gradient():
  model = conv_detector()
  o_s = methods.get("O+S", method_config())
  c0 = methods.get("uvs", method_config(c=0.0))
  batch = random_batch(3)
  outs = []
  for m in (o_s, c0):
    tx = optax.chain(m.transform, optax.sgd(0.1))
    state, _ = make_train_step(model, tx, m.streams)(init_state(model, tx), batch)
    outs.append(state.params)
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sum_streams_reduces_the_stream_axis(k, reduction):
  from csdfd_jax.methods.erm import sum_streams

  rng = np.random.default_rng(k)
  tree = {"a": rng.normal(size=(k, 3, 4)).astype(np.float32), "b": rng.normal(size=(k,))}
  out, _ = sum_streams(reduction).update(tree, optax.EmptyState())
  reduce = np.sum if reduction == "sum" else np.mean
  for key in tree:
    np.testing.assert_allclose(out[key], reduce(tree[key], axis=0), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="reduction"):
    sum_streams("max")


def test_one_reduction_setting_for_every_multi_stream_method():
  """config.reduction="mean" halves O+S's update exactly as it halves g0 in csdfd."""
  cfg = method_config()
  cfg.reduction = "mean"
  g = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  out, _ = methods.get("O+S", cfg).transform.update(g, optax.EmptyState())
  np.testing.assert_allclose(out["w"], g["w"].mean(0))


def test_non_finite_step_keeps_the_state():
  model = Detector(Flatten(), mean=(0.0,) * 3, std=(1 / 255,) * 3, projection_dims=(4,))
  method = methods.get("csdfd", method_config())
  tx = optax.chain(method.transform, optax.sgd(0.1))
  state = init_state(model, tx, size=2)
  batch = {
    s: {"image": np.full((2, 2, 2, 3), np.nan, np.float32), "label": np.array([0, 1])}
    for s in ("o", "s")
  }
  new, m = jax.jit(make_train_step(model, tx, method.streams))(state, batch)
  assert int(m["finite"]) == 0
  assert int(new.step) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), strict=True):
    np.testing.assert_array_equal(a, b)


def conflict_problem():
  """Two linearly separable streams whose gradients conflict at the start point: the
  original fakes sit along +x0 with a large loss, the SBI fakes along -x0 / +x1 with a
  small one, so the summed gradient increases the SBI stream's loss (Eq. 4-5)."""
  real = np.array([[0.0, -1.0, 0.0]] * 2, np.float32)
  fake_o = np.array([[4.0, 0.0, 0.0]] * 2, np.float32)
  fake_s = np.array([[-1.0, 0.6, 0.0]] * 2, np.float32)
  batch = {
    "o": {"image": np.concatenate([real, fake_o])[:, None, None], "label": np.array([0, 0, 1, 1])},
    "s": {"image": np.concatenate([real, fake_s])[:, None, None], "label": np.array([0, 0, 1, 1])},
  }
  return batch


def stream_losses(model, params, batch):
  out = {}
  for s in ("o", "s"):
    logits = model.apply({"params": params}, batch[s]["image"])
    out[s] = float(optax.sigmoid_binary_cross_entropy(logits, batch[s]["label"]).mean())
  return out


def test_csdfd_lowers_both_stream_losses_where_the_sum_raises_one():
  model = Detector(Flatten(), mean=(0.0,) * 3, std=(1 / 255,) * 3, projection_dims=(3,))
  batch = conflict_problem()
  variables = model.init(jax.random.PRNGKey(0), batch["o"]["image"])
  params = jax.tree.map(np.asarray, variables["params"])
  params["projection"]["dense0"]["kernel"] = np.eye(3, dtype=np.float32)
  params["classifier"]["kernel"] = np.array([[-0.5], [0.5], [0.0]], np.float32)
  params["classifier"]["bias"] = np.zeros(1, np.float32)
  start = stream_losses(model, params, batch)
  changes = {}
  for name in ("O+S", "csdfd"):
    method = methods.get(name, method_config(c=0.5))
    tx = optax.chain(method.transform, optax.sgd(0.05))
    state = create_train_state({"params": params}, tx, jax.random.PRNGKey(0))
    state, m = make_train_step(model, tx, method.streams)(state, batch)
    after = stream_losses(model, state.params, batch)
    changes[name] = {s: after[s] - start[s] for s in after}
    if name == "O+S":
      assert float(m["stream_cosine"]) < 0, "the built problem must have conflicting streams"
  assert changes["O+S"]["s"] > 0, changes  # the sum lets the SBI stream's loss rise
  assert changes["O+S"]["o"] < 0, changes
  assert changes["csdfd"]["o"] < 0 and changes["csdfd"]["s"] < 0, changes
