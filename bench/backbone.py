"""Training throughput of the Flax backbones against PyTorch timm (eager), same machine, one run.

One training step = forward in train mode + cross-entropy + backward + SGD update, on the same
weights in both frameworks (the timm model's random init converted with ``convert_timm``),
dropout and drop-path off in both. JAX steps are one ``jax.jit`` with donated buffers; PyTorch
runs eagerly (``torch.autocast`` for bf16). Measurements are interleaved (JAX, PyTorch, JAX, ...)
so machine noise hits both alike; the median of ``--rounds`` rounds of ``--iters`` steps is
reported as images/s with the JAX/PyTorch ratio, compile/warm-up excluded. Memory: on CPU the
process's peak RSS during each framework's steps, and Δ, that peak minus the RSS before that
framework's runner was built (its training state, activations and, for JAX, executable; the
process holds both frameworks, so compare the Δ columns); on GPU the device's peak allocation.

  python bench/backbone.py [--batch 4] [--iters 2] [--rounds 2] [--rows b0,b4_256,b4_380,vit]
                           [--dtype float32|bfloat16] [--device auto|cpu|gpu]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import re
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import timm
import torch

ROWS = {  # name: (family, variant, input size)
  "b0": ("efficientnet", "tf_efficientnet_b0", 224),
  "b4_256": ("efficientnet", "tf_efficientnet_b4", 256),
  "b4_380": ("efficientnet", "tf_efficientnet_b4", 380),
  "vit": ("vit", "vit_base_patch16_224", 224),
}


def _rss_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _trimmed_rss_mib() -> float:
  """Current RSS after handing freed heap pages back to the OS (glibc), so that garbage left
  by a compile is not counted as the next runner's baseline."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass
  return _rss_mib("VmRSS")


def _reset_peak_rss() -> float:
  """Resets the kernel's peak-RSS counter (Linux) and returns the current RSS in MiB."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _rss_mib("VmRSS")


class JaxRunner:
  def __init__(self, family, variant, state_dict, dtype, batch, size, device):
    module = importlib.import_module(f"csdfd_jax.models.{family}")
    model = module.create(variant, num_classes=1000, dtype=dtype, drop_rate=0.0, drop_path_rate=0.0)
    variables = module.convert_timm(state_dict, variant)
    self.device = jax.devices(device)[0]
    variables = jax.device_put(variables, self.device)
    self.params = variables["params"]
    self.rest = {k: v for k, v in variables.items() if k != "params"}
    self.opt = optax.sgd(0.01, momentum=0.9)
    self.opt_state = self.opt.init(self.params)
    rng = np.random.default_rng(0)
    self.x = jax.device_put(rng.standard_normal((batch, size, size, 3), np.float32), self.device)
    self.y = jax.device_put(rng.integers(0, 1000, batch), self.device)
    mutable = list(self.rest) or False

    def loss_fn(params, rest, x, y):
      out = model.apply(
        {"params": params, **rest},
        x,
        train=True,
        mutable=mutable,
        rngs={"dropout": jax.random.key(0)},
      )
      logits, new_rest = out if mutable else (out, {})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
      return loss.mean(), new_rest

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, rest, x, y):
      (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
      updates, opt_state = self.opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, {**rest, **new_rest}, loss

    self.step = step

  def run(self, iters: int) -> None:
    for _ in range(iters):
      self.params, self.opt_state, self.rest, loss = self.step(
        self.params, self.opt_state, self.rest, self.x, self.y
      )
    jax.block_until_ready(loss)

  def peak_device_mib(self) -> float | None:
    stats = self.device.memory_stats() if self.device.platform != "cpu" else None
    return stats["peak_bytes_in_use"] / 2**20 if stats else None


class TorchRunner:
  def __init__(self, model, dtype, batch, size, device):
    self.device = torch.device(device)
    self.model = model.to(self.device).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    self.x = torch.randn(batch, 3, size, size, generator=g).to(self.device)
    self.y = torch.randint(0, 1000, (batch,), generator=g).to(self.device)
    self.autocast = dtype == "bfloat16"

  def run(self, iters: int) -> None:
    for _ in range(iters):
      self.opt.zero_grad(set_to_none=True)
      with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
        loss = torch.nn.functional.cross_entropy(self.model(self.x).float(), self.y)
      loss.backward()
      self.opt.step()
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def peak_device_mib(self) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None


def measure(runner, iters: int, batch: int, base: float) -> tuple[float, float, float]:
  """images/s, peak memory (MiB), peak minus ``base`` (MiB)."""
  _reset_peak_rss()
  start = time.perf_counter()
  runner.run(iters)
  elapsed = time.perf_counter() - start
  device_peak = runner.peak_device_mib()
  if device_peak is not None:
    return batch * iters / elapsed, device_peak, float("nan")
  peak = _rss_mib("VmHWM")
  return batch * iters / elapsed, peak, peak - base


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--iters", type=int, default=2, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
  parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {', '.join(ROWS)}")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
  args = parser.parse_args()

  device = args.device
  if device == "auto":
    device = "gpu" if jax.default_backend() == "gpu" else "cpu"
  torch_device = "cuda" if device == "gpu" else "cpu"
  if device == "gpu" and not torch.cuda.is_available():
    raise SystemExit("JAX sees a GPU but torch.cuda is unavailable: install a CUDA torch build")
  print(
    f"device: {device} ({jax.devices(device)[0].device_kind}); torch {torch.__version__} on "
    f"{torch_device} ({torch.get_num_threads()} threads); jax {jax.__version__}; "
    f"dtype {args.dtype}; batch {args.batch}; {args.rounds}x{args.iters} steps"
  )
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  header = (
    f"{'model':<26}{'px':>5}{'JAX img/s':>11}{'torch img/s':>13}{'JAX/torch':>11}"
    f"{'JAX peak':>10}{'Δ':>7}{'torch peak':>12}{'Δ':>7}{'compile s':>11}"
  )
  lines = []
  for row in args.rows.split(","):
    if row not in ROWS:
      raise SystemExit(f"unknown row {row!r}; valid: {', '.join(ROWS)}")
    family, variant, size = ROWS[row]
    try:
      importlib.import_module(f"csdfd_jax.models.{family}")
    except ImportError:
      print(f"skipping {row}: csdfd_jax.models.{family} is not available yet")
      continue
    torch.manual_seed(0)
    tmodel = timm.create_model(variant, pretrained=False, drop_rate=0.0, drop_path_rate=0.0)
    state_dict = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    j_base = _trimmed_rss_mib()
    jr = JaxRunner(family, variant, state_dict, dtype, args.batch, size, device)
    start = time.perf_counter()
    jr.run(1)  # compile
    compile_s = time.perf_counter() - start
    t_base = _trimmed_rss_mib()
    tr = TorchRunner(tmodel, args.dtype, args.batch, size, torch_device)
    tr.run(1)  # warm-up
    jax_res, torch_res = [], []
    for _ in range(args.rounds):
      jax_res.append(measure(jr, args.iters, args.batch, j_base))
      torch_res.append(measure(tr, args.iters, args.batch, t_base))
    j_ips = statistics.median(r[0] for r in jax_res)
    t_ips = statistics.median(r[0] for r in torch_res)
    j_peak, j_delta = max(r[1] for r in jax_res), max(r[2] for r in jax_res)
    t_peak, t_delta = max(r[1] for r in torch_res), max(r[2] for r in torch_res)
    lines.append(
      f"{variant:<26}{size:>5}{j_ips:>11.2f}{t_ips:>13.2f}{j_ips / t_ips:>10.2f}x"
      f"{j_peak:>10.0f}{j_delta:>7.0f}{t_peak:>12.0f}{t_delta:>7.0f}{compile_s:>11.1f}"
    )
    print(lines[-1] if len(lines) > 1 else f"{header}\n{lines[-1]}", flush=True)
    rounds = lambda res: " ".join(f"{r[0]:.2f}" for r in res)  # noqa: E731
    print(f"{'':<6}rounds img/s  JAX: {rounds(jax_res)}  torch: {rounds(torch_res)}", flush=True)
    del jr, tr, tmodel, state_dict
  print(
    "\nmemory in MiB (CPU: peak process RSS, Δ = peak minus RSS before the runner; GPU: device)"
  )


if __name__ == "__main__":
  main()
