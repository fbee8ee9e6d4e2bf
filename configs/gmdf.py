"""GM-DF, multi-scenario deepfake detection on CLIP (Lai et al., ACM MM 2025): ``python train.py
--config=configs/gmdf.py[:variants]``; the method is ``csdfd_jax/methods/gmdf.py``, the detector
``csdfd_jax/models/gmdf.py``. ``../shared/notes/peers.md`` section 3 holds every choice below.

The paper's setting (Sec. 4.1): CLIP ViT-B/16 (OpenAI's weights, converted once with both towers:
``python -m csdfd_jax.models.convert --family clip --variant vit_b16 --source openai --input
ViT-B-16.pt --output weights/clip_b16.npz``, then ``--config.model.init=weights/clip_b16.npz``),
224 px crops, Adam lr 3e-6 on the base, 40 epochs. Values the paper does not give (notes 3.5):
the inner SGD lr beta = 1e-3 on the experts and domain embeddings, first-order meta-gradients
(Eq. 15's partial derivative), tau_base = 0.07, phi = 0.01, wildcard domain dropout 0.2, MIM as
normalised-pixel regression at a 20% random mask (the dVAE tokenizer is unavailable), the
domain-alignment loss of the arXiv version on (weight 1), the text tower frozen. Per step each
training domain gives ``data.batch_size`` images (half real, half fake): 10 per domain for three
domains, the paper's batch of 32 rounded to a class-balanced 30. The number of steps stands for
40 epochs of about 8 frames per training video; set ``train.num_steps`` from your data.

Protocols (``--config=configs/gmdf.py:<one of these>[,<options>]``):
  ffpp_cdf_dff (default), ffpp_cdf_wdf, ffpp_dff_wdf, cdf_dff_wdf
             Table 4: train on three datasets, each a domain (the records' ``dataset`` column);
             test on the fourth and DFDC, e.g. ``python eval.py --workdir=W
             --test_sets=wdf=R@wilddeepfake,dfdc=R@dfdc`` (eval.py prints AUC, EER and M_EER).
             Build the training records from one face store holding the three datasets
             (``python -m csdfd_jax.data.preprocess`` once per layout into the same --out
             store, then ``python -m csdfd_jax.data.builder``). DFF (diffusion faces) has no
             indexer here: lay it out as ``<root>/{train,val,test}/{real,fake}/`` and use the
             generic layout, ``--dataset folder --option dataset=dff``.
  single_ffpp  Tables 1-3: FF++ alone; its four manipulations are the domains (meta-learning
             needs at least two), every domain sharing FF++'s reals.
  gid_df, gid_f2f  Table 2: three FF++ manipulations as domains, the fourth held out.
Options:
  second_order  exact MAML (the gradient through the inner step); about twice a step's cost.
  literal      the paper's equations as written: L_sis over all prompts only (``sis="paper"``),
               no domain-alignment loss (Eq. 14 omits it), no wildcard dropout.
  demo         a tiny CLIP with random weights on the embedded demo data, its o and s streams
               as the two training domains (a smoke test of the whole path, no download).
"""

from __future__ import annotations

import ml_collections

from configs import effnet, parse_variants

DATASETS = {"ffpp": "ffpp", "cdf": "celebdf_v2", "dff": "dff", "wdf": "wilddeepfake"}
COMBOS = ("ffpp_cdf_dff", "ffpp_cdf_wdf", "ffpp_dff_wdf", "cdf_dff_wdf")
MANIPULATIONS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
GID = {"gid_df": "Deepfakes", "gid_f2f": "Face2Face"}
PROTOCOLS = (*COMBOS, "single_ffpp", *GID, "demo")
VARIANTS = (*PROTOCOLS, "second_order", "literal")


def gmdf_section() -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  g.domains = ""  # comma-separated training domains, ids 1..D in this order (0: the wildcard)
  g.domain_kind = "dataset"  # "dataset" | "manipulation" | "stream" (methods.gmdf.domain_specs)
  # the detector (models.gmdf.GMDF)
  g.num_experts = 0  # 0: one expert per training domain
  g.expert_dim = 16  # the experts' bottleneck r
  g.domain_dim = 16  # k, the width of the domain codes c_d
  g.so_layers = (8, 9, 10)  # 1-indexed blocks of the second-order aggregation (Eq. 7-8)
  g.tau_base = 0.07  # Eq. 10
  g.phi = 0.01
  # the losses (Eq. 11-14)
  g.sis = "paper+wildcard"  # or "paper" (Eq. 11 literally)
  g.wildcard_prob = 0.2  # domain dropout: a training sample's id -> the wildcard
  g.lambda_cls = 1.0
  g.lambda_sis = 1.0
  g.lambda_mim = 1.0  # 0: no MIM (and no MIM parameters)
  g.lambda_da = 1.0  # the domain-alignment loss of the arXiv version; 0: Eq. 14 as printed
  g.mim_ratio = 0.2
  g.mim_target = "norm_pixels"  # the dVAE tokenizer of Eq. 6 is not available
  # the Meta-Domain-Embedding Optimizer (Eq. 13-15)
  g.inner_lr = 1e-3  # beta, SGD on theta_E, committed every step
  g.maml_order = 1  # 1: Eq. 15's partial derivative; 2: exact MAML
  g.freeze_text = True
  return g


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = parse_variants(arg, VARIANTS, "configs/gmdf.py")
  protocols = [v for v in variants if v in PROTOCOLS]
  if len(protocols) > 1:
    raise ValueError(f"configs/gmdf.py: one protocol at most, got {', '.join(protocols)}")
  protocol = protocols[0] if protocols else COMBOS[0]
  demo = protocol == "demo"
  config = effnet.get_config("demo" if demo else None)
  config.method = "gmdf"
  config.reduction = "sum"
  config.model.name = "clip"
  config.model.detector = "gmdf"
  config.model.projection_dims = ()  # unused: the prompt head scores
  config.gmdf = gmdf_section()
  g = config.gmdf

  config.optim.name = "adam"
  config.optim.momentum = 0.0
  if demo:
    config.model.variant = "tiny"
    g.domains, g.domain_kind = "o,s", "stream"
    g.so_layers = (1,)  # the tiny tower has two blocks
    config.optim.learning_rate = 1e-3
    config.train.num_steps = 60
    config.train.eval_every = 60
    config.train.checkpoint_every = 30
  else:
    config.model.variant = "vit_b16"
    config.data.image_size = 224
    config.data.fake_domains = ""
    config.optim.learning_rate = 3e-6
    config.optim.warmup_steps = 0
    config.optim.decay_start = 1.0  # the paper names no schedule
    config.train.num_steps = 40_000
    if protocol in COMBOS:
      g.domains = ",".join(DATASETS[d] for d in protocol.split("_"))
      g.domain_kind = "dataset"
      config.data.batch_size = 10  # per domain: 3 x 10 = 30
    else:
      held = GID.get(protocol)
      g.domains = ",".join(m for m in MANIPULATIONS if m != held)
      g.domain_kind = "manipulation"
      config.data.batch_size = 8 if protocol == "single_ffpp" else 10
      config.data.fake_domains = "four"
  if "second_order" in variants:
    g.maml_order = 2
  if "literal" in variants:
    g.sis, g.lambda_da, g.wildcard_prob = "paper", 0.0, 0.0
  return config
