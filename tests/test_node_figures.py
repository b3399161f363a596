"""Per-node figures of gossip protocols: each node's own model on its own test split as a distribution over nodes,
the mean squared distance of the nodes to a known optimum, and the node map the topology picture draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rulekit import finished, spread

import fedsim
from fedsim.evaluation import split_sums
from fedsim.outputs import timeline_file
from fedsim.params import tree_unstack


def ring(tiny, **extra) -> dict:
    return {**tiny, "num_clients": 6, "clients_per_round": None, "rounds": 2, "protocol": {"name": "dsgd"},
            "topology": {"name": "ring"}, **extra}


def test_node_accuracy_is_the_mean_over_nodes_of_each_model_on_its_own_test_split(tiny):
    protocol = finished({**ring(tiny), "rounds": 1, "protocol": {"name": "dsgd", "local_steps": 0}}, spread)
    data, objective = protocol.sim.data, protocol.sim.objective
    own = []
    for node, params in enumerate(tree_unstack(protocol.nodes.stacked, 6)):
        sums = split_sums(objective, params, *data.client_test(node))
        own.append(float(sums["accuracy"] / sums["count"]))
    row = protocol.recorder.rows[-1]
    assert row["node_accuracy"] == pytest.approx(np.mean(own), rel=1e-12)
    assert row["node_accuracy_worst10"] == pytest.approx(min(own), rel=1e-12)
    assert sum(row["node_accuracy_histogram"]) == 6
    assert np.allclose(protocol.recorder.timeline.node_map["map_accuracy"], own)
    assert len(protocol.recorder.timeline.node_map["map_edges"]) == 6


def test_nodes_report_their_mean_squared_distance_to_a_known_optimum(tiny):
    regression = ring(tiny, data={"name": "least_squares"}, model={"name": "linear"},
                      algorithm={"name": "fedavg", "lr": 0.05, "batch_size": 20})
    protocol = finished(regression, spread)
    optimum = protocol.sim.evaluator.optimum
    flat = torch.cat([v.reshape(6, -1).double() for v in protocol.nodes.stacked.values()], dim=1)
    expected = float(((flat - optimum) ** 2).sum(1).mean())
    assert protocol.recorder.rows[-1]["node_squared_distance_to_optimum"] == pytest.approx(expected, rel=1e-12)
    assert "node_test_loss" in protocol.recorder.rows[-1]


def test_a_gossip_run_writes_its_node_map_and_topology_picture(tiny, tmp_path: Path):
    fedsim.run(ring(tiny), out=tmp_path / "run")
    saved = np.load(tmp_path / "run" / timeline_file("tiny"))
    assert saved["map_edges"].shape == (6, 2) and saved["map_accuracy"].shape == (6,)
    assert (tmp_path / "run" / "topology.png").stat().st_size > 10_000
