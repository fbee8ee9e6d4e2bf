"""``python -m csdfd_jax.data.layouts <name> <root> [--set key=value ...] [--json out.json]``:
indexes a dataset and prints its summary table (optionally saving the whole index as JSON)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from csdfd_jax.data import layouts


def parse_value(text: str) -> Any:
  """A --set value: comma-separated -> list of strings, else JSON (numbers, true, null), else
  the plain string."""
  if "," in text:
    return [t.strip() for t in text.split(",") if t.strip()]
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m csdfd_jax.data.layouts", description=__doc__.split("\n")[1].strip()
  )
  parser.add_argument("name", help=f"layout: {', '.join(layouts.NAMES + tuple(layouts.ALIASES))}")
  parser.add_argument("root", help="the dataset folder (for deepfakebench: the JSON file)")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="an option of the layout's index(), e.g. --set compression=c40 "
    "--set manipulations=Deepfakes,Face2Face",
  )
  parser.add_argument("--json", help="write the index (records, missing, summary) to this file")
  args = parser.parse_args(argv)
  options = {}
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      parser.error(f"--set expects KEY=VALUE, got {item!r}")
    options[key.strip()] = parse_value(value)
  try:
    idx = layouts.index(args.name, args.root, **options)
  except (FileNotFoundError, ValueError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(idx.format_summary())
  if args.json:
    out, root = os.path.abspath(args.json), os.path.abspath(args.root)
    if os.path.isdir(root) and os.path.commonpath([out, root]) == root:
      print(f"error: refusing to write {out} inside the dataset folder {root}", file=sys.stderr)
      return 2
    print(f"\nindex written to {idx.save_json(out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
