"""Differential privacy through the Flower bridge: DP-SGD's noise is drawn on the nodes and DP-FedAvg's on the
server exactly as in an in-process run, and the accountant lives on the server, so the bridge's metrics rows,
epsilon included, are the in-process run's, rounds that sample no client counted too."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("flwr")

from test_flower_bridge import assert_same_metrics, bridged, in_process, small  # noqa: E402

from fedsim.accounting import PrivacyLedger  # noqa: E402

Z, S = 0.8, 0.5
"""DP-FedAvg's noise multiplier and clip."""


def dpsgd_scenario(sigma: float = 1.0) -> dict[str, Any]:
    """The bridge's small digits setup with Poisson batches and DP-SGD."""
    scenario = small("fedavg", privacy={"name": "dpsgd", "clip": 1.0, "noise_multiplier": sigma})
    return {**scenario, "algorithm": {**scenario["algorithm"], "sampling": "poisson"}}


def dpfedavg_scenario(z: float = Z) -> dict[str, Any]:
    """10 clients, each drawn with probability 1/10 a round: with seed 2 rounds 0 and 1 sample no client, rounds 2
    and 3 two and one."""
    return {**small("fedavg"), "seed": 2, "rounds": 4, "num_clients": 10, "clients_per_round": 1,
            "stragglers": {"fraction": 0.0}, "protocol": {"name": "synchronous", "client_sampling": "poisson"},
            "privacy": {"name": "dpfedavg", "clip": S, "noise_multiplier": z, "accountants": ["rdp", "pld"]}}


def assert_same_privacy(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    """Every row reports epsilon per accountant and delta, exactly as the reference row does."""
    for row, ref in zip(rows, reference, strict=True):
        private = {k: v for k, v in ref.items() if k.startswith("epsilon_") or k == "delta"}
        assert "epsilon_rdp" in private and "delta" in private
        assert {k: row[k] for k in private} == private


def test_dpsgd_through_flower_gives_the_in_process_metrics_and_epsilon():
    scenario = dpsgd_scenario()
    rows, reference = bridged(scenario), in_process(scenario)
    assert_same_metrics(rows, reference)
    assert_same_privacy(rows, reference)
    assert 0 == rows[0]["epsilon_rdp"] < rows[1]["epsilon_rdp"] < rows[2]["epsilon_rdp"]
    # The nodes drew the noise: without it the run differs.
    assert rows[-1]["loss"] != in_process(dpsgd_scenario(sigma=0.0))[-1]["loss"]


def test_dpfedavg_through_flower_gives_the_in_process_metrics_with_rounds_that_sample_no_client():
    scenario = dpfedavg_scenario()
    rows, reference = bridged(scenario), in_process(scenario)
    assert [r["client_updates"] for r in rows] == [0, 0, 0, 2, 3]
    assert_same_metrics(rows, reference)
    assert_same_privacy(rows, reference)
    # Round 0 sampled no client, yet its noise moved the model: without noise it stays put.
    noiseless = in_process(dpfedavg_scenario(z=0.0))
    assert rows[1]["loss"] != rows[0]["loss"] and noiseless[1]["loss"] == noiseless[0]["loss"]


def test_the_servers_accountant_counts_one_release_per_round_empty_ones_included():
    rows = bridged(dpfedavg_scenario())
    for row in rows:
        ledger = PrivacyLedger()
        if row["round"]:
            ledger.record(Z, 1 / 10, row["round"])
        assert row["epsilon_rdp"] == ledger.epsilon(1e-5, "rdp")
        assert row["epsilon_pld"] == ledger.epsilon(1e-5, "pld")
    assert rows[1]["epsilon_rdp"] > 0 == rows[1]["client_updates"]
