"""GM-DF's Meta-Domain-Embedding Optimizer (csdfd_jax/methods/gmdf.py, Eq. 13-15) in float64:
against a hand-written two-step reference on a linear least-squares model (closed form), against
reverse-over-reverse autodiff through the inner step and central differences on a nonlinear
model, the first/second-order gap shrinking with beta, the meta split and domain dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csdfd_jax.methods import gmdf


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _linear_problem(seed=0):
  """L_S = 1/2 ||A E + B O - y||^2 (meta-train), L_T = 1/2 ||C E + D O - z||^2 (meta-test)."""
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 4))
  c, d = rng.normal(size=(5, 3)), rng.normal(size=(5, 4))
  y, z = rng.normal(size=6), rng.normal(size=5)
  e, o = rng.normal(size=3), rng.normal(size=4)

  def loss_s(e_, o_):
    return 0.5 * jnp.sum((a @ e_ + b @ o_ - y) ** 2)

  def loss_t(e_, o_):
    return 0.5 * jnp.sum((c @ e_ + d @ o_ - z) ** 2)

  return (a, b, c, d, y, z, e, o), loss_s, loss_t


def test_both_orders_equal_the_closed_form_two_step_reference():
  (a, b, c, d, y, z, e, o), loss_s, loss_t = _linear_problem()
  beta = 0.05
  # Hand-written: the inner step, then the outer gradient with and without the path through it.
  g_e = a.T @ (a @ e + b @ o - y)
  e_new = e - beta * g_e
  r_t = c @ e_new + d @ o - z
  first = d.T @ r_t  # theta'_E held fixed
  second = first - beta * (b.T @ a) @ (c.T @ r_t)  # d theta'_E / d O = -beta A'B
  for order, want in ((1, first), (2, second)):
    out = gmdf.meta_gradients(loss_s, loss_t, jnp.asarray(e), jnp.asarray(o), beta, order)
    np.testing.assert_allclose(out.new_e, e_new, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(out.grad_o, want, rtol=1e-12, atol=1e-12)
    assert out.loss_test == pytest.approx(0.5 * float(r_t @ r_t), rel=1e-12)
    assert out.step_norm == pytest.approx(beta * np.linalg.norm(g_e), rel=1e-12)
  with pytest.raises(ValueError, match="order must be 1"):
    gmdf.meta_gradients(loss_s, loss_t, jnp.asarray(e), jnp.asarray(o), beta, 3)


def _nonlinear_problem(seed=1):
  """A tiny two-layer model: theta_E = a domain embedding and an expert matrix, theta_O = the
  trunk and the head; tanh units, logistic loss, separate meta-train / meta-test batches."""
  rng = np.random.default_rng(seed)
  xs, xt = rng.normal(size=(8, 5)), rng.normal(size=(6, 5))
  ys, yt = rng.integers(0, 2, 8).astype(float), rng.integers(0, 2, 6).astype(float)
  params_e = {
    "emb": jnp.asarray(rng.normal(size=4)),
    "expert": jnp.asarray(rng.normal(size=(4, 4))),
  }
  params_o = {
    "trunk": jnp.asarray(rng.normal(size=(5, 4))),
    "head": jnp.asarray(rng.normal(size=4)),
  }

  def logits(e, o, x):
    h = jnp.tanh(x @ o["trunk"] + e["emb"])
    h = h + jnp.tanh(h @ e["expert"]) * 0.5
    return h @ o["head"]

  def bce(z, y):
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

  def loss_s(e, o):
    return bce(logits(e, o, xs), ys)

  def loss_t(e, o):
    return bce(logits(e, o, xt), yt) + 0.1 * jnp.sum(o["head"] ** 2)

  return params_e, params_o, loss_s, loss_t


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_second_order_is_the_gradient_through_the_inner_step():
  params_e, params_o, loss_s, loss_t = _nonlinear_problem()
  beta = 0.1

  def composed(o):
    e_new = jax.tree.map(lambda p, g: p - beta * g, params_e, jax.grad(loss_s)(params_e, o))
    return loss_t(e_new, o)

  got = gmdf.meta_gradients(loss_s, loss_t, params_e, params_o, beta, order=2).grad_o
  want = jax.grad(composed)(params_o)  # reverse-over-reverse
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-12, atol=1e-14)
  # Central differences of the composed objective along a random direction.
  rng = np.random.default_rng(7)
  direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params_o)
  h = 1e-5

  def shifted(s):
    return composed(jax.tree.map(lambda p, u: p + s * u, params_o, direction))

  fd = (shifted(h) - shifted(-h)) / (2 * h)
  assert float(_flat(got) @ _flat(direction)) == pytest.approx(float(fd), rel=1e-7)


def test_first_order_holds_the_inner_step_fixed_and_its_gap_shrinks_with_beta():
  params_e, params_o, loss_s, loss_t = _nonlinear_problem()
  beta = 0.1
  out = gmdf.meta_gradients(loss_s, loss_t, params_e, params_o, beta, order=1)
  e_new = jax.tree.map(lambda p, g: p - beta * g, params_e, jax.grad(loss_s)(params_e, params_o))
  np.testing.assert_allclose(_flat(out.new_e), _flat(e_new), rtol=1e-14)
  want = jax.grad(loss_t, argnums=1)(e_new, params_o)
  np.testing.assert_allclose(_flat(out.grad_o), _flat(want), rtol=1e-13, atol=1e-15)
  gaps = []
  for b in (0.1, 0.01, 0.001):
    fo = gmdf.meta_gradients(loss_s, loss_t, params_e, params_o, b, 1).grad_o
    so = gmdf.meta_gradients(loss_s, loss_t, params_e, params_o, b, 2).grad_o
    gaps.append(np.linalg.norm(_flat(fo) - _flat(so)))
  # ||FO - SO|| = beta ||mixed term|| + O(beta^2): proportional to beta.
  assert gaps[0] > 0
  np.testing.assert_allclose(np.array(gaps[1:]) / np.array(gaps[:-1]), 0.1, rtol=0.05)


def test_meta_split_is_a_disjoint_cover_and_uniform():
  n, draws = 3, 300
  tests = []
  keys = jax.random.split(jax.random.key(0), draws)
  split = jax.jit(lambda k: gmdf.meta_split(k, n))
  for key in keys:
    test, train = split(key)
    assert sorted([int(test), *map(int, train)]) == list(range(n))
    tests.append(int(test))
  counts = np.bincount(tests, minlength=n)
  sigma = np.sqrt(draws * (1 / n) * (1 - 1 / n))
  assert np.all(np.abs(counts - draws / n) < 3 * sigma), counts
  with pytest.raises(ValueError, match="at least 2 domains"):
    gmdf.meta_split(jax.random.key(0), 1)


def test_domain_dropout_sends_ids_to_the_wildcard_at_the_rate():
  ids = jnp.tile(jnp.arange(1, 4), 4000)
  dropped = gmdf.domain_dropout(jax.random.key(1), ids, 0.2)
  wild = np.asarray(dropped) == 0
  assert abs(wild.mean() - 0.2) < 3 * np.sqrt(0.2 * 0.8 / ids.size)
  np.testing.assert_array_equal(np.asarray(dropped)[~wild], np.asarray(ids)[~wild])
  assert np.all(np.asarray(gmdf.domain_dropout(jax.random.key(1), ids, 0.0)) == np.asarray(ids))
  with pytest.raises(ValueError, match="wildcard probability"):
    gmdf.domain_dropout(jax.random.key(1), ids, 1.5)
