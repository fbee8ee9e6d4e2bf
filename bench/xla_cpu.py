"""Two XLA:CPU slow paths the project works around, each against its replacement in one run.

  stream sum   jnp.sum(g, axis=0) over the 2-stream axis vs g[0] + g[1] (transforms.stream_sum),
               on stacked gradients of an efficientnet_b0 Detector-sized tree
  1x1 conv     lax.conv_general_dilated with a 1x1 kernel vs the channel matrix product that
               efficientnet.Pointwise computes, forward + backward, at EfficientNet-B0 shapes
  b0 step      forward + backward of efficientnet_b0 at 128 px, batch 16 (run it on two
               commits to compare model changes)

Prints medians over --reps calls and the ratio old / new.

  python bench/xla_cpu.py [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csdfd_jax.models import efficientnet
from csdfd_jax.transforms import stream_sum


def median_ms(fn, reps: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  model = efficientnet.create("efficientnet_b0", num_classes=1, drop_rate=0.0, drop_path_rate=0.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 128, 128, 3)), jnp.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1], train=False))()
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), (2, *p.shape)), variables["params"])
  reduce = jax.jit(lambda g: jax.tree.map(lambda u: jnp.sum(u, axis=0), g))
  adds = jax.jit(lambda g: jax.tree.map(stream_sum, g))
  old, new = (median_ms(lambda f=f: f(grads), args.reps) for f in (reduce, adds))
  print(f"stream sum, b0 tree, K=2: jnp.sum {old:.1f} ms, adds {new:.1f} ms: {old / new:.1f}x")

  dn = ("NHWC", "HWIO", "NHWC")
  for h, cin, cout in [(64, 96, 24), (64, 24, 144), (32, 40, 240), (8, 320, 1280)]:
    a = jax.random.normal(jax.random.key(2), (16, h, h, cin))
    w = 0.1 * jax.random.normal(jax.random.key(3), (1, 1, cin, cout))
    conv = lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "VALID", dimension_numbers=dn)  # noqa: E731
    dot = lambda a, w: jnp.dot(a, w[0, 0])  # noqa: E731
    fb = [jax.jit(jax.grad(lambda a, w, f=f: jnp.sum(f(a, w) ** 2), (0, 1))) for f in (conv, dot)]
    old, new = (median_ms(lambda f=f, a=a, w=w: f(a, w), args.reps) for f in fb)
    shape = f"{h}x{h} {cin}->{cout}"
    print(f"1x1 conv fwd+bwd {shape}: conv {old:.1f} ms, dot {new:.1f} ms: {old / new:.1f}x")

  y = jnp.asarray(np.tile([0.0, 1.0], 8))

  def loss(params, stats):
    out, mut = model.apply(
      {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    return optax.sigmoid_binary_cross_entropy(out[:, 0], y).mean(), mut

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  ms = median_ms(lambda: step(variables["params"], variables["batch_stats"]), args.reps)
  print(f"efficientnet_b0 128 px batch 16 forward + backward: {ms:.1f} ms")


if __name__ == "__main__":
  main()
