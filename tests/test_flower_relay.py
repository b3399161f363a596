"""Gossip relayed through a Flower ServerApp: each node holds its own model, takes its local steps from it, and
mixes with exactly its graph neighbours' models, which the ServerApp relays; the metrics equal the in-process run."""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("flwr")

import fedsim  # noqa: E402
from fedsim.flower import client as flower_client  # noqa: E402
from fedsim.flower.client import client_app  # noqa: E402
from fedsim.flower.local import run_in_process  # noqa: E402
from fedsim.flower.runtime import FlowerError  # noqa: E402
from fedsim.flower.server import metrics_rows, server_app  # noqa: E402


def ring(order: str = "atc", **extra: Any) -> dict[str, Any]:
    """D-SGD on a ring of 5 digits nodes with label skew, 3 rounds, evaluated every round."""
    return {"name": "relay", "seed": 2, "rounds": 3, "num_clients": 5, "data": {"name": "digits"},
            "partition": {"name": "labeldir", "alpha": 0.5}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
            "protocol": {"name": "dsgd", "order": order, "mixing": {"name": "metropolis_hastings"}},
            "topology": {"name": "ring"}, "runtime": {"name": "sequential"}, **extra}


def relayed(scenario: dict[str, Any], run_config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    configs = [{"partition-id": k} for k in range(scenario["num_clients"])]
    return metrics_rows(run_in_process(server_app(scenario), client_app(scenario), configs, run_config))


@pytest.mark.parametrize("order", ["atc", "cta"])
def test_dsgd_relayed_through_flower_gives_the_in_process_metrics(order):
    scenario = ring(order)
    rows, reference = relayed(scenario), fedsim.run(scenario, write=False).metrics.rows
    assert len(rows) == len(reference) == 4
    for row, ref in zip(rows, reference, strict=True):
        for key in ("loss", "test_loss", "accuracy", "consensus_error", "sim_time", "bytes_up"):
            assert math.isclose(row[key], ref[key], rel_tol=1e-5, abs_tol=1e-9), (key, row, ref)
    assert rows[-1]["consensus_error"] > 0


def test_each_node_receives_exactly_its_neighbours_models(monkeypatch):
    seen: dict[int, list[int]] = {}
    original = flower_client.mix

    def spy(scenario, content, context):
        facts = content.config_records[flower_client.MIX]
        sent = sorted(int(key.split(".")[1]) for key in content.array_records)
        seen.setdefault(int(facts["node"]), sent)
        return original(scenario, content, context)

    monkeypatch.setattr(flower_client, "mix", spy)
    relayed(ring(rounds=1))
    assert seen == {i: sorted({(i - 1) % 5, (i + 1) % 5}) for i in range(5)}


def test_local_steps_start_from_the_model_the_node_holds(monkeypatch):
    starts_sent: list[bool] = []
    original = flower_client.train

    def spy(scenario, content, context):
        starts_sent.append(flower_client.START in content)
        return original(scenario, content, context)

    monkeypatch.setattr(flower_client, "train", spy)
    relayed(ring(rounds=1))
    assert starts_sent == [False] * 5


def test_a_relayed_node_that_stops_answering_ends_the_run_naming_it(monkeypatch):
    original = flower_client.mix

    def silent_node_3(scenario, content, context):
        if int(content.config_records[flower_client.MIX]["node"]) == 3:
            raise KeyboardInterrupt  # the ClientApp dies without a reply
        return original(scenario, content, context)

    monkeypatch.setattr(flower_client, "mix", silent_node_3)
    # (In one process the engine's single worker is gone with node 3, so the nodes after it go unanswered too.)
    with pytest.raises(FlowerError, match=r"^nodes: gossip node\(s\) \[3\b.* did not answer a gossip step within 2 s"):
        relayed(ring(rounds=1), {"timeout": 2.0})
