"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019) against top-k at equal bytes, both with error feedback, on the
MLP workload of benchmarks/runtimes.py (scenarios/powersgd_repro.yaml). What held on seeds 0-2, at every evaluation
from round 30 to 100: at rank 1 (21x fewer bytes than the model) top-k has the lower training loss, by
0.052-0.14; at rank 4 (6.8x fewer) PowerSGD does, by 0.020-0.047; rank 2 is within 0.04 either way. CI runs seed 0
for 30 rounds at ranks 1 and 4; all variants over seeds 0-2 for 100 rounds are marked slow (about 2.5 minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedsim
from fedsim.scenario import read_scenario_file

SCENARIO = Path(__file__).parent.parent / "scenarios" / "powersgd_repro.yaml"


def final_rows(seed: int, names: tuple[str, ...], **overrides: Any) -> dict[str, dict[str, Any]]:
    """Each named variant's last row, run on `seed` with the file's settings changed by `overrides`."""
    raw = read_scenario_file(SCENARIO)
    result = fedsim.run({**raw, **overrides, "seed": seed, "variants": {n: raw["variants"][n] for n in names}},
                        write=False)
    return {row["variant"]: row for row in result.metrics.rows if row["round"] == result.metrics.rows[-1]["round"]}


def assert_equal_bytes(rows: dict[str, dict[str, Any]], rank: int) -> None:
    assert rows[f"powersgd_r{rank}"]["bytes_up"] == rows[f"topk_r{rank}"]["bytes_up"]


def test_topk_wins_at_rank_one_and_powersgd_at_rank_four_at_equal_bytes_reduced():
    # Seed 0, round 30, as measured: top-k's loss 0.086 below PowerSGD's at rank 1, 0.047 above it at rank 4.
    rows = final_rows(0, ("powersgd_r1", "topk_r1", "powersgd_r4", "topk_r4"), rounds=30)
    for rank in (1, 4):
        assert_equal_bytes(rows, rank)
    assert rows["topk_r1"]["loss"] < rows["powersgd_r1"]["loss"] - 0.04
    assert rows["powersgd_r4"]["loss"] < rows["topk_r4"]["loss"] - 0.02


@pytest.mark.slow
def test_topk_wins_at_rank_one_and_powersgd_at_rank_four_at_equal_bytes_full():
    names = tuple(read_scenario_file(SCENARIO)["variants"])
    for seed in (0, 1, 2):
        rows = final_rows(seed, names)
        for rank in (1, 2, 4):
            assert_equal_bytes(rows, rank)
        assert rows["topk_r1"]["loss"] < rows["powersgd_r1"]["loss"] - 0.04, seed
        assert abs(rows["topk_r2"]["loss"] - rows["powersgd_r2"]["loss"]) < 0.04, seed
        assert rows["powersgd_r4"]["loss"] < rows["topk_r4"]["loss"] - 0.015, seed
        assert rows["uncompressed"]["loss"] < rows["powersgd_r4"]["loss"], seed
