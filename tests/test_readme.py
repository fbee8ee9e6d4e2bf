"""The README's code snippet runs as written."""

import re
from pathlib import Path

import jax
import numpy as np


def test_readme_snippet_runs():
  text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README lost its python example"
  scope: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(scope["params"]))
