"""Accuracy against epsilon for DP-SGD (sample-level, 10 clients) and DP-FedAvg (user-level, 500 clients of 3-4
digits each) on scikit-learn's digits (scenarios/dp_repro.yaml). What held on seeds 0-2: final test accuracy rises
with epsilon for both mechanisms, steeply up to epsilon 2 and by 0.003-0.04 a doubling after it; both stay below
their non-private counterparts at epsilon 8 (by 0.02-0.07); every private run spends its target epsilon to 0.1%; and
DP-FedAvg at epsilon 1 needs the many clients: the same 50 clients a round drawn from 100 instead of 500 lose 0.26-0.40
accuracy. CI runs seed 0 at 30 rounds (DP-FedAvg) and 10 (DP-SGD) for epsilon 0.5, 1, 4; the full runs over seeds 0-2
are marked slow (`pytest -m slow`; about 1.5 minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedsim
from fedsim.scenario import read_scenario_file

SCENARIO = Path(__file__).parent.parent / "scenarios" / "dp_repro.yaml"
MECHANISMS = {"dpsgd": "nonprivate_silos", "dpfedavg": "nonprivate_users"}
"""Each mechanism and its non-private counterpart (the same clients and training without privacy)."""
Row = dict[str, Any]


def finals(seed: int, changes: dict[str, dict[str, Any]]) -> dict[str, Row]:
    """The last metrics row of each variant named in `changes`, run on `seed` with that variant's settings changed."""
    raw = read_scenario_file(SCENARIO)
    variants = {name: {**raw["variants"][name], **change} for name, change in changes.items()}
    rows = fedsim.run({**raw, "seed": seed, "variants": variants}, write=False).metrics.rows
    return {r["variant"]: r for r in rows}


def by_epsilon(last: dict[str, Row], mechanism: str) -> list[tuple[float, Row]]:
    """(target epsilon, last row) of each of the mechanism's variants that ran, by rising target."""
    declared = read_scenario_file(SCENARIO)["variants"]
    runs = [(declared[v]["privacy"]["target_epsilon"], row) for v, row in last.items()
            if v.startswith(f"{mechanism}_eps")]
    return sorted(runs, key=lambda run: run[0])


def check_accuracy_rises_with_epsilon_within_budget(last: dict[str, Row], gain: float, plateau_from: float) -> None:
    """Per mechanism: each run spends its target epsilon to 1% and never more; accuracy rises by more than `gain`
    from one epsilon to the next below `plateau_from`, and falls by at most 0.01 (a few test samples) from there on;
    the non-private run is at least as accurate as every private one."""
    for mechanism, plain in MECHANISMS.items():
        runs = by_epsilon(last, mechanism)
        for target, row in runs:
            assert 0.99 * target <= row["epsilon_rdp"] <= target, (mechanism, target, row["epsilon_rdp"])
        accuracy = [(target, row["accuracy"]) for target, row in runs]
        for (low, before), (_, after) in zip(accuracy, accuracy[1:], strict=False):
            assert after > before + (gain if low < plateau_from else -0.01), (mechanism, accuracy)
        assert last[plain]["accuracy"] >= max(a for _, a in accuracy), (mechanism, last[plain]["accuracy"], accuracy)


def test_accuracy_rises_with_epsilon_for_dpsgd_and_dpfedavg_and_stays_below_no_privacy_reduced():
    # Seed 0, as measured: DP-FedAvg (30 rounds) 0.644 / 0.762 / 0.844 at epsilon 0.5 / 1 / 4, non-private 0.938;
    # DP-SGD (10 rounds) 0.367 / 0.667 / 0.878, non-private 0.939.
    users, silos = {"rounds": 30, "evaluation.every": 30}, {"rounds": 10, "evaluation.every": 10}
    last = finals(0, {"nonprivate_users": users, "dpfedavg_eps0.5": users, "dpfedavg_eps1": users,
                      "dpfedavg_eps4": users, "nonprivate_silos": silos, "dpsgd_eps0.5": silos, "dpsgd_eps1": silos,
                      "dpsgd_eps4": silos})
    check_accuracy_rises_with_epsilon_within_budget(last, gain=0.05, plateau_from=8.0)


@pytest.mark.slow
def test_accuracy_rises_with_epsilon_for_dpsgd_and_dpfedavg_and_stays_below_no_privacy_full():
    # Measured on seeds 0-2 (accuracy at epsilon 0.5 / 1 / 2 / 4 / 8): DP-FedAvg 0.56-0.64 / 0.80-0.86 / 0.88-0.91 /
    # 0.90-0.93 / 0.91-0.94, non-private 0.944-0.958; DP-SGD 0.38-0.47 / 0.67-0.68 / 0.850-0.853 / 0.88-0.90 /
    # 0.89-0.92, non-private 0.939-0.956. Smallest step up to epsilon 2: 0.052 (DP-FedAvg 1 to 2, seed 0); after it
    # every step still rose, by 0.003-0.04. Checked on every seed.
    declared = read_scenario_file(SCENARIO)["variants"]
    for seed in (0, 1, 2):
        last = finals(seed, {name: {} for name in declared})
        check_accuracy_rises_with_epsilon_within_budget(last, gain=0.03, plateau_from=2.0)


@pytest.mark.slow
def test_dpfedavg_at_epsilon_one_needs_many_clients():
    # Measured on seeds 0-2, 50 clients a round: 0.796-0.856 drawn from 500 clients, 0.455-0.560 from 100 (q 0.5,
    # so the calibrated noise multiplier is larger for the same epsilon). Checked on every seed.
    for seed in (0, 1, 2):
        many = finals(seed, {"dpfedavg_eps1": {}})["dpfedavg_eps1"]["accuracy"]
        few = finals(seed, {"dpfedavg_eps1": {"num_clients": 100}})["dpfedavg_eps1"]["accuracy"]
        assert few < many - 0.15, (seed, few, many)
