"""EControl (Gao, Islamov, Stich, ICLR 2024) against no error feedback, EF14 and EF21 on heterogeneous least squares
with top-5% uplink compression (scenarios/econtrol_repro.yaml): the server model's distance to the optimum.
What held on seeds 0-2, relative to the start: with full-batch gradients, compressed GD stalls at 0.50-0.53 and EF14
at a floor of 0.043-0.051, while EF21 and EControl converge linearly (1.6e-6-1.9e-6 and 3.9e-6-5.2e-6 after 600
rounds; EControl needs 152-157 kB to stay below 1e-3, uncompressed GD 1,224-1,265 kB). With minibatch noise every
method has a floor; EControl's mean distance over rounds 300-600 is 0.63-0.69 times EF21's and 0.62-0.65 times
EF14's, but 2.4-2.5 times EF21-SGDM's. CI runs seed 1 with short budgets; all of the file's compressed variants over
seeds 0-2 are marked slow (`pytest -m slow`; about 3 minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedsim
from fedsim.scenario import read_scenario_file

SCENARIO = Path(__file__).parent.parent / "scenarios" / "econtrol_repro.yaml"
Rows = list[dict[str, Any]]


def curves(seed: int, changes: dict[str, dict[str, Any]]) -> dict[str, Rows]:
    """The rows of each variant named in `changes`, run on `seed` with that variant's settings changed."""
    raw = read_scenario_file(SCENARIO)
    variants = {name: {**raw["variants"][name], **change} for name, change in changes.items()}
    result = fedsim.run({**raw, "seed": seed, "variants": variants}, write=False)
    return {name: [r for r in result.metrics.rows if r["variant"] == name] for name in changes}


def relative(rows: Rows, since: int = 0) -> float:
    """The mean distance to the optimum over the rows from round `since` on, over the start's: a noisy run's floor,
    or with `since` the last round, where a run ended."""
    tail = [r["distance_to_optimum"] for r in rows if r["round"] >= since]
    return sum(tail) / len(tail) / rows[0]["distance_to_optimum"]


def bytes_to(rows: Rows, eps: float) -> int | None:
    """Bytes sent by the first row from which the distance to the optimum stays at most eps times its start; None
    when the run ends above it."""
    start = rows[0]["distance_to_optimum"]
    above = [k for k, r in enumerate(rows) if r["distance_to_optimum"] > eps * start]
    settled = above[-1] + 1 if above else 0
    return rows[settled]["bytes_up"] if settled < len(rows) else None


def test_econtrol_converges_where_compressed_gd_and_ef14_stall_and_beats_ef21_under_noise_reduced():
    # Seed 1, as measured (distance over the start): full batch at round 250, none 0.53, EF14 0.045, EControl
    # 3.0e-3; minibatches, mean over rounds 150-300, EF21 0.051, EControl 0.034.
    exact = {"rounds": 250, "evaluation.every": 50}
    rows = curves(1, {"exact_none": exact, "exact_ef14": exact, "exact_econtrol": exact,
                      "noisy_ef21": {"rounds": 300}, "noisy_econtrol": {"rounds": 300}})
    assert relative(rows["exact_none"], 250) > 0.3
    assert 0.02 < relative(rows["exact_ef14"], 250) < 0.1
    assert relative(rows["exact_econtrol"], 250) < 0.2 * relative(rows["exact_ef14"], 250)
    assert relative(rows["noisy_econtrol"], 150) < 0.8 * relative(rows["noisy_ef21"], 150)


@pytest.mark.slow
def test_econtrol_converges_where_compressed_gd_and_ef14_stall_and_beats_ef21_under_noise_full():
    variants = [v for v in read_scenario_file(SCENARIO)["variants"] if not v.endswith("uncompressed")]
    for seed in (0, 1, 2):
        result = fedsim.run(SCENARIO, overrides={"seed": seed}, variants=variants, write=False)
        rows = {v: [r for r in result.metrics.rows if r["variant"] == v] for v in variants}
        exact = {v.removeprefix("exact_"): relative(rows[v], 600) for v in variants if v.startswith("exact_")}
        noisy = {v.removeprefix("noisy_"): relative(rows[v], 300) for v in variants if v.startswith("noisy_")}
        # Measured, full batch at round 600: none 0.50-0.53, EF14 0.044-0.063, EF21 1.6e-6-1.9e-6, EControl
        # 3.9e-6-5.2e-6.
        assert exact["none"] > 0.3 and exact["ef14"] > 0.02, (seed, exact)
        assert exact["ef21"] < 1e-5 and exact["econtrol"] < 2e-5, (seed, exact)
        reached = bytes_to(rows["exact_econtrol"], 1e-3)
        assert reached is not None and reached < 200_000, (seed, reached)  # 152-157 kB measured
        # Measured, minibatches over rounds 300-600: none 0.38-0.42, EF14 0.043-0.053, EF21 0.045-0.051, EControl
        # 0.028-0.033 (0.62-0.69 times EF14's and EF21's), EF21-SGDM 0.012-0.014.
        assert noisy["none"] > 5 * max(noisy["ef14"], noisy["ef21"]), (seed, noisy)
        assert noisy["econtrol"] < 0.8 * min(noisy["ef14"], noisy["ef21"]), (seed, noisy)
        assert noisy["ef21_sgdm"] < 0.6 * noisy["econtrol"], (seed, noisy)
