"""Helpers shared by the backbone parity tests (timm/torchvision -> Flax)."""

from __future__ import annotations

import functools

import jax
import numpy as np


def state(model) -> dict[str, np.ndarray]:
  """A torch module's state dict as numpy arrays."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def apply(model, variables, x, **kw):
  """Jitted apply: one compilation is much faster than eager op-by-op dispatch on CPU."""
  return jax.jit(functools.partial(model.apply, **kw))(variables, x)


def eval_both(model, variables, x):
  """Logits (+ intermediates) and pooled features in one compilation (XLA shares the trunk)."""
  logits = functools.partial(model.apply, mutable=["intermediates"])
  return jax.jit(lambda v, x: (logits(v, x), model.clone(num_classes=0).apply(v, x)))(variables, x)


def matmul_dtypes(model, variables, x) -> set[str]:
  """Operand dtypes of every convolution and matrix product the forward pass traces."""
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, tuple | list) else [param]:
          if hasattr(sub, "eqns"):
            visit(sub)
          elif hasattr(sub, "jaxpr"):
            visit(sub.jaxpr)

  visit(jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, x).jaxpr)
  return found


def randomize_bn(model, seed: int = 0):
  """Random BN affine and running statistics (timm zero-inits the last BN of each block)."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  return model


MEAN, STD = (0.5,) * 3, (0.25,) * 3  # the normalisation of the double-backprop references


def float64_tiny_resnet(seed: int = 0):
  """A tiny timm ResNet in float64 train mode with random BN affines, the same network as a
  float64 JAX ``Detector`` (linear classifier), and ``to_flax(state_dict) -> (params, stats)``,
  which also maps a state dict of gradients onto the JAX parameter tree. For the peer
  methods' PyTorch double-backprop references."""
  import jax.numpy as jnp
  import timm
  import torch

  from csdfd_jax.models import resnet
  from csdfd_jax.models.heads import Detector

  torch.manual_seed(seed)
  cfg = resnet.VARIANTS["tiny"]
  tmodel = timm.create_model(
    "resnet34", pretrained=False, num_classes=1, layers=cfg["layers"], channels=cfg["channels"]
  )
  randomize_bn(tmodel, seed)
  tmodel.train().double()
  backbone = resnet.create("tiny", num_classes=0, dtype=jnp.float64)
  model = Detector(backbone, MEAN, STD, projection_dims=(), dropout=0.0, dtype=jnp.float64)

  def to_flax(state):
    converted = resnet.convert_timm(state, "tiny", num_classes=0)
    head = {"kernel": np.asarray(state["fc.weight"]).T, "bias": np.asarray(state["fc.bias"])}
    params = {"backbone": converted["params"], "classifier": head}
    return params, {"backbone": converted["batch_stats"]}

  return tmodel, model, to_flax


def torch_input(images: np.ndarray):
  """uint8 NHWC images as the detector sees them (normalised in float32), float64 NCHW."""
  import torch

  x = torch.from_numpy(np.asarray(images, np.float32))
  x = (x - torch.tensor(MEAN) * 255) / (torch.tensor(STD) * 255)
  return x.double().permute(0, 3, 1, 2)
