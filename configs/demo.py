"""The README's main command: ``python -m csdfd_jax.study --config=configs/demo.py ...``.

configs/effnet.py's ``demo`` variant (the procedural demo faces of csdfd_jax/data/demo.py at
64 px, 500 steps of 16 + 16 images per stream, Adam) with a tiny ResNet (one basic block per
stage, 8-64 channels) in place of the tiny EfficientNet. On a 2-core CPU the ResNet's train
step compiles about 4x faster, and it learns both streams within the demo's budget: the
self-blended stream's loss ends near 0.5, where the tiny EfficientNet's ends at 0.63-0.64 on
the same data (and 0.63-0.66 on the demo's base design; the README's demo section gives the
measurements). Use
``--config=configs/effnet.py:demo`` for the same protocol on the EfficientNet.
"""

from __future__ import annotations

import ml_collections

from configs import effnet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"unknown config variant {arg!r} for configs/demo.py; it has none")
  config = effnet.get_config("demo")
  config.model.name = "resnet"
  config.model.variant = "tiny"
  return config
