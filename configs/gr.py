"""Gradient regularisation with a Perturbation Injection Module (Guan et al., TIFS 2024):
``python train.py --config=configs/gr.py[:variants]``; the method is ``csdfd_jax/methods/gr.py``.

The paper's setting (Sec. V-A; Table V's "Ours FF++"): ConvNeXt-B with ImageNet weights (timm
``convnext_base.fb_in1k``, converted once with ``python -m csdfd_jax.models.convert``) and a
linear classifier, 224 px, FF++ reals and fakes (stream o), batch 64, 8 frames per training
video, no augmentation, PIM after the first stage ("all three blocks of the first stage"),
r = 0.1, alpha = 1. Scored at the video level on 32 frames. The paper gives no learning rate,
schedule or compression: SGD lr 1e-3 with momentum 0.9 and a linear decay over the last
quarter (SBI's recipe, the library's default) and FF++ c23 are this config's choices.

Variants, combinable with commas (``configs/gr.py:sbi,dualflat``):
  sbi       Table V row 2: FF++ reals and their SBI fakes (stream s) with the PIM in place of
            SBI's SAM.
  effb4     EfficientNet-B4 at 380 px (Table IV), PIM after stage 0.
  resnet50  ResNet-50 (Table IV), PIM after layer1.
  xception  Xception (Table IV), PIM after block1.
  dualflat  DualFlat (Eq. 14), alpha = 0.4 and beta = 0.1 with r' = 0.05: Table VIII's best
            row that keeps both terms (avg 77.00; the best overall is alpha = 1, beta = 0,
            plain GR, 77.09, which the paper's text also concludes).
  demo      the embedded demo: a tiny ConvNeXt, 64 px, a few minutes on a CPU.

Not reproduced: Table IV's "With" augmentations (RGBShift, HueSaturationValue, GaussNoise, ...)
are not in the pipeline.
"""

from __future__ import annotations

import ml_collections

from configs import effnet, parse_variants

VARIANTS = ("demo", "sbi", "effb4", "resnet50", "xception", "dualflat")
MODELS = {
  "effb4": ("efficientnet", "tf_efficientnet_b4", 380),
  "resnet50": ("resnet", "resnet50", 224),
  "xception": ("xception", "legacy_xception", 299),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = parse_variants(arg, VARIANTS, "configs/gr.py")
  chosen = [v for v in variants if v in MODELS]
  if len(chosen) > 1 or (chosen and "demo" in variants):
    raise ValueError(f"configs/gr.py: at most one model among demo, {', '.join(MODELS)}")
  demo = "demo" in variants
  config = effnet.get_config("demo" if demo else None)
  config.method = "dualflat" if "dualflat" in variants else "gr"
  config.model.name = "convnext"
  config.model.variant = "tiny" if demo else "convnext_base"
  config.model.projection_dims = (64,) if demo else ()  # ConvNeXt-B + a linear classifier
  if not demo:
    config.data.image_size = 224
    config.data.batch_size = 64
    config.data.train_frames = 8
    config.train.num_steps = 40_000
  if chosen:
    config.model.name, config.model.variant, config.data.image_size = MODELS[chosen[0]]
  config.gr.streams = "s" if "sbi" in variants else "o"
  config.gr.r = 0.1
  config.gr.alpha = 1.0
  config.gr.sites = ""  # the family's default: after the first stage
  if "dualflat" in variants:
    config.dualflat.alpha, config.dualflat.beta, config.dualflat.r_sam = 0.4, 0.1, 0.05
  return config
