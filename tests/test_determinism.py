"""Same scenario and seed give bit-identical metrics; another seed gives other numbers."""

from __future__ import annotations

import fedsim


def comparable(result):
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in result.metrics.rows]


def test_same_seed_gives_identical_metrics(tiny):
    tiny["stragglers"] = {"fraction": 0.5}
    tiny["systems"] = {"name": "lognormal"}
    assert comparable(fedsim.run(tiny, write=False)) == comparable(fedsim.run(tiny, write=False))


def test_another_seed_gives_other_metrics(tiny):
    a = comparable(fedsim.run(tiny, write=False))
    b = comparable(fedsim.run(tiny, overrides={"seed": 1}, write=False))
    assert a[-1]["loss"] != b[-1]["loss"]
