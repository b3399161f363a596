"""CDProxSGT (`servers/cdproxsgt.py`): DProxSGT's recurrence with the identity codec, the gradient-tracking invariant
under compression, the L1 prox's sparsity, training with fewer bytes, and its scenario checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rulekit import finished, protocol_of

import fedsim
from fedsim.errors import ScenarioError
from fedsim.params import tree_map
from fedsim.scenario import load_scenarios

TOPK_PUBLIC = {"name": "topk", "ratio": 0.3, "error_feedback": {"name": "ef21", "first_message": "compressed"}}


def ring(rounds: int = 3, gossip: dict | None = None, num_clients: int = 6, **protocol: Any) -> dict[str, Any]:
    """CDProxSGT on a ring of digits nodes (logistic regression) with one 20-sample stochastic gradient a round."""
    return {
        "name": "cdproxsgt", "seed": 0, "rounds": rounds, "num_clients": num_clients,
        "data": {"name": "digits"}, "partition": {"name": "labeldir", "alpha": 0.3}, "model": {"name": "logreg"},
        "algorithm": {"name": "gradient", "batch_size": 20, "local_steps": 1},
        "protocol": {"name": "cdproxsgt", "lr": 0.1, **protocol}, "topology": {"name": "ring"},
        "runtime": {"name": "sequential"}, "compression": {"gossip": gossip},
    }


def dense(W: torch.Tensor) -> torch.Tensor:
    return (W.to_dense() if W.layout != torch.strided else W).double()


def mixed(W: torch.Tensor, rows: dict) -> dict:
    return tree_map(lambda v: (dense(W) @ v.double().reshape(len(v), -1)).reshape(v.shape).to(v.dtype), rows)


def test_with_the_identity_codec_and_unit_steps_it_is_dproxsgts_recurrence():
    # DProxSGT (authors' train_DProxSGT): y <- W (y + g - g_prev), x <- W prox_{eta lambda}(x - eta y), with the
    # nodes' own stochastic gradients (taken here through the same jobs, at the reference's models).
    eta, lam = 0.1, 0.02
    protocol, reference = (protocol_of(ring(l1=lam)) for _ in range(2))
    y = tree_map(torch.zeros_like, reference.nodes.stacked)
    last = tree_map(torch.zeros_like, y)
    for t in range(4):
        protocol.take_step(t)
        W = reference.graphs.mixing(t)
        g, _ = reference.node_messages(t, "grad")
        y = mixed(W, tree_map(lambda a, b, c: a + (b - c), y, g, last))
        last = g
        stepped = tree_map(lambda x, v: (x - eta * v).sign() * ((x - eta * v).abs() - eta * lam).clamp_min(0),
                           reference.nodes.stacked, y)
        reference.nodes.assign(mixed(W, stepped))
        tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6), protocol.nodes.stacked,
                 reference.nodes.stacked)
        tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6), protocol.trackers, y)


def test_compressed_trackers_keep_the_mean_of_the_latest_gradients():
    # Gradient tracking's invariant mean_i y_i^t = mean_i g_i^t holds under a doubly stochastic W (Metropolis on a
    # ring) whatever the codec does to the public copies.
    protocol = protocol_of(ring(gossip=TOPK_PUBLIC, gamma_x=0.5, gamma_y=0.5, l1=0.01))
    for t in range(6):
        protocol.take_step(t)
        tree_map(lambda y, g: torch.testing.assert_close(y.double().mean(0), g.double().mean(0), rtol=0, atol=1e-6),
                 protocol.trackers, protocol.last_grads)


def test_on_the_complete_graph_with_uniform_weights_every_node_holds_the_same_model():
    protocol = finished(ring(rounds=4) | {"topology": {"name": "complete"},
                                          "protocol": {"name": "cdproxsgt", "lr": 0.1,
                                                       "mixing": {"name": "uniform_neighbour"}}})
    assert all(row["consensus_error"] < 1e-12 for row in protocol.recorder.rows[1:])


def test_the_l1_prox_zeroes_parameters_as_lambda_grows():
    sparsity = {lam: fedsim.run(ring(rounds=10, l1=lam), write=False).metrics.rows[-1]["sparsity"]
                for lam in (0.0, 0.05)}
    assert sparsity[0.0] == 0.0 and sparsity[0.05] > 0.1  # 0.18 here


def test_compressed_cdproxsgt_trains_with_a_fraction_of_the_bytes():
    exact = fedsim.run(ring(rounds=30), write=False).metrics.rows
    compressed = fedsim.run(ring(rounds=30, gossip=TOPK_PUBLIC, gamma_x=0.5, gamma_y=0.5), write=False).metrics.rows
    assert compressed[-1]["bytes_up"] < 0.65 * exact[-1]["bytes_up"]
    assert compressed[-1]["loss"] < compressed[0]["loss"] - 0.5
    assert compressed[-1]["accuracy"] > exact[-1]["accuracy"] - 0.1


def test_runtimes_agree_on_cdproxsgt():
    rows = {runtime: fedsim.run(ring(gossip=TOPK_PUBLIC, gamma_x=0.5, gamma_y=0.5, l1=0.01) | {
        "runtime": {"name": runtime}}, write=False).metrics.rows for runtime in ("sequential", "vectorized")}
    for a, b in zip(rows["sequential"], rows["vectorized"], strict=True):
        assert a["bytes_up"] == b["bytes_up"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("change, field", [
    ({"algorithm": {"name": "fedavg", "lr": 0.1}}, "algorithm.name: protocol 'cdproxsgt' carries only ['grad']"),
    ({"protocol": {"name": "cdproxsgt"}}, "protocol.lr: "),
    ({"protocol": {"name": "cdproxsgt", "lr": 0.1, "gamma_x": 0}}, "protocol.gamma_x: "),
    ({"protocol": {"name": "cdproxsgt", "lr": 0.1, "gamma_y": 2}}, "protocol.gamma_y: "),
    ({"protocol": {"name": "cdproxsgt", "lr": 0.1, "l1": -1}}, "protocol.l1: "),
    ({"compression": {"uplink": {"name": "sign"}}}, "compression.uplink: protocol 'cdproxsgt' has no uplink path"),
    ({"clients_per_round": 2}, "clients_per_round: "),
], ids=["not-gradient", "no-lr", "gamma-x", "gamma-y", "l1", "uplink", "sample"])
def test_bad_cdproxsgt_settings_are_one_line_errors_naming_the_field(change, field):
    with pytest.raises(ScenarioError) as info:
        load_scenarios(ring() | change)
    assert str(info.value).startswith(field) and "\n" not in str(info.value)
