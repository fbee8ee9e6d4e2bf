"""CS-DFD on ViT (paper Table II): ``python train.py --config=configs/vit.py[:large|demo]``.

Everything not listed here is configs/effnet.py's (c = 0.5, tau = 0.01, 256 px faces,
batch 16 per stream). ViT-B/16 and ViT-L/16 run at 256 px by resampling their 224 px
position embeddings (16x16 patches of a 256 px face). The paper does not give the ViT
optimizer; AdamW with a lower learning rate is the usual recipe for fine-tuning ViTs
(SGD at 1e-3 is unstable for them), so that is the default here.
"""

from __future__ import annotations

import ml_collections

from configs import effnet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "base", "large", "demo"):
    raise ValueError(f"unknown config variant {arg!r} for configs/vit.py; valid: base, large, demo")
  config = effnet.get_config("demo" if arg == "demo" else None)
  config.model.name = "vit"
  config.model.variant = "vit_large_patch16_224" if arg == "large" else "vit_base_patch16_224"
  config.optim.name = "adamw"
  config.optim.momentum = 0.0
  config.optim.learning_rate = 3e-5
  config.optim.weight_decay = 0.05
  config.optim.warmup_steps = 1_000
  if arg == "demo":
    config.model.variant = "tiny"
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = 20
  return config
