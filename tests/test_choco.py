"""Compressed gossip (CHOCO-SGD) on D-SGD's gossip path: public copies kept by a receiver-mirrored codec, the
consensus step, the network average kept, payload bytes per edge, and which protocols have which message paths."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rulekit import finished, protocol_of, spread
from torch.func import vmap

import fedsim
from fedsim.errors import ScenarioError
from fedsim.params import tree_map
from fedsim.scenario import load_scenarios
from fedsim.topologies.mixing import consensus_error

TOPK_PUBLIC = {"name": "topk", "ratio": 0.05, "error_feedback": {"name": "ef21", "first_message": "compressed"}}
"""CHOCO's Q(x - x^) with x^ += q, from x^ = 0 (the paper's start)."""


def ring(num_clients: int = 8, rounds: int = 3, gossip: dict | None = None, **protocol: Any) -> dict[str, Any]:
    """D-SGD on a ring of digits nodes (logistic regression, 650 parameters) with a gossip codec."""
    return {
        "name": "choco", "seed": 0, "rounds": rounds, "num_clients": num_clients,
        "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
        "protocol": {"name": "dsgd", **protocol}, "topology": {"name": "ring"},
        "runtime": {"name": "sequential"}, "compression": {"gossip": gossip},
    }


def consensus_errors(mapping: dict[str, Any]) -> list[float]:
    protocol = finished(mapping, lambda p: spread(p, seed=1))
    return [row["consensus_error"] for row in protocol.recorder.rows]


def test_choco_gossip_keeps_the_network_average_under_a_doubly_stochastic_matrix():
    protocol = protocol_of(ring(num_clients=9, gossip=TOPK_PUBLIC, consensus_step=0.3))
    spread(protocol)
    before = tree_map(lambda v: v.double().mean(0), protocol.nodes.stacked)
    for t in range(20):
        protocol.mix_nodes(t)
    after = tree_map(lambda v: v.double().mean(0), protocol.nodes.stacked)
    # float32 nodes: each step adds gamma ((W x^)_i - x^_i), whose sum over nodes is zero up to rounding.
    tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-6), after, before)


def test_choco_gossip_reaches_consensus_where_compressing_the_models_themselves_stalls():
    # CHOCO-Gossip (no local steps) on a ring of 12 with top-5%: the public copies catch up with the models and the
    # consensus error falls by orders of magnitude; sending top-k of the models themselves (no public copies) stalls.
    choco = consensus_errors(ring(num_clients=12, rounds=300, gossip=TOPK_PUBLIC, local_steps=0,
                                  consensus_step=0.2) | {"evaluation": {"every": 300}})
    naive = consensus_errors(ring(num_clients=12, rounds=300, gossip={"name": "topk", "ratio": 0.05},
                                  local_steps=0, consensus_step=0.2) | {"evaluation": {"every": 300}})
    assert choco[-1] < 1e-5 * choco[0]  # 610 -> 1.8e-3 here; exact gossip reaches 1e-12
    assert naive[-1] > 0.1 * naive[0]  # 610 -> 102


def test_choco_with_the_identity_codec_and_unit_step_is_exact_dsgd():
    exact = fedsim.run(ring(rounds=4), write=False).metrics.rows
    choco = fedsim.run(ring(rounds=4, gossip={"name": "identity"}), write=False).metrics.rows
    for a, b in zip(choco, exact, strict=True):
        assert a["bytes_up"] == b["bytes_up"]
        for key in ("loss", "accuracy", "consensus_error"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key


def test_gossip_bytes_are_each_nodes_payload_times_the_nodes_that_hear_it():
    # 8 nodes on a ring, 2 neighbours each, 2 gossip steps a round, 2 rounds; top-k of 650 floats at 5% = 33
    # (index, value) pairs; EF21's first message goes uncompressed (650 floats).
    full, topk = 650 * 4, 33 * (4 + 4)
    public = {**TOPK_PUBLIC, "error_feedback": "ef21"}
    rows = fedsim.run(ring(rounds=2, gossip=public, gossip_steps=2, consensus_step=0.5), write=False).metrics.rows
    assert rows[-1]["bytes_up"] == 8 * 2 * (full + topk + 2 * topk)


def test_runtimes_agree_on_choco_sgd():
    rows = {runtime: fedsim.run(ring(rounds=3, gossip=TOPK_PUBLIC, consensus_step=0.5) | {
        "runtime": {"name": runtime}}, write=False).metrics.rows for runtime in ("sequential", "vectorized")}
    for a, b in zip(rows["sequential"], rows["vectorized"], strict=True):
        assert a["bytes_up"] == b["bytes_up"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_choco_sgd_trains_close_to_exact_dsgd_with_a_fraction_of_the_bytes():
    exact = fedsim.run(ring(rounds=15), write=False).metrics.rows[-1]
    choco = fedsim.run(ring(rounds=15, gossip={**TOPK_PUBLIC, "ratio": 0.2}, consensus_step=0.5),
                       write=False).metrics.rows[-1]
    assert choco["bytes_up"] < 0.45 * exact["bytes_up"]
    assert choco["accuracy"] > exact["accuracy"] - 0.05 and choco["consensus_error"] < 1.0


@pytest.mark.parametrize("change, field", [
    ({"compression": {"uplink": {"name": "topk", "ratio": 0.1}}},
     "compression.uplink: protocol 'dsgd' has no uplink path (its paths are gossip)"),
    ({"protocol": {"name": "dadao"}, "compression": {"gossip": {"name": "topk", "ratio": 0.1}}},
     "compression.gossip: protocol 'dadao' has no gossip path (it sends nothing through a codec)"),
    ({"protocol": {"name": "dsgd", "consensus_step": 0}}, "protocol.consensus_step"),
    ({"protocol": {"name": "dsgd", "consensus_step": 1.5}}, "protocol.consensus_step"),
    ({"compression": {"gossip": {"name": "topk", "ratio": 0}}}, "compression.gossip.ratio"),
], ids=["uplink-on-dsgd", "gossip-on-dadao", "gamma-zero", "gamma-above-one", "bad-codec"])
def test_codecs_on_paths_a_protocol_lacks_and_bad_gossip_settings_are_one_line_errors(change, field):
    with pytest.raises(ScenarioError) as info:
        load_scenarios(ring() | change)
    assert str(info.value).startswith(field) and "\n" not in str(info.value)


def test_a_gossip_codec_on_a_client_server_protocol_is_refused(tiny):
    with pytest.raises(ScenarioError) as info:
        load_scenarios({**tiny, "compression": {"gossip": {"name": "sign"}}})
    assert str(info.value).startswith("compression.gossip: protocol 'synchronous' has no gossip path (its paths "
                                      "are uplink, downlink)")


def test_consensus_error_of_choco_gossip_falls_below_its_start_within_a_few_rounds():
    protocol = protocol_of(ring(num_clients=6, gossip=TOPK_PUBLIC, consensus_step=0.3))
    spread(protocol)
    start = consensus_error(protocol.nodes.stacked)
    for t in range(30):
        protocol.mix_nodes(t)
    assert consensus_error(protocol.nodes.stacked) < start


def test_after_a_full_first_message_the_public_copies_are_the_models_as_sent():
    # EF21's opening keeps the message itself as h; the nodes' rows are then rewritten in place by the mixing, so the
    # public copies must be the rows as they were sent, not the mixed ones.
    protocol = protocol_of(ring(gossip={**TOPK_PUBLIC, "error_feedback": "ef21"}, consensus_step=0.5))
    spread(protocol)
    sent = tree_map(torch.clone, protocol.nodes.stacked)
    protocol.mix_nodes(0)
    tree_map(lambda h, x: torch.testing.assert_close(h, x, rtol=0, atol=0), protocol.public.states["h"], sent)
    assert not all(torch.equal(a, b) for a, b in zip(sent.values(), protocol.nodes.stacked.values(), strict=True))



class TwoNodeLink:
    """A stand-in halo neighbourhood between two processes of one node each: `exchange` hands this node's payload
    to the other side's queue and returns the other side's, as gRPC peers do."""

    def __init__(self) -> None:
        self.sent: list = []
        self.incoming: list = []

    def exchange(self, payload):
        self.sent.append(payload)
        return self.incoming.pop(0)

    def mix(self, rows, halo, W):
        return tree_map(lambda x, h: (x + h) / 2, rows, halo)


def test_on_a_fixed_graph_peers_carry_payloads_and_decode_them_into_their_own_mirrors():
    from fedsim.codecs import build_codec
    from fedsim.gossip_protocol import PublicCopies

    codec = build_codec({**TOPK_PUBLIC, "ratio": 0.3}, "compression.gossip")
    template = {"w": torch.zeros(10)}
    a, b = (PublicCopies(codec, 0.5, template, range(k, k + 1), seed=0, halo=1) for k in (0, 1))
    link_a, link_b = TwoNodeLink(), TwoNodeLink()
    x = {"w": torch.arange(10.0).unsqueeze(0)}
    y = {"w": -torch.arange(10.0).unsqueeze(0)}
    for t in range(5):
        # b's payload of this step, computed on a copy of b's copies, is what a receives (and the other way round).
        link_a.incoming.append(_payload_of(b, y, t))
        link_b.incoming.append(_payload_of(a, x, t))
        x, _ = a.gossip(x, t, 0, link_a, None)
        y, _ = b.gossip(y, t, 0, link_b, None)
        assert set(link_a.sent[-1]) == {"update"}  # a payload went out, not a decoded row
        torch.testing.assert_close(a.halo_mirrors["h"]["w"], b.states["h"]["w"], rtol=0, atol=0)
        torch.testing.assert_close(b.halo_mirrors["h"]["w"], a.states["h"]["w"], rtol=0, atol=0)


def _payload_of(copies, rows, t):
    """The payload `copies` sends for `rows` at round t's first gossip step, without changing `copies`."""
    codec, first = copies.codec, copies.first
    payload, _ = vmap(lambda m, s, k: codec.encode(m, s, k, first=first))(rows, copies.states, copies.keys(t, 0))
    return payload
