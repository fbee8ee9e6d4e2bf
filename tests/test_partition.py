"""The partitioned CS-DFD optimizer (Algorithm 1) on a real Flax model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from csdfd_jax.transforms import cgr, csdfd, path_labels, stack_streams, uvs


class TinyDetector(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="backbone")(x))
    x = nn.Dense(8, name="projection")(x)
    return nn.Dense(1, name="classifier")(x)[..., 0]


def _setup():
  model = TinyDetector()
  rng = np.random.default_rng(0)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  streams = []
  for shift in (1.0, -1.0):
    x = jnp.asarray(rng.normal(size=(8, 6)) + shift, jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=8), jnp.float32)
    streams.append((x, y))
  return model, params, streams


def _grads(model, params, streams):
  def loss(p, x, y):
    return optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, x), y).mean()

  return stack_streams(*[jax.grad(loss)(params, x, y) for x, y in streams])


def test_cgr_on_projection_and_uvs_on_the_rest():
  model, params, streams = _setup()
  grads = _grads(model, params, streams)
  tx = csdfd(optax.identity())
  updates, _ = tx.update(grads, tx.init(params), params)

  rest = {k: v for k, v in grads.items() if k != "projection"}
  expected_rest, _ = uvs().update(rest, uvs().init(None))
  expected_proj, _ = cgr().update(grads["projection"], cgr().init(None))
  for key in ("backbone", "classifier"):
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(updates[key][name], expected_rest[key][name], rtol=1e-6)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(updates["projection"][name], expected_proj[name], rtol=1e-6)


def test_labels_and_predicates():
  _, params, _ = _setup()
  labels = path_labels(params, lambda path: path[0] == "projection")
  assert labels["projection"]["kernel"] == "cgr" and labels["backbone"]["bias"] == "uvs"
  tx = csdfd(optax.sgd(0.1), projection=lambda path: path[0] == "projection")
  tx.init(params)
  with pytest.raises(ValueError, match="No parameter matches projection='phi'"):
    csdfd(optax.sgd(0.1), projection="phi").init(params)


def test_train_step_jits_once_and_lowers_both_stream_losses():
  model, params, streams = _setup()
  tx = csdfd(optax.sgd(0.05))
  opt_state = tx.init(params)

  def losses(p):
    out = []
    for x, y in streams:
      logits = model.apply({"params": p}, x)
      out.append(optax.sigmoid_binary_cross_entropy(logits, y).mean())
    return jnp.stack(out)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(_grads(model, p, streams), s, p)
    return optax.apply_updates(p, updates), s

  start = losses(params)
  for _ in range(30):
    params, opt_state = step(params, opt_state)
  end = losses(params)
  assert step._cache_size() == 1
  assert np.all(np.asarray(end) < np.asarray(start)), (start, end)


def test_projection_holding_every_parameter_leaves_uvs_partition_empty():
  params = {"projection": {"w": jnp.ones((3, 2))}}
  grads = stack_streams(
    {"projection": {"w": jnp.ones((3, 2))}}, {"projection": {"w": -jnp.ones((3, 2)) / 2}}
  )
  tx = csdfd(optax.identity())
  updates, _ = tx.update(grads, tx.init(params), params)
  expected, _ = cgr().update(grads, cgr().init(None))
  np.testing.assert_allclose(updates["projection"]["w"], expected["projection"]["w"])


def test_mean_reduction_reaches_both_halves():
  """reduction="mean" divides both UVS's g0 and CGR's update by K (same step size)."""
  model, params, streams = _setup()
  grads = _grads(model, params, streams)
  tx = csdfd(optax.identity(), reduction="mean")
  updates, _ = tx.update(grads, tx.init(params), params)
  rest = {k: v for k, v in grads.items() if k != "projection"}
  expected_rest, _ = uvs(reduction="mean").update(rest, uvs().init(None))
  expected_proj, _ = cgr(reduction="mean").update(grads["projection"], cgr().init(None))
  summed, _ = csdfd(optax.identity()).update(grads, tx.init(params), params)
  for key, expected in (("backbone", expected_rest["backbone"]), ("projection", expected_proj)):
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(updates[key][name], expected[name], rtol=1e-6)
      np.testing.assert_allclose(updates[key][name], summed[key][name] / 2, rtol=1e-5, atol=1e-7)


def test_bfloat16_gradients_stay_bfloat16_and_match_float32():
  model, params, streams = _setup()
  grads = _grads(model, params, streams)
  grads_bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
  tx = csdfd(optax.identity())
  updates, _ = jax.jit(tx.update)(grads_bf, tx.init(params), params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(updates))
  rounded = jax.tree.map(lambda x: x.astype(jnp.float32), grads_bf)  # same inputs in float32
  expected, _ = tx.update(rounded, tx.init(params), params)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
    want = np.asarray(want)
    np.testing.assert_allclose(
      np.asarray(got, np.float32), want, rtol=2**-7, atol=2**-7 * np.abs(want).max()
    )
