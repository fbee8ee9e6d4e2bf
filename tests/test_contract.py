"""The method contract: a method defined outside the package trains through the normal loop,
CS-DFD runs over K declared streams, the exact conflict-loss gradient (Eq. 18) matches autodiff
in float64, and silent misconfigurations are errors.

This file is itself a method module (``build`` below): ``config.method = "test_contract"``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import tiny_config

from csdfd_jax import eval_lib, methods, train_lib
from csdfd_jax.data import builder, demo
from csdfd_jax.methods import Method
from csdfd_jax.methods.step import Gradients, make_step
from csdfd_jax.models.heads import Detector
from csdfd_jax.transforms import sum_streams, uvs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import effnet  # noqa: E402

SMOOTHING = 0.1


def build(name: str, config) -> Method:
  """A tiny method: label-smoothed BCE on stream O alone, its own gradient function, its own
  metric and its own diagnostics."""

  def gradients(model):
    def loss_fn(params, model_state, stream, rng):
      logits, mutated = model.apply(
        {"params": params, "batch_stats": model_state},
        stream["image"],
        train=True,
        rngs={"dropout": rng},
        mutable=["batch_stats"],
      )
      target = stream["label"] * (1 - SMOOTHING) + SMOOTHING / 2
      return optax.sigmoid_binary_cross_entropy(logits, target).mean(), mutated["batch_stats"]

    def grad_fn(params, model_state, batch, rng) -> Gradients:
      (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, batch["o"], rng
      )
      stacked = jax.tree.map(lambda x: x[None], g)
      return Gradients(stacked, loss[None], stats, {"smoothing": jnp.float32(SMOOTHING)})

    return grad_fn

  return Method(name, ("o",), sum_streams(), gradients, lambda opt_state: {"tiny_diag": 1.0})


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> str:
  base = tmp_path_factory.mktemp("contract")
  store = demo.make_demo_store(
    base / "store",
    size=64,
    train=4,
    val=2,
    test=2,
    unseen=2,
    frames=2,
    families=("swap", "reenact"),
  )
  return str(builder.build_records(store, base / "records"))


def tiny(records: str, method: str, steps: int = 2):
  config = tiny_config(records, method, steps)
  config.train.checkpoint_every = steps
  return config


def logged(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"loss/total"' in line]


def test_a_method_outside_the_package_trains_through_the_normal_loop(records, tmp_path):
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(tiny(records, "test_contract", steps=3), workdir)
  assert summary["end_step"] == 3 and summary["method"] == "test_contract"
  rows = logged(workdir)
  assert len(rows) == 3 and all(np.isfinite(r["loss/o"]) for r in rows)
  assert rows[0]["smoothing"] == pytest.approx(SMOOTHING) and rows[0]["tiny_diag"] == 1.0
  sets = [eval_lib.TestSet("demo", records, "test", ("demo",))]
  runs, _ = eval_lib.evaluate([workdir], sets, str(tmp_path / "eval"), gradcam=False)
  assert runs[0]["method"] == "test_contract" and runs[0]["step"] == 3


def test_csdfd_over_k_declared_streams(records, tmp_path):
  """Two manipulation streams and SBI: UVS balances three streams, CGR sums over the pairs."""
  config = tiny(records, "csdfd")
  config.data.streams = "swap,reenact,sbi"
  workdir = str(tmp_path / "k")
  train_lib.train_and_evaluate(config, workdir)
  row = logged(workdir)[-1]
  for s in ("swap", "reenact", "sbi"):
    assert np.isfinite(row[f"loss/{s}"]) and f"grad_norm/{s}" in row and f"accuracy/{s}" in row
  weights = [row[f"uvs_weight/{i}"] for i in range(3)]  # on the simplex, or all 0 (v = g0 kept)
  assert "uvs_weight/3" not in row
  assert sum(weights) == pytest.approx(1.0, abs=1e-4) or not any(weights), weights
  assert "cgr_correction_ratio" in row
  plots = eval_lib.plot_training_curves([workdir], str(tmp_path / "plots"))
  assert any(p.endswith("loss_curves.png") for p in plots)


def test_k_streams_config_declares_six_streams():
  config = effnet.get_config("k_streams")
  assert methods.stream_names(config) == (
    "Deepfakes",
    "Face2Face",
    "FaceSwap",
    "NeuralTextures",
    "FaceShifter",
    "sbi",
  )
  method = methods.get(config.method, config)
  assert [s.fakes for s in method.stream_specs()][-1] == "sbi"
  assert method.stream_specs()[0].fakes.domains == ("Deepfakes",)


def _head_problem(seed: int, k: int, dims=(5, 4), features: int = 6, n: int = 8):
  model = Detector(None, mean=(0.0,) * 3, std=(1.0,) * 3, projection_dims=dims, dtype=jnp.float64)
  rng = np.random.default_rng(seed)
  pooled = jnp.asarray(rng.normal(size=(k, n, features)))
  labels = jnp.asarray(np.tile([0.0, 1.0], (k, n // 2)))
  params = model.init(jax.random.PRNGKey(seed), None, pooled=pooled[0])["params"]
  params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape)), params)

  def stream_loss(theta_p, i):
    logits = model.apply({"params": params | {"projection": theta_p}}, None, pooled=pooled[i])
    return optax.sigmoid_binary_cross_entropy(logits, labels[i]).mean()

  return params["projection"], stream_loss


@pytest.mark.parametrize("k", [2, 3])
def test_exact_conflict_gradient_matches_reverse_over_reverse_in_float64(k):
  from csdfd_jax.methods.csdfd import conflict_gradient

  with jax.enable_x64(True):
    theta, stream_loss = _head_problem(k, k)
    grads = jax.tree.map(
      lambda *g: jnp.stack(g), *[jax.grad(stream_loss)(theta, i) for i in range(k)]
    )

    def l_phi(th):
      gs = [jax.flatten_util.ravel_pytree(jax.grad(stream_loss)(th, i))[0] for i in range(k)]
      cos = lambda a, b: a @ b / jnp.sqrt((a @ a) * (b @ b))  # noqa: E731
      return -sum(cos(gs[i], gs[j]) for i in range(k) for j in range(i + 1, k))

    ref = jax.flatten_util.ravel_pytree(jax.grad(l_phi)(theta))[0]
    got, loss = conflict_gradient(stream_loss, theta, grads)
    got = jax.flatten_util.ravel_pytree(got)[0]
    assert float(loss) == pytest.approx(float(l_phi(theta)), rel=1e-10)
    cosine = float(got @ ref / jnp.sqrt((got @ got) * (ref @ ref)))
    assert cosine > 0.99999 and abs(float(jnp.linalg.norm(got) / jnp.linalg.norm(ref)) - 1) < 1e-5


@pytest.mark.slow  # a minute of training compiles; the exact gradient is checked in float64 above
def test_exact_cgr_trains_and_its_term_is_not_negligible(records, tmp_path):
  """Eq. 24's correction is ~1e-6 of g1 + g2 on this head (``cgr_correction_ratio`` of the
  other tests' runs); the exact term, at weight 1, is of the order of the gradient itself."""
  config = tiny(records, "csdfd")
  config.cgr.mode = "exact"
  workdir = str(tmp_path / "exact")
  train_lib.train_and_evaluate(config, workdir)
  row = logged(workdir)[-1]
  assert np.isfinite(row["loss/total"]) and "cgr_correction_ratio" not in row
  assert -1 <= row["conflict_loss"] <= 1 and row["cgr_exact_ratio"] > 1e-3, row


def test_silent_misconfigurations_are_errors(records, tmp_path):
  config = tiny(records, "cgr")
  config.cgr.projection = "phi"  # no such parameter: CGR would act on nothing (O+S)
  with pytest.raises(ValueError, match="No parameter matches projection='phi'"):
    train_lib.train_and_evaluate(config, str(tmp_path / "a"))
  config = tiny(records, "O")
  config.optim.weight_decay = 1e-4  # adam would drop it
  with pytest.raises(ValueError, match="ignores weight_decay"):
    train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    train_lib.check_config(tiny(records, "nope"))


def test_two_uvs_states_make_the_diagnostics_an_error():
  model = Detector(None, mean=(0.0,) * 3, std=(1.0,) * 3, projection_dims=(3,))
  params = model.init(jax.random.PRNGKey(0), None, pooled=jnp.ones((2, 4)))["params"]
  labels = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
    lambda path, _: "a" if path[0].key == "classifier" else "b", p
  )
  tx2 = optax.partition({"a": uvs(), "b": uvs()}, labels)

  def gradients(params, model_state, batch, rng):
    g = jax.tree.map(lambda x: jnp.stack([x, -x + 1]), params)
    return Gradients(g, jnp.zeros(2), model_state, {})

  from csdfd_jax.methods.step import create_train_state

  state = create_train_state({"params": params}, tx2, jax.random.PRNGKey(0))
  step = make_step(gradients, tx2, ("o", "s"))
  with pytest.raises(ValueError, match="2 UVSStates"):
    step(state, {})


def test_eval_locates_a_runs_records_without_writing(tmp_path):
  """Evaluation finds a run's demo / FFHQ mini records read-only: missing data is an error
  naming the fix, never a silent rebuild (today's eval re-ran face preprocessing)."""
  from csdfd_jax.data import protocols

  for variant in ("demo", "ffhq_mini"):
    config = effnet.get_config(variant)
    workdir = tmp_path / variant
    workdir.mkdir()
    with pytest.raises(FileNotFoundError, match="run train.py on the workdir again"):
      protocols.locate(config, str(workdir))
    with pytest.raises(FileNotFoundError, match="run train.py"):
      eval_lib.default_test_sets(config, str(workdir))
    assert list(workdir.iterdir()) == []
