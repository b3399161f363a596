"""DFedSAM, DFedSAM-MGS (Shi et al., ICML 2023) and DFedAvg(M) (Sun, Li, Wang, TPAMI 2022) as the `dsgd` protocol
with the `fedsam`, `fedavg` and `sgdm` client rules: their special cases equal the simpler methods exactly, the
heavy-ball rule is the paper's recursion, both runtimes agree, and bad settings are one-line errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rulekit import batch_of, finished, numbers

import fedsim
from fedsim.clients import ALGORITHMS
from fedsim.clients.sgdm import HeavyBallSGD, SGDMParams
from fedsim.errors import ScenarioError
from fedsim.params import tree_nbytes
from fedsim.runtime.local import job_info
from fedsim.scenario import load_scenarios


def gossip(algorithm: dict[str, Any], num_clients: int = 8, rounds: int = 3, runtime: str = "sequential",
           **protocol: Any) -> dict[str, Any]:
    """Local-update gossip on a ring of digits nodes with label skew (logistic regression), 3 local steps."""
    return {
        "name": "dfedsam", "seed": 0, "rounds": rounds, "num_clients": num_clients,
        "data": {"name": "digits"}, "partition": {"name": "labeldir", "alpha": 0.3}, "model": {"name": "logreg"},
        "algorithm": {"lr": 0.05, "batch_size": 20, "local_epochs": 1, **algorithm},
        "protocol": {"name": "dsgd", "local_steps": 3, **protocol}, "topology": {"name": "ring"},
        "runtime": {"name": runtime},
    }


def without_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.endswith("_time")} for row in numbers(rows)]


def test_dfedsam_with_rho_zero_is_dfedavg_bit_for_bit_in_rows_and_node_states():
    sam = finished(gossip({"name": "fedsam", "rho": 0.0}, rounds=2, gossip_steps=2))
    avg = finished(gossip({"name": "fedavg"}, rounds=2, gossip_steps=2))
    assert len(sam.recorder.rows) == 3
    assert without_times(sam.recorder.rows) == without_times(avg.recorder.rows)
    for key, leaf in sam.nodes.stacked.items():
        assert torch.equal(leaf, avg.nodes.stacked[key])
    assert sam.recorder.rows[-1]["consensus_error"] > 1e-6
    # The same learning, but a SAM step is charged two gradients on the clock.
    assert sam.recorder.rows[-1]["sim_time"] > avg.recorder.rows[-1]["sim_time"]


def test_dfedsam_on_the_complete_graph_with_uniform_weights_is_fedsam_with_every_client():
    n = 3  # digits' iid split gives 3 clients 539 training samples each, so uniform and sample weights agree
    sam = {"name": "fedsam", "rho": 0.1}
    base = gossip(sam, num_clients=n) | {"partition": {"name": "iid"}, "topology": {"name": "complete"},
                                         "protocol": {"name": "dsgd", "mixing": {"name": "uniform_neighbour"}}}
    federated = {k: v for k, v in base.items() if k not in ("protocol", "topology")} | {
        "clients_per_round": n, "server": {"name": "fedavg", "weighting": "uniform"}}
    decentralized = fedsim.run(base, write=False).metrics.rows
    synchronous = fedsim.run(federated, write=False).metrics.rows
    assert [r["round"] for r in decentralized] == [r["round"] for r in synchronous] == [0, 1, 2, 3]
    for d, s in zip(decentralized, synchronous, strict=True):
        for key in ("loss", "accuracy", "test_loss"):
            assert d[key] == pytest.approx(s[key], rel=1e-5), (d["round"], key)
    assert decentralized[-1]["loss"] < decentralized[0]["loss"] - 0.3
    assert all(r["consensus_error"] < 1e-20 for r in decentralized[1:])


def test_dfedsam_mgs_sends_each_model_q_times_per_edge_and_round():
    q, rounds, n = 3, 2, 6
    protocol = finished(gossip({"name": "fedsam", "rho": 0.05}, num_clients=n, rounds=rounds, gossip_steps=q))
    model_bytes = tree_nbytes(protocol.sim.model.init_params)
    assert [r["bytes_up"] for r in protocol.recorder.rows] == [k * q * 2 * n * model_bytes for k in range(rounds + 1)]


def test_dfedsam_mgs_agrees_more_than_dfedsam_on_a_ring():
    one, many = (finished(gossip({"name": "fedsam", "rho": 0.05}, rounds=2, gossip_steps=q)) for q in (1, 4))
    for a, b in zip(one.recorder.rows[1:], many.recorder.rows[1:], strict=True):
        assert b["consensus_error"] < 0.5 * a["consensus_error"]


class Quadratic:
    """Oracle stand-in for f(w) = sum_k a_k (w_k - c_k)^2 / 2."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor) -> None:
        self.a, self.c = a, c

    def grad(self, params, batch):
        return {"w": self.a * (params["w"] - self.c)}


def test_sgdm_takes_heavy_ball_steps_from_zero_momentum():
    lr, theta, steps = 0.1, 0.7, 6
    a, c = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64), torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64)
    rule, oracle = HeavyBallSGD(SGDMParams(lr=lr, momentum=theta)), Quadratic(a, c)
    batch = batch_of(torch.zeros(1), torch.zeros(1))
    start = torch.tensor([0.5, 0.5, -1.0], dtype=torch.float64)
    state = rule.init({"params": {"w": start}}, None, job_info(10, steps, 0))
    for _ in range(steps):
        state = rule.step(state, batch, oracle)
    message, client_state = rule.final(state)
    # The paper's recursion, y_{k+1} = y_k - lr g(y_k) + theta (y_k - y_{k-1}) with y_{-1} = y_0, by hand.
    y, previous = start, start
    for _ in range(steps):
        y, previous = y - lr * a * (y - c) + theta * (y - previous), y
    torch.testing.assert_close(state["params"]["w"], y, rtol=0, atol=1e-12)
    torch.testing.assert_close(message["delta"]["w"], y - start, rtol=0, atol=1e-12)
    assert client_state is None
    # The same iterates as the velocity form of torch.optim.SGD's momentum (dampening 0): v <- theta v + g, y -= lr v.
    w, v = start, torch.zeros_like(start)
    for _ in range(steps):
        v = theta * v + a * (w - c)
        w = w - lr * v
    torch.testing.assert_close(state["params"]["w"], w, rtol=0, atol=1e-12)
    assert (y - start).abs().min() > 0.1


def test_sgdm_is_registered_as_a_client_rule_with_fedavgs_server():
    entry = ALGORITHMS.get("sgdm")
    assert entry.meta["server"] == "fedavg" and entry.meta["stragglers"] == "drop"
    assert entry.obj.step_cost == 1 and entry.meta.get("vectorizable", True)


@pytest.mark.parametrize("protocol", ["synchronous", "dsgd"])
def test_sgdm_with_momentum_zero_is_fedavg_bit_for_bit_and_momentum_changes_it(tiny, protocol):
    local = {"lr": 0.05, "batch_size": 20, "local_epochs": 1}
    base = tiny if protocol == "synchronous" else gossip({})
    rows = {name: numbers(fedsim.run({**base, "algorithm": {"name": name, **local, **hp}}, write=False).metrics.rows)
            for name, hp in [("fedavg", {}), ("sgdm", {"momentum": 0.0})]}
    assert rows["sgdm"] == rows["fedavg"]
    heavy = numbers(fedsim.run({**base, "algorithm": {"name": "sgdm", "momentum": 0.9, **local}}, write=False)
                    .metrics.rows)
    assert heavy[-1]["loss"] != rows["fedavg"][-1]["loss"]
    assert heavy[-1]["loss"] < heavy[0]["loss"]


@pytest.mark.parametrize("algorithm", [{"name": "fedsam", "rho": 0.05}, {"name": "sgdm", "momentum": 0.9}],
                         ids=["dfedsam_mgs", "dfedavgm"])
def test_vectorized_equals_sequential_in_every_figure_and_node_state(algorithm):
    runs = {runtime: finished(gossip(algorithm, rounds=2, runtime=runtime, gossip_steps=3))
            for runtime in ("sequential", "vectorized")}
    rows = {runtime: numbers(p.recorder.rows) for runtime, p in runs.items()}
    assert len(rows["vectorized"]) == len(rows["sequential"]) == 3
    for vec, seq in zip(rows["vectorized"], rows["sequential"], strict=True):
        assert vec.keys() == seq.keys()
        for key, value in seq.items():  # figures to float tolerance; per-node histograms (counts) exactly
            assert vec[key] == (value if isinstance(value, list) else pytest.approx(value, rel=1e-4)), key
    assert rows["vectorized"][-1]["consensus_error"] > 1e-6
    for key, leaf in runs["sequential"].nodes.stacked.items():
        torch.testing.assert_close(runs["vectorized"].nodes.stacked[key], leaf, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("change", "field"), [
    ({"protocol": {"name": "dsgd", "gossip_steps": 0}}, "protocol.gossip_steps"),
    ({"algorithm": {"name": "sgdm", "momentum": -0.1}}, "algorithm.momentum"),
    ({"algorithm": {"name": "sgdm", "momentum": 1.0}}, "algorithm.momentum"),
])
def test_bad_gossip_steps_and_momentum_are_one_line_errors_naming_the_field(change, field):
    with pytest.raises(ScenarioError) as info:
        load_scenarios(gossip({"name": "fedavg"}) | change)
    message = str(info.value)
    assert message.startswith(f"{field}:") and "\n" not in message
