"""Every config file and variant loads, names a known method and a model that builds."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from csdfd_jax import methods, train_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import demo, effnet, gr, roga, vit, xception  # noqa: E402

CASES = [
  (demo, None),
  (effnet, None),
  (effnet, "demo"),
  (effnet, "ffhq_mini"),
  (effnet, "k_streams"),
  (effnet, "sbi_recipe"),
  (roga, None),
  (roga, "demo"),
  (roga, "gid_df"),
  (roga, "gid_nt,first_order"),
  (roga, "alpha_text"),
  (roga, "ablation_b"),
  (roga, "ablation_c"),
  (roga, "sam"),
  (roga, "demo,sam"),
  (gr, None),
  (gr, "demo"),
  (gr, "sbi"),
  (gr, "effb4"),
  (gr, "resnet50"),
  (gr, "xception"),
  (gr, "dualflat"),
  (gr, "demo,sbi,dualflat"),
  (vit, None),
  (vit, "large"),
  (vit, "demo"),
  (xception, None),
  (xception, "demo"),
]


@pytest.mark.parametrize("module,arg", CASES, ids=[f"{m.__name__}:{a}" for m, a in CASES])
def test_config_builds_its_model(module, arg):
  config = module.get_config(arg)
  config.lock()
  assert config.method in methods.METHODS
  assert config.uvs.c == 0.5 and config.cgr.tau == 0.01  # the paper's values
  methods.get(config.method, config)  # the method builds from the config
  model = train_lib.build_model(config)
  size = config.data.image_size
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.uint8))
  )
  assert ("projection" in shapes["params"]) == bool(config.model.projection_dims)
  assert "classifier" in shapes["params"]
  with pytest.raises(AttributeError):
    config.data.batchsize = 8  # a locked config refuses unknown keys


@pytest.mark.parametrize("module,arg", CASES, ids=[f"{m.__name__}:{a}" for m, a in CASES])
def test_config_optimizer_options_are_all_read(module, arg):
  """No config sets an option its optimizer would ignore (that is refused at start)."""
  config = module.get_config(arg)
  train_lib.base_optimizer(config, train_lib.learning_rate_schedule(config))


def test_roga_protocols_declare_their_domains():
  assert roga.get_config().data.streams == "Deepfakes,Face2Face,FaceSwap,NeuralTextures"
  config = roga.get_config("gid_f2f,first_order")
  assert config.data.streams == "Deepfakes,FaceSwap,NeuralTextures"
  assert config.roga.mode == "first_order" and config.roga.alpha == 0.001
  assert methods.get("roga", config).streams == ("Deepfakes", "FaceSwap", "NeuralTextures")
  assert roga.get_config("alpha_text").roga.alpha == 0.0002  # Sec. V-A's value
  assert roga.get_config("ablation_b").roga.alpha == 0.0
  sam = roga.get_config("sam")
  assert sam.method == "sam" and methods.get("sam", sam).streams == tuple(roga.DOMAINS)
  for bad in ("gid_df,gid_fs", "demo,gid_df"):
    with pytest.raises(ValueError, match="gid"):
      roga.get_config(bad)


def test_gr_variants():
  assert gr.get_config().method == "gr" and gr.get_config("sbi").gr.streams == "s"
  flat = gr.get_config("dualflat")
  assert flat.method == "dualflat" and (flat.dualflat.alpha, flat.dualflat.beta) == (0.4, 0.1)
  assert gr.get_config("effb4").data.image_size == 380
  for bad in ("effb4,resnet50", "demo,xception"):
    with pytest.raises(ValueError, match="at most one model"):
      gr.get_config(bad)


def test_unknown_variant_is_refused():
  for module in (effnet, gr, roga, vit, xception):
    with pytest.raises(ValueError, match="valid"):
      module.get_config("nope")
  with pytest.raises(ValueError, match="has none"):
    demo.get_config("nope")


def test_demo_is_the_effnet_demo_on_a_tiny_resnet():
  """The main command's config differs from configs/effnet.py:demo in the backbone only."""
  ours, theirs = demo.get_config().to_dict(), effnet.get_config("demo").to_dict()
  assert (ours["model"]["name"], ours["model"]["variant"]) == ("resnet", "tiny")
  assert ours.pop("model") != theirs.pop("model")
  assert ours == theirs
  assert (theirs["data"]["demo_grain"], theirs["data"]["demo_fingerprint"]) == (2.5, 2.0)
