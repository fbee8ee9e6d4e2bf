"""Every config file and variant loads, names a known method and a model that builds."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from csdfd_jax import methods, train_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import effnet, vit, xception  # noqa: E402

CASES = [
  (effnet, None),
  (effnet, "demo"),
  (effnet, "ffhq_mini"),
  (effnet, "k_streams"),
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
  model = train_lib.build_model(config)
  size = config.data.image_size
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.uint8))
  )
  assert "projection" in shapes["params"] and "classifier" in shapes["params"]
  with pytest.raises(AttributeError):
    config.data.batchsize = 8  # a locked config refuses unknown keys


@pytest.mark.parametrize("module,arg", CASES, ids=[f"{m.__name__}:{a}" for m, a in CASES])
def test_config_optimizer_options_are_all_read(module, arg):
  """No config sets an option its optimizer would ignore (that is refused at start)."""
  config = module.get_config(arg)
  train_lib.base_optimizer(config, train_lib.learning_rate_schedule(config))


def test_unknown_variant_is_refused():
  for module in (effnet, vit, xception):
    with pytest.raises(ValueError, match="valid"):
      module.get_config("nope")
