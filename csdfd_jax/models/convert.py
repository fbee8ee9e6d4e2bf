"""Converts a local PyTorch/safetensors/npz checkpoint into Flax variables, once.

    python -m csdfd_jax.models.convert --family efficientnet --variant tf_efficientnet_lite0 \\
        --source lukemelas --input efficientnet-lite0.pth --output weights/lite0.npz

Generic over families: it imports ``csdfd_jax.models.<family>`` and calls its
``convert_<source>(state_dict, variant)``; any missing, unused or mis-shaped key fails with the
key names. The output is a flat ``.npz`` of ``{"params", "batch_stats"}`` plus a ``.json``
sidecar with the family, variant, source and the preprocessing (input size, mean/std) the
weights expect, so a config pointing at the file cannot normalise inputs wrongly.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import os
import pkgutil
import sys
from types import ModuleType

import jax
import numpy as np

from csdfd_jax.models import weights


def families() -> list[str]:
  """Names of modules of ``csdfd_jax.models`` that define a ``convert_<source>`` function
  (imported one by one; used to list the valid choices in an error message)."""
  import csdfd_jax.models as pkg

  found = []
  for info in pkgutil.iter_modules(pkg.__path__):
    if info.name in ("convert", "weights"):
      continue
    try:
      module = importlib.import_module(f"csdfd_jax.models.{info.name}")
    except Exception:  # a broken sibling module must not hide the working ones
      continue
    if sources(module):
      found.append(info.name)
  return sorted(found)


def sources(module: ModuleType) -> dict:
  return {
    name.removeprefix("convert_"): fn
    for name, fn in vars(module).items()
    if name.startswith("convert_") and callable(fn)
  }


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def convert(
  family: str,
  variant: str,
  source: str,
  input_path: str,
  output_path: str,
  *,
  num_classes: int | None = None,
) -> dict:
  """Converts ``input_path`` and writes ``output_path`` + sidecar; returns the metadata.
  Raises ``ValueError`` naming the valid choices for an unknown family/source/variant."""
  try:
    module = importlib.import_module(f"csdfd_jax.models.{family}")
  except ModuleNotFoundError as e:
    if e.name != f"csdfd_jax.models.{family}":
      raise
    module = None
  fns = sources(module) if module is not None else {}
  if not fns:
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(families()) or 'none'}")
  if source not in fns:
    raise ValueError(
      f"unknown source {source!r} for family {family!r}; valid: {', '.join(sorted(fns))}"
    )
  valid = getattr(module, "VARIANTS", None)
  if valid is not None and variant.split(".", 1)[0] not in valid:
    raise ValueError(f"unknown {family} variant {variant!r}; valid: {', '.join(valid)}")
  # A family may read a source's own format (CLIP: OpenAI's TorchScript archives).
  state_dict = getattr(module, f"load_{source}", weights.load_state_dict)(input_path)
  kwargs = {}
  if num_classes is not None:
    if "num_classes" not in inspect.signature(fns[source]).parameters:
      raise ValueError(f"{family}.convert_{source} does not take num_classes")
    kwargs["num_classes"] = num_classes
  variables = fns[source](state_dict, variant, **kwargs)
  leaves = jax.tree.leaves(variables.get("params", {}))
  metadata = {
    "family": family,
    "variant": variant,
    "source": source,
    "input": os.path.abspath(input_path),
    "input_sha256": _sha256(input_path),
    "num_params": int(sum(np.size(v) for v in leaves)),
    "preprocessing": module.preprocessing(variant) if hasattr(module, "preprocessing") else None,
  }
  weights.save_variables(output_path, variables, metadata)
  return metadata


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m csdfd_jax.models.convert", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--family", required=True, help="module of csdfd_jax.models, e.g. vit")
  parser.add_argument("--variant", required=True, help="timm model name[.weights tag]")
  parser.add_argument("--source", required=True, help="checkpoint format: timm, lukemelas, ...")
  parser.add_argument("--input", required=True, help=".pth/.pt/.bin/.safetensors/.npz file")
  parser.add_argument("--output", required=True, help="output .npz (a .json sidecar is added)")
  parser.add_argument("--num-classes", type=int, default=None, help="0 drops the classifier")
  args = parser.parse_args(argv)
  try:
    meta = convert(
      args.family,
      args.variant,
      args.source,
      args.input,
      args.output,
      num_classes=args.num_classes,
    )
  except (ValueError, FileNotFoundError) as e:
    parser.exit(2, f"error: {e}\n")
  pre = meta["preprocessing"] or {}
  print(
    f"wrote {args.output} ({meta['num_params']:,} parameters) and "
    f"{weights.sidecar_path(args.output)}; preprocessing: {pre}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
