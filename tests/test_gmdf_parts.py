"""GM-DF's domain-conditioned parts (csdfd_jax/models/gmdf.py) against NumPy references: DNorm
(Eq. 2) with a zero code equals LayerNorm with the base affine, the expert aggregation (Eq. 4-5,
shape fixed), an exactly-zero branch at initialisation, and the inference parameter budget."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csdfd_jax.models import clip, gmdf


def _layer_norm(x, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def test_dnorm_with_a_zero_code_is_layernorm_with_the_base_affine():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 8)).astype(np.float32) * 3 + 1
  module = gmdf.DNorm(8, domain_dims=4, init_scale=0.5)
  params = module.init(jax.random.key(0), x)
  p = params["params"]
  got_wild = module.apply(params, x)  # the wildcard: no code
  got_zero = module.apply(params, x, jnp.zeros((3, 4)))
  ln = jax.numpy.asarray(
    clip.layer_norm().apply({"params": {"scale": p["gamma0"], "bias": p["beta0"]}}, x)
  )
  np.testing.assert_allclose(got_wild, ln, atol=2e-6)
  np.testing.assert_allclose(got_zero, ln, atol=2e-6)
  # A code moves the affine per sample by W c (Eq. 2), broadcast over the tokens.
  code = rng.normal(size=(3, 4)).astype(np.float32)
  want = (
    _layer_norm(x.astype(np.float64))
    * (np.asarray(p["gamma0"]) + code @ np.asarray(p["w_gamma"]))[:, None]
    + (np.asarray(p["beta0"]) + code @ np.asarray(p["w_beta"]))[:, None]
  )
  np.testing.assert_allclose(module.apply(params, x, code), want, atol=2e-5)
  with pytest.raises(ValueError, match="domain codes"):
    module.apply(params, x, jnp.zeros((3, 5)))


def test_expert_aggregation_equals_a_numpy_reference():
  rng = np.random.default_rng(1)
  experts = rng.normal(size=(2, 7, 3, 16))  # [B, T, N, d]
  got = np.asarray(gmdf.aggregate_experts(jnp.asarray(experts, jnp.float32)))
  want = np.zeros((2, 7, 16))
  for b in range(2):
    for t in range(7):
      e = experts[b, t]
      s = e @ e.T / np.sqrt(16)
      a = np.exp(s - s.max(1, keepdims=True))
      a /= a.sum(1, keepdims=True)
      want[b, t] = (a @ e).mean(0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # One expert: the softmax is 1, the aggregate is that expert.
  one = experts[:, :, :1]
  np.testing.assert_allclose(gmdf.aggregate_experts(jnp.asarray(one)), one[:, :, 0], atol=1e-6)


def test_the_branch_is_exactly_zero_at_initialisation_and_trainable():
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  code = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
  branch = gmdf.ExpertBranch(num_experts=3)
  params = branch.init(jax.random.key(0), h, code)
  out = branch.apply(params, h, code)
  assert out.shape == h.shape and np.all(np.asarray(out) == 0.0)

  # The zero init is not a dead end: gamma0 and the domain weights get a gradient at once.
  def loss(p):
    return jnp.sum(branch.apply(p, h, code) * h)

  grads = jax.grad(loss)(params)["params"]["dnorm"]
  for name in ("gamma0", "beta0", "w_gamma", "w_beta"):
    assert float(jnp.max(jnp.abs(grads[name]))) > 0, name


def test_inference_parameters_are_under_one_percent_of_vit_b16_clip():
  """12 visual blocks x one branch (N = 3 experts, r = 16, k = 16), counted with eval_shape."""

  def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

  base = jax.eval_shape(
    lambda: clip.create_clip("vit_b16").init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 77), jnp.int32)
    )
  )
  branch = jax.eval_shape(
    lambda: gmdf.ExpertBranch(num_experts=3).init(
      jax.random.key(0), jnp.zeros((1, 197, 768)), jnp.zeros((1, 16))
    )
  )
  added = 12 * count(branch)
  assert count(base) == 149_620_737
  assert added / count(base) < 0.01, (added, count(base))


def test_the_gmdf_image_tower_equals_clip_exactly_at_initialisation():
  """Every visual block gets a branch beside its MLP; with the converted CLIP's weights and the
  branch at its zero initialisation, the image embedding is bitwise CLIP's, for any domain."""
  from functools import partial

  from flax import traverse_util

  plain = clip.create("tiny")
  tower = clip.create("tiny", branch=partial(gmdf.ExpertBranch, num_experts=2))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  base = plain.init(jax.random.key(0), x)["params"]
  params = tower.init(jax.random.key(1), x)["params"]
  flat, flat_base = traverse_util.flatten_dict(params), traverse_util.flatten_dict(base)
  added = {k for k in flat if k not in flat_base}
  assert set(flat_base) <= set(flat)
  assert {k[:3] for k in added} == {
    ("transformer", f"resblocks_{i}", "branch") for i in range(2)
  }  # one branch per visual block, nothing else new
  merged = traverse_util.unflatten_dict(flat | flat_base)
  want = plain.apply({"params": base}, x)
  for domain in (None, jnp.asarray(np.random.default_rng(4).normal(size=(2, 16)), jnp.float32)):
    got = tower.apply({"params": merged}, x, domain=domain)
    np.testing.assert_array_equal(got, want)
  # Once the branch moves, the domain code changes the embedding.
  flat_moved = {
    k: (v + 0.1 if k[-1] in ("gamma0", "w_gamma") else v)
    for k, v in traverse_util.flatten_dict(merged).items()
  }
  moved = traverse_util.unflatten_dict(flat_moved)
  a = tower.apply({"params": moved}, x, domain=jnp.zeros((2, 16)))
  b = tower.apply({"params": moved}, x, domain=jnp.ones((2, 16)))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_the_prompt_template_and_its_slots():
  from csdfd_jax.models import clip_tokenizer

  tok = clip_tokenizer.Tokenizer()
  ids, slots = gmdf.template_ids(tok)
  # SOT a X Y face showing for.gery clues EOT: "forgery" is two BPE tokens, 10 in all.
  assert int(jnp.sum(ids != 0)) == 10 and int(ids[0]) == tok.sot_token_id
  assert slots == (2, 3) and int(jnp.argmax(ids)) == 9  # EOT pooling position
  dom, cls = jnp.arange(3.0)[:, None] * jnp.ones((3, 4)), jnp.asarray([[10.0] * 4, [20.0] * 4])
  x, y = gmdf.prompt_slots(dom, cls)
  assert x.shape == y.shape == (6, 4)
  np.testing.assert_array_equal(x[:, 0], [0, 0, 1, 1, 2, 2])  # the domain of row 2 j + k
  np.testing.assert_array_equal(y[:, 0], [10, 20, 10, 20, 10, 20])  # its class


def test_temperatures_and_the_sis_loss_equal_numpy():
  rng = np.random.default_rng(6)
  n_dom, b, d = 3, 7, 5  # D = 2 domains + the wildcard
  dom = rng.normal(size=(n_dom, 4))
  taus = np.asarray(gmdf.temperatures(jnp.asarray(dom), 0.07, 0.01))
  np.testing.assert_allclose(taus, 0.07 + 0.01 * np.linalg.norm(dom, axis=1), rtol=1e-6)
  v, u = rng.normal(size=(b, d)), rng.normal(size=(n_dom, 2, d))
  ids, labels = rng.integers(0, n_dom, b), rng.integers(0, 2, b)
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  un = u / np.linalg.norm(u, axis=2, keepdims=True)
  paper, extra = [], []
  for i in range(b):
    logits = np.array([[vn[i] @ un[j, k] for k in range(2)] for j in range(n_dom)]).ravel()
    logits = logits / taus[ids[i]]
    logp = logits - np.log(np.sum(np.exp(logits)))
    paper.append(-logp[2 * ids[i] + labels[i]])
    wild = logits[:2] - np.log(np.sum(np.exp(logits[:2])))
    extra.append(-wild[labels[i]])
  args = (jnp.asarray(v), jnp.asarray(u), jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(taus))
  got = gmdf.sis_loss(*args, variant="paper")
  assert float(got) == pytest.approx(np.mean(paper), rel=1e-5)
  got = gmdf.sis_loss(*args, variant="paper+wildcard")
  assert float(got) == pytest.approx(np.mean(paper) + np.mean(extra), rel=1e-5)
  with pytest.raises(ValueError, match="sis variant"):
    gmdf.sis_loss(*args, variant="other")


def _tiny_tower(layers=4):
  cfg = clip.VARIANTS["tiny"]
  vision = dict(cfg["vision"], layers=layers)
  return clip.VisionTransformer(**vision, embed_dim=cfg["embed_dim"])


def _run_with_intermediates(tower, seed=8):
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = tower.init(jax.random.key(seed), x)["params"]
  # Biases and LayerNorm affines away from their init, so that no term hides behind a 0 or 1.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(
    treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
  )
  _, tokens, records = tower.apply(
    {"params": params}, x, return_layers=tuple(range(tower.layers)), record=True
  )
  return x, params, tokens, records


def test_the_recorded_attention_weights_rebuild_the_class_token_output():
  """cls_attn, ln1_std and the q/k/v column layout: the first token's attention output of every
  block, recomputed from them with the block's weights and biases, is the block's own; and
  recording changes nothing in the embedding."""
  tower = _tiny_tower()
  x, params, tokens, inter = _run_with_intermediates(tower)
  recorded = tower.apply({"params": params}, x, record=True)[0]
  np.testing.assert_array_equal(recorded, tower.apply({"params": params}, x))
  heads, d = tower.heads, tower.width
  dh = d // heads
  # The residual entering block b > 0 is block b - 1's output (``return_layers``).
  for b in range(tower.layers):
    blk = inter[b]
    p = params["transformer"][f"resblocks_{b}"]
    a = np.asarray(blk["cls_attn"], np.float64)  # [B, H, T]
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    if b == 0:
      continue
    res = np.asarray(tokens[b - 1], np.float64)  # [B, T, d]
    sigma = np.sqrt(res.var(-1) + 1e-5)
    np.testing.assert_allclose(blk["ln1_std"], sigma, rtol=1e-5)
    y = (res - res.mean(-1, keepdims=True)) / sigma[..., None]
    y = y * np.asarray(p["ln_1"]["scale"]) + np.asarray(p["ln_1"]["bias"])
    kernel, bias = (
      np.asarray(p["attn"]["in_proj"]["kernel"]),
      np.asarray(p["attn"]["in_proj"]["bias"]),
    )
    v = (y @ kernel[:, 2 * d :] + bias[2 * d :]).reshape(*y.shape[:2], heads, dh)
    mixed = np.einsum("bht,bthe->bhe", a, v).reshape(-1, d)
    w_o, b_o = (
      np.asarray(p["attn"]["out_proj"]["kernel"]),
      np.asarray(p["attn"]["out_proj"]["bias"]),
    )
    np.testing.assert_allclose(mixed @ w_o + b_o, blk["cls_out"], rtol=1e-4, atol=1e-5)


def test_second_order_effects_equal_a_brute_force_loop():
  tower = _tiny_tower()
  _, params, _, inter = _run_with_intermediates(tower)
  heads, d = tower.heads, tower.width
  dh = d // heads
  got = gmdf.second_order_effects(params, inter, layers=(0, 1, 2), heads=heads)
  pb = params["transformer"]
  for layer in (0, 1, 2):
    m = np.asarray(inter[layer]["mlp_out"], np.float64)
    n_batch, n_tok, _ = m.shape
    want = np.zeros((n_batch, d))
    for later in range(layer + 1, tower.layers):
      p = pb[f"resblocks_{later}"]
      gamma = np.asarray(p["ln_1"]["scale"], np.float64)
      sigma = np.asarray(inter[later]["ln1_std"], np.float64)
      a = np.asarray(inter[later]["cls_attn"], np.float64)
      kernel = np.asarray(p["attn"]["in_proj"]["kernel"], np.float64)
      w_o = np.asarray(p["attn"]["out_proj"]["kernel"], np.float64)
      for bi in range(n_batch):
        for h in range(heads):
          w_v = kernel[:, 2 * d + h * dh : 2 * d + (h + 1) * dh]  # [d, dh]
          acc = np.zeros(dh)
          for i in range(n_tok):
            c = gamma * (m[bi, i] - m[bi, i].mean()) / sigma[bi, i]
            acc += a[bi, h, i] * (c @ w_v)
          want[bi] += acc @ w_o[h * dh : (h + 1) * dh]
    np.testing.assert_allclose(got[layer], want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="needs a later block"):
    gmdf.second_order_effects(params, inter, layers=(3,), heads=heads)


def _gmdf_with_clip_weights(num_domains=2):
  from flax import traverse_util

  model = gmdf.GMDF("tiny", num_domains=num_domains, so_layers=(0,))
  images = jnp.asarray(np.random.default_rng(9).integers(0, 256, (3, 32, 32, 3)), jnp.uint8)
  params = model.init(jax.random.key(0), images)["params"]
  reference = clip.create_clip("tiny")
  ids = jnp.zeros((1, 77), jnp.int32).at[0, :3].set(jnp.asarray([49406, 320, 49407]))
  base = reference.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), ids)["params"]
  flat = traverse_util.flatten_dict(params)
  for tower in ("visual", "text"):
    for key, value in traverse_util.flatten_dict(base[tower]).items():
      assert (tower, *key) in flat, (tower, key)
      flat[(tower, *key)] = value
  return model, traverse_util.unflatten_dict(flat), images, reference, base


def test_gmdf_starts_at_the_converted_clip_and_scores_without_a_domain():
  model, params, images, reference, base = _gmdf_with_clip_weights()
  x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(clip.CLIP_MEAN)) / jnp.asarray(
    clip.CLIP_STD
  )
  want = reference.apply({"params": base}, x, method=reference.encode_image)
  for domain_ids in (None, jnp.asarray([0, 1, 2])):
    logit, out = model.apply({"params": params}, images, domain_ids=domain_ids, aux=True)
    np.testing.assert_allclose(out["v"], want, rtol=1e-6, atol=1e-6)
    assert logit.shape == (3,) and np.all(np.isfinite(logit))
  assert out["u"].shape == (3, 2, 32) and out["tau"].shape == (3,)
  # Eval and predict call it with images only: the wildcard's logit.
  wild = model.apply({"params": params}, images)
  np.testing.assert_array_equal(
    wild, model.apply({"params": params}, images, domain_ids=jnp.zeros(3, jnp.int32))
  )
  # The second-order term enters through alpha: once alpha moves, v moves.
  moved = dict(params, so_alpha=jnp.ones_like(params["so_alpha"]))
  _, out_moved = model.apply({"params": moved}, images, aux=True)
  assert float(jnp.max(jnp.abs(out_moved["v"] - want))) > 1e-4


def test_gmdf_adds_under_one_percent_of_vit_b16_clip():
  def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

  images = jnp.zeros((1, 224, 224, 3), jnp.uint8)
  model = gmdf.GMDF("vit_b16", num_domains=3)
  added = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  ids = jnp.zeros((1, 77), jnp.int32)
  base = jax.eval_shape(
    lambda: clip.create_clip("vit_b16").init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), ids)
  )
  # Inference reads every GMDF parameter but the MIM head and mask token (training only).
  training_only = count({k: added["params"][k] for k in gmdf.TRAINING_ONLY})
  assert training_only > 0
  extra = count(added) - training_only - (count(base) - 1)  # no logit_scale: its own taus
  assert 0 < extra / count(base) < 0.01, (extra, count(base))
