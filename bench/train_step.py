"""Time per train step: CS-DFD vs O+S in JAX, and O+S in JAX vs the same step in PyTorch (timm).

Three steps at equal images per step (B per stream, 2B per step), timed in one run:

  csdfd        the project's step (``methods.step.make_train_step``) with ``methods.get("csdfd")``:
               per-stream gradients, CGR on phi, UVS on the rest, then SGD (momentum 0.9)
  O+S          the same step with ``methods.get("O+S")``: the summed stream gradients, then SGD
  csdfd exact  csdfd with ``cgr.mode="exact"``: the exact gradient of the conflict loss (Eq. 18)
               on phi by one head-side Hessian-vector product per stream, instead of Eq. 24
  upd csdfd,   only the optimizer part of the two steps above (transform + SGD + apply) on fixed
  upd O+S      random stacked gradients: their difference is csdfd's extra cost, measured without
               the forward/backward noise of the full step
  torch O+S    PyTorch eager, timm backbone + Linear projection (phi) + Linear classifier, each
               stream's forward on its own sub-batch, one backward of the summed BCE losses, SGD

With ``--peers``, the peer methods' steps on the same two streams (o, s) and images per step,
each reported as a ratio to O+S (ERM, one backward pass per step):

  sam           SAM around O+S (``sam.base="O+S"``, one eps from the summed loss): 2 passes
  sam/stream    SAM with one eps per stream (``sam.epsilon="per_stream"``)
  roga fo       RoGA ``first_order`` (SAGM-style, no Hessian-vector product): 2 passes
  roga sg       RoGA ``stopgrad_target``: a gradient, then one forward-over-reverse HVP
  roga exact    RoGA ``exact``: a linearised gradient, one HVP at theta + eps, one linear map
  gr a=1        GR with the PIM on both streams, alpha = 1 (Algorithm 1): a first pass for
                grad_Delta only, then the perturbed pass's weight gradient
  gr a=0.5      GR, alpha = 0.5: the first pass also keeps its weight gradient g1 (Eq. 12)
  dualflat      DualFlat (Eq. 14, alpha 0.4, beta 0.1): GR plus a third, SAM pass in weights

With ``--gmdf``, only GM-DF's rows, on CLIP (``--gmdf_variant``, default vit_b16, at
``--gmdf_size`` px, ``--gmdf_batch`` images per domain x 3 domains), each a ratio to the plain
CLIP fine-tuning step on the same images (``clip ft``: the image tower's pooled class token +
a linear classifier, DeepfakeBench's ``clip`` detector, O+S over the three domain sub-batches,
Adam):

  gmdf fo       GM-DF's step, first order (Eq. 15 literally): the inner pass on the two
                meta-train domains, the outer pass and the masked MIM pass on the meta-test one
  gmdf so       exact MAML: plus one forward-over-reverse product on the meta-train batch

Both frameworks run the same architecture (``Detector``: uint8 input normalised inside the model
with the variant's mean/std, backbone, phi of ``--proj`` units, one logit) from random weights,
dropout and drop-path off. JAX steps are one ``jax.jit`` with the state donated; every step ends
with ``block_until_ready`` (JAX) / a synchronisation (CUDA). The steps are interleaved (csdfd,
O+S, torch, csdfd, ...) so machine noise hits them alike; each round times ``--iters`` steps and
the median over ``--rounds`` rounds is reported, compile / warm-up excluded. Ratios: csdfd/O+S
(the issue's target is <= 1.05x, the paper reports +2%) and JAX O+S / torch O+S (time per step:
below 1 means JAX is faster).

  python bench/train_step.py --gmdf [--gmdf_variant vit_b16] [--gmdf_size 224] [--gmdf_batch 10]
  python bench/train_step.py [--variant efficientnet_b0] [--size 128] [--batch 8] [--rounds 3]
                             [--iters 2] [--no-torch] [--device auto|cpu|gpu] [--dtype float32]
  B4 as in the paper: --variant tf_efficientnet_b4 --size 256 --batch 16  (or --size 380)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csdfd_jax import methods
from csdfd_jax.methods.step import create_train_state, make_step
from csdfd_jax.models import efficientnet
from csdfd_jax.models.heads import Detector

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "effnet.py"


def effnet_config():
  """``configs/effnet.py``'s default config (the paper's c and tau), loaded from its file."""
  spec = importlib.util.spec_from_file_location("effnet_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def pick_device(name: str) -> str:
  """ "cpu" or "gpu"; "auto" is the GPU when JAX sees one."""
  if name == "auto":
    return "gpu" if jax.default_backend() == "gpu" else "cpu"
  return name


def random_batch(streams, batch: int, size: int, seed: int = 0) -> dict:
  """uint8 images and alternating real/fake labels per stream, as the pipeline yields them."""
  rng = np.random.default_rng(seed)
  return {
    s: {
      "image": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
      "label": np.tile(np.array([0, 1], np.int32), batch // 2 + 1)[:batch],
    }
    for s in streams
  }


class JaxStep:
  """The project's jitted, donated train step of ``method`` on an EfficientNet ``Detector``."""

  def __init__(
    self,
    variant,
    method,
    *,
    size,
    batch,
    device,
    dtype=jnp.float32,
    proj=512,
    cgr_mode="eq24",
    overrides=None,
  ):
    config = effnet_config()
    config.cgr.mode = cgr_mode
    for key, value in (overrides or {}).items():
      section, name = key.split(".")
      config[section][name] = value
    backbone = efficientnet.create(
      variant, num_classes=0, dtype=dtype, drop_rate=0.0, drop_path_rate=0.0
    )
    prep = efficientnet.preprocessing(variant)
    model = Detector(backbone, prep["mean"], prep["std"], projection_dims=(proj,), dtype=dtype)
    m = methods.get(method, config)
    tx = optax.chain(m.transform, optax.sgd(1e-3, momentum=0.9))
    self._setup(model, m, tx, random_batch(m.streams, batch, size), size, device)

  def _setup(self, model, m, tx, batch: dict, size: int, device: str) -> None:
    """Initial state and batch on ``device`` and the jitted, donated step of method ``m``."""
    self.device = jax.devices(device)[0]
    with jax.default_device(self.device):
      variables = jax.jit(partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8)
      )
      variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
      state = create_train_state(variables, tx, jax.random.key(1))
      # Fresh buffers per leaf: optimizer states may alias arrays, and the step donates them.
      state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    # Committed like the step's outputs: otherwise the second call compiles the step again.
    self.state = jax.device_put(state, self.device)
    self.batch = jax.device_put(batch, self.device)
    train_step = make_step(
      m.gradient_fn(model), tx, m.streams, diagnostics=m.diagnostics, axes=m.update_axes
    )
    self.step = jax.jit(train_step, donate_argnums=0)
    self.images_per_step = len(m.streams) * len(batch[m.streams[0]]["label"])
    self.tx, self.streams = tx, m.streams

  def run(self, iters: int) -> None:
    for _ in range(iters):
      self.state, metrics = self.step(self.state, self.batch)
      jax.block_until_ready(metrics)


class JaxUpdate:
  """Only the optimizer part of ``step``: ``tx.update`` of fixed random stacked gradients
  [K, ...] (the method's transform, then SGD) and ``apply_updates``, jitted and donated.
  The difference between two methods' rows is their update's cost, free of the forward and
  backward passes that dominate (and add noise to) the full step."""

  def __init__(self, step: JaxStep):
    params, opt_state = step.state.params, step.state.opt_state
    k = len(step.streams)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(params))))
    grads = jax.tree.map(
      lambda p: 1e-3 * jax.random.normal(next(keys), (k, *p.shape), p.dtype), params
    )
    self.grads = jax.device_put(grads, step.device)
    fresh = jax.tree.map(lambda x: jnp.array(x, copy=True), (params, opt_state))
    self.state = jax.device_put(fresh, step.device)
    tx = step.tx

    def update(state, grads):
      params, opt_state = state
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self.update = jax.jit(update, donate_argnums=0)
    self.images_per_step = None

  def prepare(self) -> None:
    """One untimed update before each round: right after a multi-GB train step, the first
    update pays page faults on freshly mapped memory (measured 0.8 s against 0.06 s for
    B4 at 256 px), a cost of the interleaving that the fused train step never sees."""
    self.run(1)

  def run(self, iters: int) -> None:
    for _ in range(iters):
      self.state = self.update(self.state, self.grads)
      jax.block_until_ready(self.state)


class TorchStep:
  """O+S in PyTorch eager: timm backbone + projection + classifier, summed per-stream BCE, SGD."""

  def __init__(self, variant, *, size, batch, device, proj=512):
    import timm
    import torch

    self.torch = torch
    self.device = torch.device(device)
    torch.manual_seed(0)
    backbone = timm.create_model(
      variant, pretrained=False, num_classes=0, drop_rate=0.0, drop_path_rate=0.0
    )
    prep = efficientnet.preprocessing(variant)
    self.mean = torch.tensor(prep["mean"], device=self.device).view(1, 3, 1, 1) * 255
    self.std = torch.tensor(prep["std"], device=self.device).view(1, 3, 1, 1) * 255
    self.model = torch.nn.Sequential(
      backbone, torch.nn.Linear(backbone.num_features, proj), torch.nn.Linear(proj, 1)
    )
    self.model.to(self.device).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
    self.batch = {
      s: (
        torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous().to(self.device),
        torch.from_numpy(b["label"]).float().to(self.device),
      )
      for s, b in random_batch(("o", "s"), batch, size).items()
    }
    self.images_per_step = 2 * batch

  def run(self, iters: int) -> None:
    torch = self.torch
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(iters):
      self.opt.zero_grad(set_to_none=True)
      loss = 0.0
      for images, labels in self.batch.values():
        x = (images.float() - self.mean) / self.std
        loss = loss + bce(self.model(x)[:, 0], labels)
      loss.backward()
      self.opt.step()
      if self.device.type == "cuda":
        torch.cuda.synchronize()
      loss.item()


class ClipStep(JaxStep):
  """A jitted, donated train step on CLIP over three domain sub-batches: GM-DF (``gmdf``) from
  ``configs/gmdf.py``, or the plain fine-tuning baseline (``O+S`` on a ``Detector`` whose
  backbone is CLIP's image tower, pooled class token, + one linear logit)."""

  def __init__(self, variant, method, *, size, batch, device, order=1):  # noqa: PLR0913
    import sys

    sys.path.insert(0, str(CONFIG.parents[1]))  # the repository root: configs/
    from configs import gmdf as gmdf_configs
    from csdfd_jax.models import clip, detector

    config = gmdf_configs.get_config()
    config.model.variant = variant
    config.gmdf.maml_order = order
    if variant == "tiny":  # two blocks: the second-order term reads the first
      config.gmdf.so_layers = (1,)
    domains = tuple(config.gmdf.domains.split(","))
    config.data.streams = config.gmdf.domains
    if method == "gmdf":
      model = detector.build(config)
    else:
      backbone = clip.create(variant, project=False)
      model = Detector(backbone, clip.CLIP_MEAN, clip.CLIP_STD, projection_dims=())
    m = methods.get(method, config)
    batch_ = random_batch(m.streams, batch, size)
    for i, d in enumerate(domains):
      batch_[d]["domain"] = np.full((batch,), i + 1, np.int32)
    self._setup(model, m, m.full_optimizer(optax.adam(3e-6)), batch_, size, device)


def gmdf_main(args) -> None:
  device = pick_device(args.device)
  shape = dict(size=args.gmdf_size, batch=args.gmdf_batch, device=device)
  runners, compile_s = {}, {}
  for name, method, order in (
    ("clip ft", "O+S", 1),
    ("gmdf fo", "gmdf", 1),
    ("gmdf so", "gmdf", 2),
  ):
    start = time.perf_counter()
    runners[name] = ClipStep(args.gmdf_variant, method, order=order, **shape)
    runners[name].run(1)
    compile_s[name] = time.perf_counter() - start
  print(f"device: {device} ({jax.devices(device)[0].device_kind}); jax {jax.__version__}")
  print(
    f"CLIP {args.gmdf_variant} {args.gmdf_size}px float32, {args.gmdf_batch} images per domain x "
    f"3 domains = {3 * args.gmdf_batch} images per step; {args.rounds} rounds x {args.iters} steps"
  )
  med = timed_table(runners, compile_s, args.rounds, args.iters)
  for name in ("gmdf fo", "gmdf so"):
    print(f"{name} / clip ft, time per step: {med[name] / med['clip ft']:.3f}x")


def timed_table(runners: dict, compile_s: dict, rounds: int, iters: int) -> dict[str, float]:
  """Times the runners (``time_rounds``), prints one row each, returns the medians."""
  times = time_rounds(runners, rounds, iters)
  med = {name: statistics.median(t) for name, t in times.items()}
  print(f"{'step':<12}{'ms/step':>10}{'img/s':>9}{'setup+compile s':>17}   rounds ms/step")
  for name, t in times.items():
    n = runners[name].images_per_step
    ips = f"{n / med[name]:.2f}" if n else "-"
    rounds_ms = " ".join(f"{1e3 * x:.1f}" for x in t)
    print(f"{name:<12}{1e3 * med[name]:>10.1f}{ips:>9}{compile_s[name]:>17.1f}   {rounds_ms}")
  return med


def time_rounds(runners: dict, rounds: int, iters: int) -> dict[str, list[float]]:
  """Seconds per step of each runner, ``rounds`` interleaved rounds of ``iters`` steps."""
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, runner in runners.items():
      getattr(runner, "prepare", lambda: None)()
      start = time.perf_counter()
      runner.run(iters)
      times[name].append((time.perf_counter() - start) / iters)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="efficientnet_b0", help="timm EfficientNet name")
  parser.add_argument("--size", type=int, default=128, help="input side in pixels")
  parser.add_argument("--batch", type=int, default=8, help="images per stream (2 streams)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
  parser.add_argument("--iters", type=int, default=2, help="steps per timed round")
  parser.add_argument("--proj", type=int, default=512, help="width of phi")
  parser.add_argument("--no-torch", action="store_true", help="only csdfd vs O+S")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
  parser.add_argument(
    "--peers", action="store_true", help="add the sam, roga, gr and dualflat rows"
  )
  parser.add_argument("--gmdf", action="store_true", help="only GM-DF's rows, on CLIP")
  parser.add_argument("--gmdf_variant", default="vit_b16", help="CLIP variant (models.clip)")
  parser.add_argument("--gmdf_size", type=int, default=224, help="CLIP input side in pixels")
  parser.add_argument("--gmdf_batch", type=int, default=10, help="images per domain (3 domains)")
  args = parser.parse_args()
  if args.gmdf:
    if args.gmdf_batch < 2 or args.gmdf_batch % 2:
      raise SystemExit("--gmdf_batch must be even (half real, half fake per domain)")
    return gmdf_main(args)
  if args.batch < 2 or args.batch % 2:
    raise SystemExit("--batch must be even (half real, half fake per stream)")
  device = pick_device(args.device)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  shape = dict(size=args.size, batch=args.batch, device=device)

  runners, compile_s = {}, {}
  for name, method, mode in (
    ("csdfd", "csdfd", "eq24"),
    ("O+S", "O+S", "eq24"),
    ("csdfd exact", "csdfd", "exact"),
  ):
    start = time.perf_counter()
    runners[name] = JaxStep(
      args.variant, method, dtype=dtype, proj=args.proj, cgr_mode=mode, **shape
    )
    runners[name].run(1)
    compile_s[name] = time.perf_counter() - start
  peers = {
    "sam": ("sam", {"sam.base": "O+S"}),
    "sam/stream": ("sam", {"sam.base": "O+S", "sam.epsilon": "per_stream"}),
    "roga fo": ("roga", {"roga.mode": "first_order"}),
    "roga sg": ("roga", {"roga.mode": "stopgrad_target"}),
    "roga exact": ("roga", {"roga.mode": "exact"}),
    "gr a=1": ("gr", {"gr.streams": "o,s", "gr.alpha": 1.0}),
    "gr a=0.5": ("gr", {"gr.streams": "o,s", "gr.alpha": 0.5}),
    "dualflat": ("dualflat", {"gr.streams": "o,s", "dualflat.alpha": 0.4, "dualflat.beta": 0.1}),
  }
  for name, (method, overrides) in peers.items() if args.peers else ():
    start = time.perf_counter()
    runners[name] = JaxStep(
      args.variant, method, dtype=dtype, proj=args.proj, overrides=overrides, **shape
    )
    runners[name].run(1)
    compile_s[name] = time.perf_counter() - start
  for method in ("csdfd", "O+S"):
    start = time.perf_counter()
    runners[f"upd {method}"] = JaxUpdate(runners[method])
    runners[f"upd {method}"].run(1)
    compile_s[f"upd {method}"] = time.perf_counter() - start
  if not args.no_torch:
    import torch

    torch_device = "cuda" if device == "gpu" else "cpu"
    if args.dtype != "float32":
      raise SystemExit("the torch peer runs float32 only: pass --no-torch with --dtype bfloat16")
    start = time.perf_counter()
    runners["torch O+S"] = TorchStep(
      args.variant, proj=args.proj, **shape | {"device": torch_device}
    )
    runners["torch O+S"].run(1)
    compile_s["torch O+S"] = time.perf_counter() - start
    torch_info = (
      f"; torch {torch.__version__} on {torch_device} ({torch.get_num_threads()} threads)"
    )
  else:
    torch_info = ""

  print(
    f"device: {device} ({jax.devices(device)[0].device_kind}); jax {jax.__version__}{torch_info}"
  )
  print(
    f"{args.variant} {args.size}px {args.dtype}, {args.batch} images per stream x 2 streams = "
    f"{2 * args.batch} images per step; phi {args.proj}; {args.rounds} rounds x {args.iters} steps"
  )
  med = timed_table(runners, compile_s, args.rounds, args.iters)
  print(f"csdfd / O+S (JAX), time per step: {med['csdfd'] / med['O+S']:.3f}x (target <= 1.05x)")
  print(f"csdfd exact CGR / csdfd Eq. 24, time per step: {med['csdfd exact'] / med['csdfd']:.3f}x")
  extra = med["upd csdfd"] - med["upd O+S"]
  print(
    f"update only: csdfd {1e3 * med['upd csdfd']:.1f} ms vs O+S {1e3 * med['upd O+S']:.1f} ms; "
    f"the difference is {100 * extra / med['O+S']:.1f}% of the O+S step, i.e. csdfd / O+S "
    f"= {1 + extra / med['O+S']:.3f}x from the update alone"
  )
  for name in peers if args.peers else ():
    print(f"{name} / O+S (ERM), time per step: {med[name] / med['O+S']:.3f}x")
  if "torch O+S" in med:
    ratio = med["O+S"] / med["torch O+S"]
    print(f"JAX O+S / torch O+S, time per step: {ratio:.3f}x (below 1: JAX faster)")


if __name__ == "__main__":
  main()
