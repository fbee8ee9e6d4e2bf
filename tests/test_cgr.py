"""CGR (Eq. 24) against a float64 NumPy reference, and its numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cagrad_reference import cgr_update

from csdfd_jax.transforms import cgr, cgr_diagnostics


def _tree(g: np.ndarray, dtype=None):
  """Splits flattened stacked gradients [K, P] into a two-leaf tree."""
  cut = g.shape[1] // 3
  tree = {"kernel": g[:, :cut].reshape(g.shape[0], -1, 1), "bias": g[:, cut:]}
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _flat(tree) -> np.ndarray:
  return np.concatenate(
    [np.asarray(tree["kernel"], np.float64).ravel(), np.asarray(tree["bias"], np.float64).ravel()]
  )


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("tau", [0.01, 0.5, 5.0])
def test_matches_float64_reference(k, tau):
  g = np.random.default_rng(k).normal(size=(k, 30))
  with jax.enable_x64(True):
    tx = cgr(tau, num_streams=k)
    u, state = tx.update(_tree(g), tx.init(None))
  ref = cgr_update(g, tau)
  np.testing.assert_allclose(_flat(u), ref, rtol=1e-10, atol=1e-12)
  ratio = np.linalg.norm(ref - g.sum(0)) / np.linalg.norm(g.sum(0))
  np.testing.assert_allclose(float(state.correction_ratio), ratio, rtol=1e-6)


def test_paper_form_for_two_streams():
  """Eq. 24 written out: g1 + g2 - gamma (g1 g1 g2 + g2 g2 g1), gamma = tau / (|g1| |g2|)."""
  rng = np.random.default_rng(0)
  g1, g2 = rng.normal(size=17), rng.normal(size=17)
  gamma = 0.01 / (np.linalg.norm(g1) * np.linalg.norm(g2))
  expected = g1 + g2 - gamma * (g1 * g1 * g2 + g2 * g2 * g1)
  u, state = cgr().update({"w": jnp.asarray(np.stack([g1, g2]), jnp.float32)}, cgr().init(None))
  np.testing.assert_allclose(np.asarray(u["w"]), expected, rtol=1e-5, atol=1e-6)
  cos = g1 @ g2 / np.linalg.norm(g1) / np.linalg.norm(g2)
  np.testing.assert_allclose(float(state.cosine), cos, rtol=1e-5, atol=1e-6)


def test_mean_reduction_divides_by_k():
  g = _tree(np.random.default_rng(1).normal(size=(3, 12)))
  u_sum, _ = cgr(num_streams=3).update(g, None)
  u_mean, _ = cgr(num_streams=3, reduction="mean").update(g, None)
  np.testing.assert_allclose(_flat(u_mean), _flat(u_sum) / 3, rtol=1e-6)


def test_bfloat16_in_bfloat16_out_computed_in_float32():
  g = np.random.default_rng(2).normal(size=(2, 90)).astype(np.float32)
  u, _ = cgr(tau=1.0).update(_tree(g, jnp.bfloat16), None)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  g_bf = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(_flat(u), cgr_update(g_bf, 1.0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1.0, 1e8, 1e30])
def test_scale_invariant_and_finite_in_float32(scale):
  g = np.random.default_rng(3).normal(size=(2, 40))
  u, state = cgr(tau=1.0).update(_tree((g * scale).astype(np.float32)), None)
  assert np.all(np.isfinite(_flat(u)))
  np.testing.assert_allclose(_flat(u) / scale, cgr_update(g, 1.0), rtol=1e-4, atol=1e-5)
  assert 0 < float(state.correction_ratio) < 1


def test_zero_streams_give_no_nan():
  g = np.zeros((2, 9), np.float32)
  u, state = cgr().update(_tree(g), None)
  assert np.all(_flat(u) == 0) and float(state.correction_ratio) == 0
  g[1] = np.arange(9)
  u, _ = cgr().update(_tree(g), None)
  np.testing.assert_allclose(_flat(u), g[1])  # no pair term when a stream is zero


def test_correction_ratio_scales_like_tau_over_p():
  """For dense iid gradients E|g1 g2 (g1 + g2)|^2 = 6, so the ratio is ~ sqrt(3) tau / P."""
  rng = np.random.default_rng(4)
  for p in (1_000, 100_000):
    d = cgr_diagnostics(_tree(rng.normal(size=(2, p)).astype(np.float32)), tau=0.01)
    np.testing.assert_allclose(float(d["correction_ratio"]) * p / 0.01, np.sqrt(3), rtol=0.15)


def test_diagnostics_conflict_loss_is_negative_cosine():
  g = np.random.default_rng(5).normal(size=(2, 20))
  d = cgr_diagnostics(_tree(g.astype(np.float32)))
  cos = g[0] @ g[1] / np.linalg.norm(g[0]) / np.linalg.norm(g[1])
  np.testing.assert_allclose(float(d["conflict_loss"]), -cos, rtol=1e-5, atol=1e-6)


def test_stream_count_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="num_streams=3"):
    cgr().update({"w": jnp.zeros((3, 2))}, None)
  with pytest.raises(ValueError, match="leading stream axis"):
    cgr().update({"w": jnp.zeros((2, 2)), "b": jnp.zeros(())}, None)
