"""Config files; variants combine with commas (``configs/roga.py:gid_df,first_order``)."""

from __future__ import annotations


def parse_variants(arg: str | None, valid: tuple[str, ...], path: str) -> list[str]:
  """The comma-separated variants of ``arg``, each checked against ``valid``."""
  variants = [v.strip() for v in (arg or "").split(",") if v.strip()]
  for v in variants:
    if v not in valid:
      raise ValueError(f"unknown config variant {v!r} for {path}; valid: {', '.join(valid)}")
  return variants
