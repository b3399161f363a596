"""FedProx paper, Figure 1 (Synthetic(1,1), E = 20, 90% stragglers): FedAvg dropping stragglers is worst,
FedProx with mu = 0 (partial work kept) is better, mu = 1 is best. CI runs a 20-round version on a fixed seed;
the full 200-round scenario is marked slow (`pytest -m slow`)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

import fedsim

SCENARIO = Path(__file__).parent.parent / "scenarios" / "fedprox_synthetic.yaml"


def final_by_variant(result) -> dict[str, dict]:
    last = result.metrics.rows[-1]["round"]
    return {row["variant"]: row for row in result.metrics.rows if row["round"] == last}


def assert_paper_ordering(final: dict[str, dict]) -> None:
    loss = {v: row["loss"] for v, row in final.items()}
    accuracy = {v: row["accuracy"] for v, row in final.items()}
    assert loss["fedavg_drop"] > loss["fedprox_mu0"] > loss["fedprox_mu1"], loss
    assert accuracy["fedavg_drop"] < accuracy["fedprox_mu0"] < accuracy["fedprox_mu1"], accuracy


def test_fedprox_systems_heterogeneity_ordering_reduced():
    result = fedsim.run(SCENARIO, overrides={"rounds": 20, "evaluation.every": 20,
                                             "evaluation.dissimilarity": False}, write=False)
    assert_paper_ordering(final_by_variant(result))


@pytest.mark.slow
def test_fedprox_systems_heterogeneity_ordering_full():
    result = fedsim.run(SCENARIO, overrides={"evaluation.every": 5}, write=False)
    assert_paper_ordering(final_by_variant(result))
    late = {v: [r for r in result.metrics.rows if r["variant"] == v and r["round"] >= 100]
            for v in ("fedavg_drop", "fedprox_mu0", "fedprox_mu1")}
    # Figure 2: the proximal term lowers the dissimilarity of local gradients (mu = 1 against mu = 0).
    dissimilarity = {v: statistics.median(r["dissimilarity"] for r in rows) for v, rows in late.items()}
    assert dissimilarity["fedprox_mu1"] < dissimilarity["fedprox_mu0"], dissimilarity
    # Figure 1: FedAvg with dropped stragglers is unstable; FedProx with mu = 1 is steady.
    spread = {v: statistics.pstdev(r["loss"] for r in rows) for v, rows in late.items()}
    assert spread["fedavg_drop"] > 3 * spread["fedprox_mu1"], spread
