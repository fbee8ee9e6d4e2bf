"""Loading local checkpoint files and mapping their keys onto Flax variables, strictly.

No model hub is reachable at run time, so every pretrained backbone starts from a local
file: a PyTorch state dict (``.pth``/``.pt``/``.bin``), a ``.safetensors`` file, or an
``.npz``. Each model family writes its own key mapping on top of :class:`StrictMapping`,
which fails loudly, naming the keys, on any missing, unused or shape-mismatched weight —
the opposite of ``load_state_dict(strict=False)``, which silently starts from random
weights when a prefix is wrong.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


class WeightMappingError(ValueError):
  """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into ``{key: float32/int numpy array}``.

  PyTorch files are opened with ``torch.load(weights_only=True)`` (torch is imported only
  here, so a JAX-only install can still load ``.npz``/``.safetensors``). A top-level
  ``state_dict``/``model``/``state_dict_ema`` entry, as written by many training scripts,
  is unwrapped.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if suffix == ".safetensors":
    from safetensors.numpy import load_file

    return dict(load_file(path))
  if suffix in (".pth", ".pt", ".bin", ".ckpt"):
    import torch

    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
      raise WeightMappingError(
        f"{path}: refused or unreadable as a PyTorch state dict ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200]}). Only plain tensors are loaded (weights_only=True): "
        "a file that needs code to unpickle is refused"
      ) from None
    for wrapper in ("state_dict_ema", "state_dict", "model"):
      if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
    if not isinstance(obj, Mapping):
      raise WeightMappingError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
      if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
          value = value.float()
        out[key] = value.numpy()
    return out
  raise WeightMappingError(
    f"{path}: unknown checkpoint format {suffix!r}; expected .pth/.pt/.bin/.ckpt, "
    ".safetensors or .npz"
  )


class StrictMapping:
  """Consumes a state dict key by key while a family's mapping fills a Flax variable tree.

  ``take(key, shape, transform)`` returns the (transformed) array and marks the key used;
  ``finish()`` raises :class:`WeightMappingError` listing every unused key and every error
  seen, so one run shows all problems at once. ``ignore`` lists keys deliberately not
  loaded (e.g. ``num_batches_tracked``); they are matched as suffixes.
  """

  def __init__(self, state_dict: Mapping[str, np.ndarray], *, ignore: tuple[str, ...] = ()):
    self._sd = dict(state_dict)
    self._used: set[str] = set()
    self._errors: list[str] = []
    self._ignore = ignore

  def has(self, key: str) -> bool:
    return key in self._sd

  def take(
    self, key: str, shape: tuple[int, ...] | None = None, transform=None
  ) -> np.ndarray | None:
    if key not in self._sd:
      close = difflib.get_close_matches(key, list(self._sd), n=3)
      hint = f" (closest: {', '.join(close)})" if close else ""
      self._errors.append(f"missing key {key!r}{hint}")
      return None
    self._used.add(key)
    value = np.asarray(self._sd[key])
    if transform is not None:
      value = transform(value)
    if shape is not None and tuple(value.shape) != tuple(shape):
      self._errors.append(
        f"shape mismatch for {key!r}: checkpoint gives {tuple(value.shape)} after mapping, "
        f"model expects {tuple(shape)}"
      )
      return None
    return value

  def finish(self, what: str = "checkpoint") -> None:
    unused = sorted(
      k for k in self._sd if k not in self._used and not k.endswith(self._ignore or ("\0",))
    )
    problems = list(self._errors)
    if unused:
      shown = ", ".join(unused[:20]) + (
        f", ... ({len(unused) - 20} more)" if len(unused) > 20 else ""
      )
      problems.append(f"{len(unused)} unexpected key(s) not used by the model: {shown}")
    if problems:
      raise WeightMappingError(f"{what} does not match the model:\n  " + "\n  ".join(problems))


def check_tree_matches(reference: Any, loaded: Any, what: str = "converted weights") -> None:
  """Raises if ``loaded`` differs from ``reference`` (e.g. ``jax.eval_shape`` of
  ``model.init``) in tree structure, any leaf shape, or any leaf dtype kind, or holds a
  non-finite float (a damaged file, not the learning rate's fault)."""
  import jax

  ref_paths = dict(jax.tree_util.tree_flatten_with_path(reference)[0])
  got_paths = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  fmt = jax.tree_util.keystr
  problems = [f"missing {fmt(p)}" for p in ref_paths if p not in got_paths]
  problems += [f"unexpected {fmt(p)}" for p in got_paths if p not in ref_paths]
  for p, ref in ref_paths.items():
    if p not in got_paths:
      continue
    got = got_paths[p]
    if tuple(np.shape(got)) != tuple(ref.shape):
      problems.append(f"shape of {fmt(p)}: {np.shape(got)} vs model {tuple(ref.shape)}")
    kind, ref_kind = np.asarray(got).dtype.kind, np.dtype(ref.dtype).kind
    if kind != ref_kind and {kind, ref_kind} != {"f", "V"}:  # V: bfloat16 seen by numpy
      problems.append(f"dtype of {fmt(p)}: {np.asarray(got).dtype} vs model {ref.dtype}")
    elif kind == "f" and not np.all(np.isfinite(got)):
      bad = int(np.size(got) - np.sum(np.isfinite(got)))
      problems.append(f"{fmt(p)} holds {bad} non-finite values (NaN/inf): the file is damaged")
  if problems:
    raise WeightMappingError(f"{what} do not match the model:\n  " + "\n  ".join(problems[:50]))


def sidecar_path(path: str | os.PathLike) -> str:
  """``weights.npz`` → ``weights.json``: where the metadata of a converted file lives."""
  return os.path.splitext(os.fspath(path))[0] + ".json"


def save_variables(
  path: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, Any]
) -> None:
  """Writes Flax variables as a flat ``.npz`` (keys ``params/blocks_0_0/conv_dw/kernel``) and
  ``metadata`` (family, variant, source, preprocessing, ...) as a JSON sidecar beside it, so a
  config that loads the weights also learns how inputs must be normalised."""
  import json

  import jax

  flat = {}
  for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    flat["/".join(str(getattr(k, "key", k)) for k in p)] = np.asarray(leaf)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # a file object keeps np.savez from appending ".npz"
    np.savez(f, **flat)
  with open(sidecar_path(path), "w") as f:
    json.dump(dict(metadata), f, indent=2, sort_keys=True)


def load_variables(path: str | os.PathLike) -> tuple[dict, dict]:
  """Reads what :func:`save_variables` wrote: ``(variables as nested dicts, metadata)``.
  The metadata is ``{}`` when the sidecar is absent."""
  import json

  variables: dict = {}
  for key, value in load_state_dict(path).items():
    *parents, leaf = key.split("/")
    node = variables
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  meta_path = sidecar_path(path)
  metadata = {}
  if os.path.isfile(meta_path):
    try:
      with open(meta_path) as f:
        metadata = json.load(f)
    except (OSError, ValueError) as e:
      raise WeightMappingError(
        f"{meta_path}: the metadata beside {path} is not valid JSON ({e}); convert the "
        "weights again with python -m csdfd_jax.models.convert"
      ) from None
  return variables, metadata
