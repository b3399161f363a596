"""FedSpeed (Sun et al., ICLR 2023) on MNIST-1D with Dirichlet(0.3) label skew, 10 of 100 clients a round and 5 local
epochs (scenarios/fedspeed_mnist1d.yaml). What held on every seed tried: FL-Simulator's FedSpeed trains faster than
FedDyn, which trains faster than FedAvg, and both beat FedAvg's accuracy; the paper form of FedSpeed, whose server
averages the hat variables of the sampled clients only, is unstable at this participation. CI runs a 30-round
version on half the data over two seeds; the full 200-round scenario is marked slow (`pytest -m slow`)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

import fedsim

SCENARIO = Path(__file__).parent.parent / "scenarios" / "fedspeed_mnist1d.yaml"
COMPARED = ["fedavg", "feddyn", "fedspeed", "fedspeed_fl_simulator"]


def final_by_variant(result) -> dict[str, dict]:
    last = result.metrics.rows[-1]["round"]
    return {row["variant"]: row for row in result.metrics.rows if row["round"] == last}


def assert_drift_corrected_ordering(final: dict[str, dict]) -> None:
    loss = {v: row["loss"] for v, row in final.items()}
    accuracy = {v: row["accuracy"] for v, row in final.items()}
    assert loss["fedspeed_fl_simulator"] < loss["feddyn"] < loss["fedavg"], loss
    assert accuracy["feddyn"] > accuracy["fedavg"], accuracy
    assert accuracy["fedspeed_fl_simulator"] > accuracy["fedavg"], accuracy


@pytest.mark.parametrize("seed", [0, 1])
def test_fedspeed_feddyn_fedavg_ordering_reduced(seed):
    result = fedsim.run(SCENARIO, overrides={"seed": seed, "rounds": 30, "evaluation.every": 30,
                                             "data.num_samples": 5000}, variants=COMPARED, write=False)
    final = final_by_variant(result)
    assert_drift_corrected_ordering(final)
    # The paper form averages x_K + h_i over the sampled tenth of the clients, so the clients' summed drifts h_i do
    # not cancel: its training loss ends above FedAvg's (1.9-3.5 against 1.4-1.7 on seeds 0-6).
    assert final["fedspeed"]["loss"] > final["fedavg"]["loss"], final


@pytest.mark.slow
def test_fedspeed_feddyn_fedavg_ordering_full():
    result = fedsim.run(SCENARIO, write=False)
    final = final_by_variant(result)
    assert_drift_corrected_ordering(final)
    assert final["fedspeed_fl_simulator"]["accuracy"] > final["feddyn"]["accuracy"], final
    late = {v: [r["loss"] for r in result.metrics.rows if r["variant"] == v and r["round"] >= 100]
            for v in ("fedspeed", "fedspeed_fl_simulator")}
    spread = {v: statistics.pstdev(losses) for v, losses in late.items()}
    assert spread["fedspeed"] > 2 * spread["fedspeed_fl_simulator"], spread
