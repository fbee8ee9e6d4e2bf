"""CS-DFD on the FF++ Xception (paper Table II): ``python train.py --config=configs/xception.py``.

timm's ``legacy_xception`` (FaceForensics++'s Xception, ImageNet weights converted with
``python -m csdfd_jax.models.convert --family xception ...``), mean = std = 0.5 as its
weights expect. Faces stay at the paper's 256 px (Xception's native 299 is not required:
it is fully convolutional with global pooling). Everything else is configs/effnet.py's.
"""

from __future__ import annotations

import ml_collections

from configs import effnet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "demo"):
    raise ValueError(f"unknown config variant {arg!r} for configs/xception.py; valid: demo")
  config = effnet.get_config("demo" if arg == "demo" else None)
  config.model.name = "xception"
  config.model.variant = "tiny" if arg == "demo" else "legacy_xception"
  return config
