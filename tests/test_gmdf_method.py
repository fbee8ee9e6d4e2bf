"""GM-DF as a method: its parameter groups, MIM, the domain-alignment loss, the step's gradients
against hand-written references in float64, the optimizer partition, the configs, and a demo
run through train, eval (EER, M_EER) and predict."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import gmdf as gmdf_configs  # noqa: E402
from csdfd_jax import methods  # noqa: E402
from csdfd_jax.methods import gmdf as gmdf_method  # noqa: E402
from csdfd_jax.methods.step import create_train_state, make_step  # noqa: E402
from csdfd_jax.models import clip, clip_tokenizer, detector  # noqa: E402
from csdfd_jax.models import gmdf as gmdf_model  # noqa: E402


def _demo_config(**gmdf):
  config = gmdf_configs.get_config("demo")
  config.data.image_size = 32
  for k, v in gmdf.items():
    config.gmdf[k] = v
  return config


def _batch(seed=0, k=2, b=4, size=32):
  rng = np.random.default_rng(seed)
  out = {}
  for i, name in enumerate(("o", "s", "x")[:k]):
    out[name] = {
      "image": jnp.asarray(rng.integers(0, 256, (b, size, size, 3)), jnp.uint8),
      "label": jnp.asarray([0, 1] * (b // 2), jnp.int32),
      "domain": jnp.full((b,), i + 1, jnp.int32),
    }
  return out


@pytest.fixture(scope="module")
def tiny():
  config = _demo_config()
  model = detector.build(config)
  variables = detector.init_variables(model, config, 0)
  return config, model, variables


def test_parameter_groups_follow_the_notes(tiny):
  _, _, variables = tiny
  labels = gmdf_model.param_labels(variables["params"])
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert all(v == "frozen" for k, v in flat.items() if k.startswith("['text']"))
  branch = {k: v for k, v in flat.items() if "'branch'" in k}
  assert branch and all(
    v == ("O" if k.endswith("['gamma0']") or k.endswith("['beta0']") else "E")
    for k, v in branch.items()
  )
  assert flat["['domain_codes']"] == flat["['domain_embeds']"] == "E"
  for key in ("['class_embeds']", "['so_alpha']", "['mim_token']", "['visual']['proj']"):
    assert flat[key] == "O", key
  unfrozen = gmdf_model.param_labels(variables["params"], freeze_text=False)
  assert all(v == "O" for p, v in jax.tree_util.tree_flatten_with_path(unfrozen)[0] if
             jax.tree_util.keystr(p).startswith("['text']"))  # fmt: skip


def test_class_embeddings_start_at_the_real_and_fake_token_embeddings(tiny):
  _, _, variables = tiny
  p = variables["params"]
  tok = clip_tokenizer.Tokenizer()
  real, fake = gmdf_model.class_token_ids(tok)
  assert (real, fake) == (tok.encode("real")[0], tok.encode("fake")[0]) and real != fake
  table = p["text"]["token_embedding"]["embedding"]
  np.testing.assert_array_equal(p["class_embeds"], table[jnp.asarray([real, fake])])


def test_init_from_clip_is_strict_and_loads_both_towers(tiny):
  _, model, variables = tiny
  ref = clip.create_clip("tiny")
  ids = jnp.zeros((1, 77), jnp.int32)
  base = ref.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)), ids)["params"]
  tok = clip_tokenizer.Tokenizer()
  got = gmdf_model.init_from_clip(variables["params"], base, tok)
  np.testing.assert_array_equal(got["visual"]["conv1"]["kernel"], base["visual"]["conv1"]["kernel"])
  np.testing.assert_array_equal(
    got["text"]["token_embedding"]["embedding"], base["text"]["token_embedding"]["embedding"]
  )
  np.testing.assert_array_equal(  # the expert branches keep their zero init
    got["visual"]["transformer"]["resblocks_0"]["branch"]["dnorm"]["gamma0"], 0.0
  )
  from csdfd_jax.models import weights

  with pytest.raises(weights.WeightMappingError, match="no 'text' tower"):
    gmdf_model.init_from_clip(variables["params"], {"visual": base["visual"]}, tok)
  broken = jax.tree.map(lambda x: x, base)
  del broken["visual"]["ln_post"]
  with pytest.raises(ValueError, match="ln_post"):
    gmdf_model.init_from_clip(variables["params"], broken, tok)


def test_patchify_is_the_patch_embeddings_order():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 24, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(8, 8, 3, 5)), jnp.float32)
  conv = jax.lax.conv_general_dilated(
    x, kernel, (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  flat = gmdf_model.patchify(x, 8) @ kernel.reshape(-1, 5)
  np.testing.assert_allclose(flat, conv.reshape(2, 6, 5), rtol=1e-5, atol=1e-4)


def test_random_mask_has_the_exact_count_at_random_places():
  mask = gmdf_model.random_mask(jax.random.key(0), 500, 64, 0.2)
  assert mask.shape == (500, 64) and np.all(np.sum(mask, axis=1) == 13)
  per_token = np.mean(np.asarray(mask), axis=0)
  assert np.all(np.abs(per_token - 13 / 64) < 4 * np.sqrt(0.2 * 0.8 / 500))
  with pytest.raises(ValueError, match="mask ratio"):
    gmdf_model.random_mask(jax.random.key(0), 2, 8, 1.0)


def test_mim_reads_only_the_masked_patches_and_the_mask_token_enters(tiny):
  _, model, variables = tiny
  images = _batch(1)["o"]["image"]
  n = (32 // model.patch_size) ** 2
  mask = jnp.zeros((4, n), bool).at[:, 3].set(True)
  loss = model.apply(variables, images, mask, method=type(model).mim_loss)
  assert np.isfinite(loss) and loss > 0
  # The mask token enters (a random change: ln_pre removes a uniform shift).
  token = variables["params"]["mim_token"]
  other = dict(
    variables["params"], mim_token=token + jax.random.normal(jax.random.key(1), token.shape)
  )
  assert model.apply({"params": other}, images, mask, method=type(model).mim_loss) != loss
  # With nothing but patch 3 masked, the loss is the squared error of that patch alone.
  p = model.patch_size
  x = (images.astype(jnp.float32) - jnp.asarray(clip.CLIP_MEAN) * 255) / (
    jnp.asarray(clip.CLIP_STD) * 255
  )
  target = gmdf_model.patchify(x, p)[:, 3]
  target = (target - target.mean(-1, keepdims=True)) / jnp.sqrt(
    target.var(-1, keepdims=True) + 1e-6
  )

  def tokens(params):
    m = model.bind({"params": params})
    xs, _, codes = m._inputs(images, None)
    _, (t,) = m.visual(xs, return_layers=(m.visual.layers - 1,), mask=mask, mask_token=m.mim_token)
    return t

  t = tokens(variables["params"])
  pred = t[:, 1 + 3] @ variables["params"]["mim_kernel"] + variables["params"]["mim_bias"]
  np.testing.assert_allclose(loss, jnp.mean(jnp.square(pred - target)), rtol=1e-5)


def test_coral_equals_numpy():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(12, 5)), rng.normal(1.0, 2.0, size=(7, 5))
  want = np.sum((s.mean(0) - t.mean(0)) ** 2) + np.sum(
    (np.cov(s, rowvar=False) - np.cov(t, rowvar=False)) ** 2
  ) / (4 * 25)
  got = gmdf_method.coral(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(gmdf_method.coral(jnp.asarray(s), jnp.asarray(s))) == pytest.approx(0.0, abs=1e-6)


def _reference(model, params, batch, rng, opts, order):
  """The step's gradient written out by hand: the same split, dropout and mask draws; the
  inner SGD step on E; the outer gradient on O at theta'_E (order 1), or jax.grad through the
  inner step (order 2)."""
  streams = ("o", "s")
  r_split, r_drop, r_mask = jax.random.split(rng, 3)
  test, train = gmdf_method.meta_split(r_split, 2)
  ids = gmdf_method.domain_dropout(
    r_drop, jnp.stack([batch[s]["domain"] for s in streams]), opts.wildcard_prob
  )
  images = jnp.stack([batch[s]["image"] for s in streams])
  labels_y = jnp.stack([batch[s]["label"] for s in streams])
  t, tr = test, train[0]  # traced indices: the reference runs under jit
  labels = gmdf_model.param_labels(params)
  mask_e = jax.tree.map(lambda lab: lab == "E", labels)
  mask_o = jax.tree.map(lambda lab: lab == "O", labels)

  def loss_train(p):
    logit, aux = model.apply({"params": p}, images[tr], domain_ids=ids[tr], aux=True)
    y = labels_y[tr].astype(p["so_alpha"].dtype)
    return jnp.mean(jnp.maximum(logit, 0) - logit * y + jnp.log1p(jnp.exp(-jnp.abs(logit)))), aux

  def loss_test(p, v_train):
    logit, aux = model.apply({"params": p}, images[t], domain_ids=ids[t], aux=True)
    y = labels_y[t].astype(logit.dtype)
    cls = jnp.mean(jnp.maximum(logit, 0) - logit * y + jnp.log1p(jnp.exp(-jnp.abs(logit))))
    sis = gmdf_model.sis_loss(aux["v"], aux["u"], ids[t], labels_y[t], aux["tau"], opts.sis)
    n = (images.shape[2] // model.patch_size) ** 2
    mask = gmdf_model.random_mask(r_mask, images.shape[1], n, opts.mim_ratio)
    mim = model.apply({"params": p}, images[t], mask, ids[t], method=type(model).mim_loss)
    unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    da = gmdf_method.coral(unit(aux["v"]), unit(v_train))
    return cls + sis + mim + da

  (_, aux_s), g = jax.value_and_grad(loss_train, has_aux=True)(params)
  v_train = jax.lax.stop_gradient(aux_s["v"])
  g_e = jax.tree.map(lambda x, m: x * m, g, mask_e)
  new = jax.tree.map(lambda p_, x: p_ - opts.inner_lr * x, params, g_e)
  if order == 1:
    g_o = jax.grad(loss_test)(new, v_train)
  else:

    def composed(p):
      inner = jax.grad(lambda q: loss_train(q)[0])(p)
      moved = jax.tree.map(lambda p_, x, m: p_ - opts.inner_lr * x * m, p, inner, mask_e)
      return loss_test(moved, v_train)

    g_o = jax.grad(composed)(params)
  g_o = jax.tree.map(lambda x, m: x * m, g_o, mask_o)
  return jax.tree.map(jnp.add, g_e, g_o)


@pytest.mark.parametrize("order", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_step_gradient_equals_the_hand_written_reference_in_float64(order):
  jax.config.update("jax_enable_x64", True)
  try:
    config = _demo_config(maml_order=order, inner_lr=0.05)
    model = detector.build(config).clone(dtype=jnp.float64)
    variables = detector.init_variables(model, config, 0)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables["params"])
    # Move off the zero init so that every path (experts, DNorm, alpha_so) carries gradient.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = jax.tree.unflatten(
      tree,
      [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
      ],
    )
    method = methods.get("gmdf", config)
    opts = gmdf_method.options(config)
    batch = _batch(3, b=2)  # at the tower's own 32 px: no position-embedding resampling
    rng = jax.random.key(11)
    got = jax.jit(method.gradient_fn(model))(params, {}, batch, rng)
    want = jax.jit(lambda p: _reference(model, p, batch, rng, opts, order))(params)
    flat_got = jnp.concatenate([x[0].ravel() for x in jax.tree.leaves(got.grads)])
    flat_want = jnp.concatenate([x.ravel() for x in jax.tree.leaves(want)])
    err = float(jnp.linalg.norm(flat_got - flat_want) / jnp.linalg.norm(flat_want))
    assert err < 1e-10, err
    text = jnp.concatenate([x.ravel() for x in jax.tree.leaves(got.grads["text"])])
    assert float(jnp.max(jnp.abs(text))) == 0.0
  finally:
    jax.config.update("jax_enable_x64", False)


def test_a_step_commits_the_inner_sgd_step_moves_the_base_by_adam_and_leaves_text(tiny):
  config, model, variables = tiny
  method = methods.get("gmdf", config)
  import optax

  base = optax.adam(1e-3)
  tx = method.full_optimizer(base)
  state = create_train_state(variables, tx, jax.random.key(0))
  grad_fn = method.gradient_fn(model)
  step = jax.jit(make_step(grad_fn, tx, method.streams, axes=method.update_axes))
  batch = _batch(4)
  new, metrics = step(state, batch)
  assert int(metrics["finite"]) == 1
  g = jax.jit(grad_fn)(state.params, {}, batch, jax.random.fold_in(state.rng, state.step)).grads
  labels = gmdf_model.param_labels(state.params)
  moved_o = False
  for (path, lab), old, upd, grad in zip(
    jax.tree_util.tree_flatten_with_path(labels)[0],
    jax.tree.leaves(state.params),
    jax.tree.leaves(new.params),
    jax.tree.leaves(g),
    strict=True,
  ):
    name = jax.tree_util.keystr(path)
    if lab == "frozen":
      np.testing.assert_array_equal(upd, old, err_msg=name)
    elif lab == "E":
      np.testing.assert_allclose(upd, old - config.gmdf.inner_lr * grad[0], rtol=1e-6, atol=1e-9)
    else:  # Adam's first step moves every coordinate with a gradient by about its lr
      step_size = np.abs(np.asarray(upd) - np.asarray(old))
      has_grad = np.abs(np.asarray(grad[0])) > 1e-12
      assert np.all(step_size[has_grad] < 1.01e-3), name
      moved_o |= bool(np.any(step_size[has_grad] > 0.9e-3))
  assert moved_o
  for key in ("loss/meta", "loss/inner_cls", "loss/cls", "loss/sis", "loss/mim", "loss/da"):
    assert np.isfinite(metrics[key]), key
  total = sum(float(metrics[f"loss/{k}"]) for k in ("cls", "sis", "mim", "da"))
  assert float(metrics["loss/meta"]) == pytest.approx(total, rel=1e-5)
  for key in ("gmdf/tau/wildcard", "gmdf/tau/o", "gmdf/tau/s", "gmdf/alpha_so/1"):
    assert key in metrics
  assert float(metrics["gmdf/dE_norm"]) > 0
  again, metrics = step(new, _batch(5))
  assert int(metrics["finite"]) == 1 and int(again.step) == 2 and step._cache_size() == 1


def test_configs_declare_the_domains_and_their_ids():
  combos = {
    "ffpp_cdf_dff": ("ffpp", "celebdf_v2", "dff"),
    "ffpp_cdf_wdf": ("ffpp", "celebdf_v2", "wilddeepfake"),
    "ffpp_dff_wdf": ("ffpp", "dff", "wilddeepfake"),
    "cdf_dff_wdf": ("celebdf_v2", "dff", "wilddeepfake"),
  }
  for variant, datasets in combos.items():
    config = gmdf_configs.get_config(variant)
    specs = methods.get("gmdf", config).stream_specs()
    assert tuple(s.name for s in specs) == datasets
    assert [s.domain_id for s in specs] == [1, 2, 3]
    assert all(s.reals.datasets == s.fakes.datasets == (s.name,) for s in specs)
    assert config.data.batch_size * len(specs) == 30 and config.model.variant == "vit_b16"
  single = methods.get("gmdf", gmdf_configs.get_config("single_ffpp")).stream_specs()
  assert [s.fakes.domains for s in single] == [(m,) for m in gmdf_configs.MANIPULATIONS]
  gid = methods.get("gmdf", gmdf_configs.get_config("gid_df")).stream_specs()
  assert "Deepfakes" not in [s.name for s in gid] and len(gid) == 3
  second = gmdf_configs.get_config("gid_f2f,second_order")
  assert second.gmdf.maml_order == 2
  literal = gmdf_configs.get_config("literal")
  assert (literal.gmdf.sis, literal.gmdf.lambda_da, literal.gmdf.wildcard_prob) == ("paper", 0, 0)
  assert gmdf_configs.get_config().gmdf.domains == "ffpp,celebdf_v2,dff"
  with pytest.raises(ValueError, match="one protocol"):
    gmdf_configs.get_config("demo,single_ffpp")


def test_misconfigurations_are_clear_errors():
  from configs import effnet

  with pytest.raises(ValueError, match="configs/gmdf.py"):
    methods.get("gmdf", effnet.get_config("demo"))
  for key, value, match in [
    ("domains", "o", "at least two"),
    ("domain_kind", "folder", "domain_kind"),
    ("maml_order", 3, "maml_order"),
    ("sis", "other", "sis"),
    ("wildcard_prob", 1.5, "wildcard_prob"),
    ("lambda_da", -1.0, "lambda_da"),
    ("mim_target", "dvae", "dVAE"),
  ]:
    config = _demo_config(**{key: value})
    with pytest.raises(ValueError, match=match):
      methods.get("gmdf", config)
  config = _demo_config(so_layers=(0,))
  with pytest.raises(ValueError, match="1-indexed"):
    detector.build(config)


def test_trains_on_two_domains_and_eval_and_predict_read_it(peer_records, tmp_path):
  from peer_e2e import train_eval_predict
  from test_train import tiny_config

  from csdfd_jax import eval_lib

  config = _demo_config()
  tiny = tiny_config(peer_records, "gmdf", steps=3)  # the other e2e tests' data and loop
  config.data, config.train = tiny.data, tiny.train
  rows, predictor = train_eval_predict(config, peer_records, tmp_path)
  for r in rows:
    for key in ("loss/meta", "loss/inner_cls", "loss/sis", "loss/mim", "loss/da", "gmdf/dE_norm"):
      assert np.isfinite(r[key]), key
  # eval.py's tables: AUC, EER and M_EER over the target sets (the unseen "swap" set here).
  sets = [
    eval_lib.TestSet("demo", peer_records, "test", ("demo",)),
    eval_lib.TestSet("unseen", peer_records, "test", ("demo_unseen",)),
  ]
  runs, paths = eval_lib.evaluate(
    [str(tmp_path / "run")], sets, str(tmp_path / "eval2"), gradcam=False
  )
  text = Path(paths["md"]).read_text()
  assert "M_EER" in text and "gmdf" in text
  # predict scores faces with no domain id: the wildcard path.
  assert isinstance(predictor.model, gmdf_model.GMDF)
