"""Cost of the UVS/CGR transforms against the plain summed-gradient optimizer step.

Builds a parameter tree of the size of a real backbone (default: 19.3M parameters in
leaves shaped like EfficientNet-B4's, plus a 1792x512 projection layer), stacks K random
stream gradients and times one jitted optimizer update, all variants interleaved in the
same run so that machine noise hits them alike:

  sum+adam     sum the K streams, then optax.adam            (the O+S baseline; the sum
               is uvs(c=0), so all variants sum the streams with the same code)
  uvs+adam     optax.chain(uvs(), optax.adam)
  csdfd+adam   csdfd(optax.adam): UVS on the rest, CGR on the projection layer

Prints the median time per update and the ratio to sum+adam. This measures the
optimizer step alone; against a full train step (forward + backward of the network) the
overhead is far smaller, which bench/train_step.py will measure once training exists.

  python bench/transforms.py [--params 19.3e6] [--streams 2] [--rounds 7]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csdfd_jax.transforms import csdfd, uvs


def make_params(total: float) -> dict:
  """Conv-like leaves of mixed sizes adding up to about ``total`` parameters."""
  shapes, count, i = {}, 0, 0
  sizes = [(3, 3, 1, 384), (1, 1, 384, 64), (1, 1, 64, 384), (384,), (1, 1, 160, 960), (960,)]
  while count < total:
    shape = sizes[i % len(sizes)]
    shapes[f"block{i}"] = shape
    count += int(np.prod(shape))
    i += 1
  params = {"backbone": {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}}
  params["projection"] = {"kernel": jnp.zeros((1792, 512)), "bias": jnp.zeros((512,))}
  params["classifier"] = {"kernel": jnp.zeros((512, 1)), "bias": jnp.zeros((1,))}
  return params


def timed(fn, *args, reps: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--params", type=float, default=19.3e6)
  parser.add_argument("--streams", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  k = args.streams
  params = make_params(args.params)
  n = sum(x.size for x in jax.tree.leaves(params))
  key = jax.random.key(0)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  grads = treedef.unflatten(
    [jax.random.normal(kk, (k, *x.shape)) for kk, x in zip(keys, leaves, strict=True)]
  )

  variants = {
    "sum+adam": optax.chain(uvs(0.0, num_streams=k), optax.adam(1e-3)),
    "uvs+adam": optax.chain(uvs(num_streams=k), optax.adam(1e-3)),
    "csdfd+adam": csdfd(optax.adam(1e-3), num_streams=k),
  }
  steps = {}
  for name, tx in variants.items():
    state = tx.init(params)
    steps[name] = (jax.jit(tx.update), state)
  times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, (fn, state) in steps.items():
      times[name].append(timed(fn, grads, state, params))

  print(f"{jax.devices()[0].device_kind}, {n / 1e6:.1f}M parameters, K = {k} streams")
  base = np.median(times["sum+adam"])
  print(f"{'variant':<12} {'ms/update':>10} {'ratio':>7}")
  for name in variants:
    med = np.median(times[name])
    print(f"{name:<12} {1e3 * med:>10.1f} {med / base:>7.2f}")


if __name__ == "__main__":
  main()
