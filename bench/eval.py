"""Inference throughput: Flax backbones vs PyTorch timm (eager), and end-to-end video scoring.

Part 1, same backbone, same weights, one run: the timm model's random init converted with
``convert_timm`` to the Flax module, eval mode, pooled features of a [batch, 256, 256, 3]
batch. JAX is one ``jax.jit``; PyTorch runs eagerly under ``torch.inference_mode``. Rounds
are interleaved (JAX, PyTorch, JAX, ...) so machine noise hits both alike; the median of
``--rounds`` rounds of ``--iters`` calls is reported as images/s with the JAX/PyTorch ratio,
compilation and warm-up excluded; PyTorch uses channels_last (its faster convolution path;
``--no-channels_last`` for NCHW). The outputs are compared (max abs difference relative to
the largest PyTorch output) so a fast but wrong model cannot pass unnoticed.

Part 2, ``csdfd_jax.predict`` on the DFDC sample videos (``--videos``, default
../shared/data/dfdc_sample): read ``--frames`` frames uniformly, dlib face detection +
landmarks + crop, the detector (``--e2e_variant``, random weights, 256 px; or a trained run
with ``--workdir``) on padded fixed-size batches. Reported: videos/min and the seconds per
video spent decoding, detecting and in the model (compilation excluded, timed separately).

  python bench/eval.py [--rows b0,b4] [--batch 8] [--iters 2] [--rounds 3] [--size 256]
                       [--no-channels_last]
                       [--frames 16] [--videos DIR_OR_FILES] [--repeat 1] [--workdir RUN]
                       [--skip_e2e] [--skip_backbones]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {"b0": "efficientnet_b0", "b4": "tf_efficientnet_b4"}
DEFAULT_VIDEOS = ROOT.parent / "shared" / "data" / "dfdc_sample"


def backbone_rows(args) -> None:
  import timm
  import torch

  from csdfd_jax.models import efficientnet

  print(
    f"\n[1] backbone inference, {args.size} px, batch {args.batch}, median of {args.rounds} "
    f"interleaved rounds x {args.iters} calls; jax {jax.__version__} ({jax.default_backend()}), "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads, eager, "
    f"{'channels_last' if args.channels_last else 'NCHW'})"
  )
  header = (
    f"{'model':<22}{'JAX img/s':>11}{'torch img/s':>13}{'JAX/torch':>11}"
    f"{'compile s':>11}{'rel. diff':>11}"
  )
  print(header + "\n" + "-" * len(header))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
  for row in args.rows.split(","):
    if row not in ROWS:
      raise SystemExit(f"unknown row {row!r}; valid: {', '.join(ROWS)}")
    variant = ROWS[row]
    torch.manual_seed(0)
    tmodel = timm.create_model(variant, pretrained=False, num_classes=0).eval()
    state = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    model = efficientnet.create(variant, num_classes=0)
    variables = jax.device_put(efficientnet.convert_timm(state, variant))
    fn = jax.jit(lambda v, a, m=model: m.apply(v, a, train=False))
    xj = jax.device_put(x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    if args.channels_last:
      tmodel = tmodel.to(memory_format=torch.channels_last)
      xt = xt.contiguous(memory_format=torch.channels_last)

    def run_jax(n: int, fn=fn, variables=variables, xj=xj):
      for _ in range(n):
        out = fn(variables, xj)
      return np.asarray(jax.block_until_ready(out))

    def run_torch(n: int, tmodel=tmodel, xt=xt):
      with torch.inference_mode():
        for _ in range(n):
          out = tmodel(xt)
      return out.numpy()

    t0 = time.perf_counter()
    out_j = run_jax(1)
    compile_s = time.perf_counter() - t0
    out_t = run_torch(1)
    diff = float(np.max(np.abs(out_j - out_t)) / np.max(np.abs(out_t)))
    speeds: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(args.rounds):
      for name, run in (("jax", run_jax), ("torch", run_torch)):
        t0 = time.perf_counter()
        run(args.iters)
        speeds[name].append(args.batch * args.iters / (time.perf_counter() - t0))
    j, t = statistics.median(speeds["jax"]), statistics.median(speeds["torch"])
    print(f"{variant:<22}{j:>11.2f}{t:>13.2f}{j / t:>11.2f}{compile_s:>11.1f}{diff:>11.1e}")


def videos_of(spec: str) -> list[str]:
  from csdfd_jax import predict

  files, _ = predict.expand_paths(spec.split(","))
  return [f for f in files if predict.media_kind(f) == "video"]


def e2e(args) -> None:
  from csdfd_jax import predict

  videos = videos_of(args.videos)
  if not videos:
    print(f"\n[2] skipped: no video under {args.videos}")
    return
  if args.workdir:
    pred = predict.Predictor.from_run(args.workdir, "best", batch_size=args.e2e_batch)
    what = f"run {args.workdir} ({pred.config.model.variant}, {pred.image_size} px)"
  else:
    from configs import effnet
    from csdfd_jax import train_lib

    config = effnet.get_config()
    config.model.variant = args.e2e_variant
    config.data.image_size = args.size
    model = train_lib.build_model(config)
    dummy = jnp.zeros((1, args.size, args.size, 3), jnp.uint8)
    variables = jax.jit(lambda r: model.init(r, dummy, train=False))(jax.random.PRNGKey(0))
    variables = {k: variables[k] for k in ("params", "batch_stats")}
    pred = predict.Predictor(model, variables, args.size, batch_size=args.e2e_batch)
    what = f"{args.e2e_variant} detector, random weights, {args.size} px"
  compile_s = pred.warmup()
  pred.timings = dict.fromkeys(pred.timings, 0.0)
  print(
    f"\n[2] end-to-end video scoring: {len(videos)} video(s) x {args.repeat}, {args.frames} "
    f"frames each, {what}, batch {args.e2e_batch} (compile {compile_s:.1f} s, excluded)"
  )
  t0 = time.perf_counter()
  results = []
  for _ in range(args.repeat):
    results += pred.predict(videos, frames=args.frames)
  total = time.perf_counter() - t0
  n = len(results)
  faces = sum(r.get("faces", 0) for r in results)
  status = ", ".join(f"{Path(r['file']).name}: {r['status']}" for r in results[: len(videos)])
  per = {k: v / n for k, v in pred.timings.items()}
  other = total / n - sum(per.values())
  print(f"videos: {status}; {faces} faces scored in all")
  header = f"{'videos/min':>11}{'s/video':>9}{'decode':>9}{'detect':>9}{'model':>9}{'other':>8}"
  print(header + "\n" + "-" * len(header))
  print(
    f"{60 * n / total:>11.2f}{total / n:>9.2f}{per['decode']:>9.2f}{per['detect']:>9.2f}"
    f"{per['model']:>9.2f}{other:>8.2f}"
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default="b0,b4", help=f"subset of {', '.join(ROWS)}")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--iters", type=int, default=2, help="calls per timed round")
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
  p.add_argument("--size", type=int, default=256)
  p.add_argument(
    "--channels_last",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="PyTorch in channels_last memory format (its faster CPU/GPU conv path)",
  )
  p.add_argument("--frames", type=int, default=16, help="frames per video (eval uses 32)")
  p.add_argument("--videos", default=str(DEFAULT_VIDEOS), help="dirs/files, comma-separated")
  p.add_argument("--repeat", type=int, default=1, help="passes over the videos")
  p.add_argument("--e2e_variant", default="tf_efficientnet_b4")
  p.add_argument("--e2e_batch", type=int, default=16)
  p.add_argument("--workdir", help="score with this trained run instead")
  p.add_argument("--skip_backbones", action="store_true")
  p.add_argument("--skip_e2e", action="store_true")
  args = p.parse_args()
  print(f"device: {jax.devices()[0].device_kind}; {len(jax.devices())} device(s)")
  if not args.skip_backbones:
    backbone_rows(args)
  if not args.skip_e2e:
    e2e(args)


if __name__ == "__main__":
  main()
