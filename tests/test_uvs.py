"""UVS against independent float64 references of the primal (Eq. 10) and dual (Eq. 15)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cagrad_reference import dual_value, primal_value
from hypothesis import given, settings
from hypothesis import strategies as hs

from csdfd_jax.transforms import combine, solve_dual, stack_streams, uvs, uvs_diagnostics
from csdfd_jax.transforms.uvs import STATIC_ARGS, reduction_vector


def _run(g: np.ndarray, c: float = 0.5, **kw) -> np.ndarray:
  """Applies uvs to stacked gradients g: [K, P] split into two leaves of a tree."""
  k, p = g.shape
  cut = p // 2
  tree = {"a": jnp.asarray(g[:, :cut]), "b": {"c": jnp.asarray(g[:, cut:])}}
  tx = uvs(c, num_streams=k, **kw)
  v, _ = jax.jit(tx.update)(tree, tx.init(None))
  return np.concatenate([np.asarray(v["a"], np.float64), np.asarray(v["b"]["c"], np.float64)])


def _adversarial(kind: str, k: int, p: int, rng) -> np.ndarray:
  g = rng.normal(size=(k, p)) * np.exp(rng.uniform(-2, 2, size=(k, 1)))
  if kind == "nearly_opposite":
    g[1] = -g[0] + 1e-3 * rng.normal(size=p)
  elif kind == "identical":
    g[:] = g[0]
  elif kind == "one_zero":
    g[0] = 0.0
  elif kind == "huge":
    g *= 1e30
  elif kind == "tiny":
    g *= 1e-30
  return g


def _check(g, v, c, reduction="sum", tol=1e-5):
  a = reduction_vector(len(g), reduction)
  g0 = a @ g
  assert np.all(np.isfinite(v))
  n0 = np.linalg.norm(g0)
  assert np.linalg.norm(v - g0) <= c * n0 * (1 + tol) + 1e-300
  scale = n0 * np.max(np.linalg.norm(g, axis=1))
  ref = primal_value(g, a, c)
  got = np.min(g @ v)
  assert abs(got - ref) <= tol * scale, (got, ref, scale)
  assert abs(dual_value(g, a, c) - ref) <= tol * scale  # the references agree (duality)


KINDS = ["random", "nearly_opposite", "identical", "one_zero", "huge", "tiny"]


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_reference(k, kind):
  rng = np.random.default_rng(100 * k + KINDS.index(kind))
  c = (0.2, 0.5, 0.9)[(k + KINDS.index(kind)) % 3]
  with jax.enable_x64(True):
    g = _adversarial(kind, k, int(rng.integers(3, 24)), rng)
    _check(g, _run(g, c), c)


@pytest.mark.parametrize("k", [2, 4])
def test_mean_reduction_is_sum_divided_by_k(k):
  rng = np.random.default_rng(k)
  with jax.enable_x64(True):
    g = rng.normal(size=(k, 12))
    v_mean = _run(g, 0.5, reduction="mean")
    _check(g, v_mean, 0.5, reduction="mean")
    np.testing.assert_allclose(v_mean, _run(g, 0.5) / k, rtol=1e-9, atol=1e-12)


def test_float32_close_to_reference_on_random_inputs():
  rng = np.random.default_rng(7)
  for k in (2, 3, 5):
    g = rng.normal(size=(k, 60))
    _check(g, _run(g.astype(np.float32)), 0.5, tol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_never_nan_and_stays_in_ball(kind):
  rng = np.random.default_rng(3)
  for k in (2, 3):
    g = _adversarial(kind, k, 40, rng)
    v = _run(g.astype(np.float32))
    assert np.all(np.isfinite(v))
    g0 = g.astype(np.float32).astype(np.float64).sum(0)
    assert np.linalg.norm(v - g0) <= 0.5 * np.linalg.norm(g0) * (1 + 1e-4)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_c_zero_returns_g0(reduction):
  g = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)
  a = reduction_vector(3, reduction)
  np.testing.assert_allclose(_run(g, 0.0, reduction=reduction), a @ g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("rescale", "factor"), [("1/(1+c)", 1 / 1.5), ("1/(1+c^2)", 1 / 1.25)])
def test_rescale_variants(rescale, factor):
  g = np.random.default_rng(1).normal(size=(2, 10))
  with jax.enable_x64(True):
    np.testing.assert_allclose(_run(g, rescale=rescale), factor * _run(g), rtol=1e-12)


def test_all_zero_gradients_give_zero_update():
  assert np.all(_run(np.zeros((2, 8), np.float32)) == 0)


def test_pgd_alone_converges_and_warm_start_keeps_the_optimum():
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    g = rng.normal(size=(4, 30))
    gram = jnp.asarray(g @ g.T)
    solve = jax.jit(solve_dual, static_argnames=("c", "max_exact_streams", "num_iters"))
    exact = solve(gram, 0.5)
    pgd = solve(gram, 0.5, max_exact_streams=0, num_iters=2000)
    scale = np.linalg.norm(g.sum(0)) * np.max(np.linalg.norm(g, axis=1))
    assert float(exact.value - pgd.value) <= 1e-3 * scale
    warm = solve(gram, 0.5, max_exact_streams=0, num_iters=5, init_weights=exact.weights)
    assert float(exact.value - warm.value) <= 1e-6 * scale


MAX_P = 12


@functools.cache
def _traced_c_update(k: int):
  """uvs with a traced c on one [K, MAX_P] leaf: one compile per K for the property test
  (a static c and a shape per example would compile once per example)."""

  def run(g, c):
    tx = optax.inject_hyperparams(uvs, static_args=STATIC_ARGS)(c=c, num_streams=k)
    v, _ = tx.update({"w": g}, tx.init({"w": g[0]}))
    return v["w"]

  return jax.jit(run)


def test_uvs_never_worse_than_g0_for_the_worst_stream_property():
  @settings(max_examples=30, deadline=None)
  @given(
    k=hs.integers(2, 5),
    p=hs.integers(1, MAX_P),
    log_scale=hs.floats(-30, 30),
    seed=hs.integers(0, 2**31 - 1),
    c=hs.floats(0.0, 2.0),
  )
  def prop(k, p, log_scale, seed, c):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, p)) * 10.0**log_scale
    with jax.enable_x64(True):
      padded = np.zeros((k, MAX_P))  # zero coordinates change no norm or inner product
      padded[:, :p] = g
      v = np.asarray(_traced_c_update(k)(padded, c))
    assert np.all(v[p:] == 0)
    v = v[:p]
    g0 = g.sum(0)
    assert np.all(np.isfinite(v))
    rounding = 1e-14 * np.sum(np.linalg.norm(g, axis=1))  # float64 rounding of the sums
    assert np.linalg.norm(v - g0) <= c * np.linalg.norm(g0) * (1 + 1e-6) + rounding
    scale = np.linalg.norm(g0) * np.max(np.linalg.norm(g, axis=1))
    assert np.min(g @ v) >= np.min(g @ g0) - 1e-9 * scale

  prop()


def test_bfloat16_updates_stay_bfloat16_and_match_float64_reference():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(2, 32))
  g[1] = -0.7 * g[0] + 0.5 * g[1]  # conflicting streams: UVS moves v away from g0
  g_bf = jnp.asarray(g, jnp.bfloat16)
  v = _run(g_bf)
  assert _run_dtype(g_bf) == jnp.bfloat16
  exact = np.asarray(g_bf, np.float64)  # the reference sees the same rounded inputs
  with jax.enable_x64(True):
    ref = _run(exact)
  # bf16 keeps 8 bits: the update is rounded once on the way out.
  np.testing.assert_allclose(v, ref, rtol=2**-7, atol=2**-7 * np.abs(ref).max())
  g0 = exact.sum(0)
  scale = np.linalg.norm(g0) * np.max(np.linalg.norm(exact, axis=1))
  target = primal_value(exact, np.ones(2), 0.5)
  assert abs(np.min(exact @ ref) - target) <= 1e-9 * scale  # ref is the optimum
  assert abs(np.min(exact @ v) - target) <= 1e-2 * scale


def _run_dtype(g) -> jnp.dtype:
  tx = uvs(num_streams=len(g))
  v, _ = tx.update({"w": g}, tx.init(None))
  return v["w"].dtype


@pytest.mark.parametrize("k", [2, 3])
def test_jits_once_across_steps(k):
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
  tx = optax.chain(uvs(num_streams=k), optax.sgd(1e-2, momentum=0.9))
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  for _ in range(4):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(k, *x.shape)), x.dtype), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert update._cache_size() == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_stream_count_mismatch_is_a_clear_error():
  tx = uvs(num_streams=2)
  with pytest.raises(ValueError, match="num_streams=3"):
    tx.update({"w": jnp.zeros((3, 4))}, tx.init(None))
  with pytest.raises(ValueError, match="reduction"):
    uvs(reduction="avg")
  with pytest.raises(ValueError, match="rescale"):
    uvs(rescale="2")


def test_diagnostics_from_state_match_direct_computation():
  rng = np.random.default_rng(4)
  g = rng.normal(size=(2, 50)).astype(np.float32)
  g[1] = -0.8 * g[0] + 0.3 * g[1]  # strongly conflicting streams
  tx = uvs()
  v, state = tx.update({"w": jnp.asarray(g)}, tx.init(None))
  d = uvs_diagnostics(state.gram, state.weights)
  cos = g[0] @ g[1] / np.linalg.norm(g[0]) / np.linalg.norm(g[1])
  np.testing.assert_allclose(d["cosine"][0, 1], cos, rtol=1e-5)
  rates = g.astype(np.float64) @ np.asarray(v["w"], np.float64)
  # Diagnostics are in units of the scaled Gram: compare directions of the rates.
  after = np.asarray(d["rate_after"], np.float64)
  np.testing.assert_allclose(after / np.abs(after).max(), rates / np.abs(rates).max(), atol=1e-4)
  assert np.min(d["rate_before"]) < 0 < np.min(d["rate_after"])
  stacked = stack_streams({"w": jnp.asarray(g[0])}, {"w": jnp.asarray(g[1])})
  np.testing.assert_allclose(stacked["w"], g)


@pytest.mark.parametrize("k", [10, 12])
@pytest.mark.parametrize("kind", ["random", "nearly_opposite"])
def test_more_streams_than_the_face_enumeration_reach_the_optimum(k, kind):
  """K > max_exact_streams: FISTA then active-set polish, on the first (cold) step."""
  rng = np.random.default_rng(k + KINDS.index(kind))
  with jax.enable_x64(True):
    g = _adversarial(kind, k, 16, rng)
    v = _run(g)
  g0 = g.sum(0)
  assert np.linalg.norm(v - g0) <= 0.5 * np.linalg.norm(g0) * (1 + 1e-9)
  scale = np.linalg.norm(g0) * np.max(np.linalg.norm(g, axis=1))
  ref = primal_value(g, np.ones(k), 0.5)
  assert abs(np.min(g @ v) - ref) <= 1e-5 * scale, (np.min(g @ v), ref, scale)


def _nearly_opposite(k: int, one_plus_cos: float, rng) -> np.ndarray:
  """g_1 = u + e/2, g_2 = -u + e/2 with 1 + cos(g_1, g_2) = one_plus_cos and e at 70
  degrees from u, so that g_2 . g0 < 0: UVS has to move far from g0; more streams random."""
  p = 32
  u = rng.normal(size=p)
  e = rng.normal(size=p)
  e -= (e @ u) / (u @ u) * u
  e = 0.3 * u / np.linalg.norm(u) + np.sqrt(1 - 0.09) * e / np.linalg.norm(e)
  e *= np.sqrt(2 * one_plus_cos / (1 - 0.09)) * np.linalg.norm(u)
  others = [0.3 * rng.normal(size=p) for _ in range(k - 2)]
  return np.stack([u + e / 2, -u + e / 2, *others])


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("one_plus_cos", [1e-5, 1e-6])
def test_float32_nearly_opposite_streams_match_float64_reference(k, one_plus_cos):
  """The Gram's entries cancel here (||g0||^2 ~ 1e-6 of them in float32): UVS must
  read <g_j, g0> and ||g_w|| off the vectors, not return g0 or a poor direction."""
  g = _nearly_opposite(k, one_plus_cos, np.random.default_rng(k)).astype(np.float32)
  v = _run(g)
  exact = g.astype(np.float64)
  g0 = exact.sum(0)
  scale = np.linalg.norm(g0) * np.max(np.linalg.norm(exact, axis=1))
  ref = primal_value(exact, np.ones(k), 0.5)
  assert np.min(exact @ g0) < ref - 0.1 * scale  # g0 itself is far from the optimum
  assert np.linalg.norm(v - g0) <= 0.5 * np.linalg.norm(g0) * (1 + 1e-4)
  assert abs(np.min(exact @ v) - ref) <= 1e-4 * scale, (np.min(exact @ v), ref, scale)


def test_c_can_be_scheduled_with_inject_hyperparams_under_jit():
  g = np.random.default_rng(8).normal(size=(2, 20)).astype(np.float32)
  g[1] = -0.8 * g[0] + 0.4 * g[1]
  tree = {"w": jnp.asarray(g)}
  values = [0.0, 0.25, 0.5, 0.0]
  tx = optax.inject_hyperparams(uvs, static_args=STATIC_ARGS)(c=lambda n: jnp.asarray(values)[n])
  state = tx.init({"w": jnp.zeros(20)})
  update = jax.jit(tx.update)
  for c in values:
    v, state = update(tree, state)
    fixed = uvs(c)
    expected, _ = fixed.update(tree, fixed.init(None))
    np.testing.assert_allclose(v["w"], expected["w"], rtol=1e-5, atol=1e-6)
    if c == 0:  # exactly g0, as for a static c = 0
      np.testing.assert_array_equal(v["w"], combine(tree, jnp.ones(2))["w"])
  assert update._cache_size() == 1
  with pytest.raises(ValueError, match="static_args"):
    plain = optax.inject_hyperparams(uvs)(c=0.5)
    jax.jit(plain.update)(tree, plain.init({"w": jnp.zeros(20)}))


@pytest.mark.parametrize("k", [2, 3])
def test_gradient_through_the_update_matches_finite_differences(k):
  """d/dg of a scalar function of v (meta-learning, implicit layers): finite and equal
  to central differences at a generic point with conflicting streams."""
  rng = np.random.default_rng(9 + k)
  g = rng.normal(size=(k, 12))
  g[1] = -0.6 * g[0] + 0.6 * g[1]
  probe, direction = rng.normal(size=12), rng.normal(size=(k, 12))

  def f(x):
    tx = uvs(0.5, num_streams=k)
    v, _ = tx.update({"w": x}, tx.init(None))
    return jnp.sum(v["w"] * probe)

  value_and_grad = jax.jit(jax.value_and_grad(f))
  with jax.enable_x64(True):
    h = 1e-6
    grad = np.asarray(value_and_grad(jnp.asarray(g))[1])
    ends = [value_and_grad(jnp.asarray(g + t * direction))[0] for t in (h, -h)]
    grad32 = np.asarray(value_and_grad(jnp.asarray(g, jnp.float32))[1])  # float32 solver
  assert np.all(np.isfinite(grad)) and np.all(np.isfinite(grad32))
  fd = float(ends[0] - ends[1]) / (2 * h)
  np.testing.assert_allclose(np.sum(grad * direction), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kind", ["duplicate", "zero"])
def test_gradient_through_the_update_is_finite_where_faces_are_singular(k, kind):
  """Duplicate streams (or all-zero gradients) make a face's bordered KKT matrix singular."""
  base = np.random.default_rng(k).normal(size=12)
  g = np.stack([base] * k) if kind == "duplicate" else np.zeros((k, 12))

  def f(x):
    tx = uvs(0.5, num_streams=k)
    v, _ = tx.update({"w": x}, tx.init(None))
    return jnp.sum(v["w"] * jnp.arange(12.0))

  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(g, jnp.float32))
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
