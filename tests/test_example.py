"""The README's worked example: UVS lowers both objectives, the summed gradient does not."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import two_objectives  # noqa: E402


def test_uvs_lowers_both_objectives_where_the_sum_raises_one():
  start, steps, lr = (0.4, 2.0), 200, 0.05
  summed = two_objectives.run("sum", start, steps, lr)
  conflict_averse = two_objectives.run("uvs", start, steps, lr)
  assert conflict_averse["f1"][-1] < conflict_averse["f1"][0]
  assert conflict_averse["f2"][-1] < conflict_averse["f2"][0]
  assert summed["f2"][-1] > summed["f2"][0]
