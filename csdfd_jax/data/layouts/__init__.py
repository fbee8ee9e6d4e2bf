"""Read-only indexers of deepfake datasets in their official on-disk layouts.

One module per dataset, each with ``index(root, **options) -> LayoutIndex`` (see ``base``):

    from csdfd_jax.data import layouts
    idx = layouts.index("ffpp", "/data/FaceForensics++", compression="c23")
    print(idx.format_summary())
    train = idx.select(split="train")

``layouts.get(name)`` returns the module (imported on demand); the names are ``NAMES`` plus
the aliases in ``ALIASES`` (e.g. "celebdf_v1" = celebdf with version="v1"; names are
matched ignoring case, with "-" read as "_", so DeepfakeBench's "Celeb-DF-v1" works too).
From a shell:
``python -m csdfd_jax.data.layouts <name> <root> [--set key=value ...] [--json out.json]``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from csdfd_jax.data.layouts.base import KINDS, SPLITS, LayoutIndex, MediaRecord, check_name

NAMES = (
  "celebdf",
  "deepfakebench",
  "dfd",
  "dfdc",
  "dfdc_preview",
  "ffpp",
  "folder",
  "uadfv",
  "wilddeepfake",
)
# alias -> (module name, default options)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
  "celebdf_v1": ("celebdf", {"version": "v1"}),
  "celebdf_v2": ("celebdf", {"version": "v2"}),
  "celeb_df_v1": ("celebdf", {"version": "v1"}),
  "celeb_df_v2": ("celebdf", {"version": "v2"}),
  "deepfakedetection": ("dfd", {}),
  "dfdcp": ("dfdc_preview", {}),
  "faceforensics++": ("ffpp", {}),
  "ff++": ("ffpp", {}),
}

__all__ = ["KINDS", "NAMES", "SPLITS", "LayoutIndex", "MediaRecord", "get", "index"]


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
  key = name.strip().lower().replace("-", "_")
  if key in ALIASES:
    return ALIASES[key]
  if key in NAMES:
    return key, {}
  valid = ", ".join(NAMES + tuple(ALIASES))
  raise ValueError(f"unknown dataset layout {name!r}; valid names: {valid}")


def get(name: str) -> ModuleType:
  """The indexer module of a layout name (e.g. "ffpp"), imported on first use."""
  module, _ = _resolve(name)
  return importlib.import_module(f"{__name__}.{module}")


def index(name: str, root: str, *, allow_outside_root: bool = False, **options: Any) -> LayoutIndex:
  """Indexes ``root`` with the layout ``name``; ``options`` go to that module's ``index``.

  Dataset files (DFDC's metadata.json, a DeepfakeBench JSON, split lists) name media by path.
  A named path that leaves the dataset root (``../``, an absolute path elsewhere) is refused and
  counted in the notes, unless ``allow_outside_root``; the root is ``root`` (its folder for a
  JSON file, or the ``rgb_dir`` option). Dataset names become folder names in a face store, so
  a name that is not a plain file name is an error."""
  module, defaults = _resolve(name)
  idx = importlib.import_module(f"{__name__}.{module}").index(root, **{**defaults, **options})
  for dataset in {idx.dataset, *(r.dataset for r in idx.records)}:
    check_name(dataset, "dataset name")
  if allow_outside_root:
    return idx
  base = options.get("rgb_dir") or (root if os.path.isdir(root) else os.path.dirname(root))
  base = os.path.normpath(os.path.abspath(base))

  def inside(path: str | None) -> bool:
    if path is None:
      return True
    full = os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([full, base]) == base

  kept = [r for r in idx.records if inside(r.path) and inside(r.mask_path)]
  refused = [r for r in idx.records if r not in kept]
  if not refused:
    return idx
  note = (
    f"{len(refused)} entries name files outside the dataset root {base}, refused "
    f"(e.g. {refused[0].path}); pass allow_outside_root=True to accept them"
  )
  return LayoutIndex(idx.dataset, kept, idx.missing, [*idx.notes, note])
