"""gRPC gossip links between peers on 127.0.0.1: payloads arrive bit-exact in the right mailbox, a peer that starts
late is waited for, a silent or unknown peer is one error naming it; D-SGD, DFedSAM-MGS and a token walk run as one
process per node give the in-process run's metrics."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedsim.peers.link import PeerError, PeerNode
from fedsim.peers.wire import MalformedPayload, decode_payload, encode_payload


@pytest.fixture
def ring():
    """Three nodes on a ring, each listening on a free port of 127.0.0.1."""
    nodes = [PeerNode(i, "127.0.0.1:0", timeout=5.0) for i in range(3)]
    for node in nodes:
        node.connect({j: nodes[j].address for j in range(3) if j != node.node})
    yield nodes
    for node in nodes:
        node.close()


def tree(k: int) -> dict:
    return {"params": {"w": torch.full((3, 2), float(k)), "b": torch.tensor([k], dtype=torch.int64)},
            "half": torch.arange(4, dtype=torch.bfloat16) * k}


def test_payloads_round_trip_bit_exact_with_dtypes_and_keys():
    back = decode_payload(encode_payload(tree(3)))
    assert list(back) == ["params", "half"] and list(back["params"]) == ["w", "b"]
    assert back["half"].dtype == torch.bfloat16 and torch.equal(back["half"], tree(3)["half"])
    assert torch.equal(back["params"]["b"], torch.tensor([3]))
    with pytest.raises(MalformedPayload):
        decode_payload(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")


def test_every_node_receives_each_neighbours_payload_for_the_round(ring):
    received = {}

    def run(node):
        others = [j for j in range(3) if j != node.node]
        for j in others:
            node.deliver(j, 7, "params", encode_payload(tree(node.node)))
        received[node.node] = {j: decode_payload(data)
                               for j, data in node.mailbox.collect(7, "params", others, 5.0).items()}

    threads = [threading.Thread(target=run, args=(n,)) for n in ring]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        assert sorted(received[i]) == [j for j in range(3) if j != i]
        for j, got in received[i].items():
            assert torch.equal(got["params"]["w"], tree(j)["params"]["w"])


def test_a_peer_that_starts_late_is_waited_for():
    early = PeerNode(0, "127.0.0.1:0", timeout=10.0)
    late_port = PeerNode(9, "127.0.0.1:0")
    address = late_port.address
    late_port.close()  # the port is now free: the peer "starts" on it a moment later
    early.connect({1: address})
    late: list[PeerNode] = []

    def start_late():
        time.sleep(0.5)
        node = PeerNode(1, address, timeout=10.0)
        node.connect({0: early.address})
        late.append(node)

    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        early.deliver(1, 0, "params", encode_payload(tree(0)))
        starter.join()
        assert torch.equal(decode_payload(late[0].mailbox.collect(0, "params", [0], 5.0)[0])["half"], tree(0)["half"])
    finally:
        starter.join()
        early.close()
        for node in late:
            node.close()


def test_a_silent_neighbour_is_left_out_after_the_timeout(ring):
    ring[1].deliver(0, 1, "params", encode_payload(tree(1)))
    start = time.monotonic()
    assert list(ring[0].mailbox.collect(1, "params", [1, 2], 0.3)) == [1]
    assert time.monotonic() - start >= 0.3


def test_an_unreachable_peer_is_an_error_naming_it():
    node = PeerNode(0, "127.0.0.1:0", timeout=0.5)
    node.connect({4: "127.0.0.1:1"})
    try:
        with pytest.raises(PeerError, match=r"^peer 4 at 127\.0\.0\.1:1 does not answer \(DEADLINE_EXCEEDED"):
            node.deliver(4, 0, "params", b"")
    finally:
        node.close()


def test_a_node_that_is_not_a_neighbour_is_refused(ring):
    ring[1].connect({2: ring[2].address})  # node 1 no longer accepts node 0
    with pytest.raises(PeerError, match=r"refused node 0: not its neighbour"):
        ring[0].deliver(1, 0, "params", encode_payload(tree(0)))


def test_listening_on_an_impossible_address_is_one_error():
    with pytest.raises(PeerError, match=r"^--listen: cannot listen on 256\.1\.1\.1:80$"):
        PeerNode(0, "256.1.1.1:80")


@pytest.mark.parametrize(("text", "message"), [
    ("0 127.0.0.1:5000\n1 127.0.0.1:5001\n7 127.0.0.1:5007\n", r"line 3: node 7 is not a node of the topology"),
    ("0 127.0.0.1:5000\n", r"has no address for node 1, which this node exchanges with"),
    ("0 127.0.0.1:5000\n1 localhost\n", r"line 2, node 1: expected HOST:PORT, got 'localhost'"),
    ("0 127.0.0.1:5000\n1 127.0.0.1:70000\n", r"node 1: expected HOST:PORT"),
    ("0 127.0.0.1:5000\n0 127.0.0.1:5001\n", r"line 2: node 0 is named twice"),
    ("node0 127.0.0.1:5000\n", r"line 1: expected NODE HOST:PORT, got 'node0 127.0.0.1:5000'"),
])
def test_a_peers_file_that_does_not_fit_the_topology_is_one_line_naming_it(tmp_path, text, message):
    from fedsim.errors import ScenarioError
    from fedsim.peers.peers_file import read_peers_file

    path = tmp_path / "peers.txt"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=r"^--peers: .*" + message):
        read_peers_file(path, 4, [0, 1])
    path.write_text("# ring of four\n0 127.0.0.1:5000\n1 [::1]:5001  # node 1\n")
    assert read_peers_file(path, 4, [0, 1]) == {0: "127.0.0.1:5000", 1: "[::1]:5001"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ring_scenario(num_clients: int, rounds: int) -> dict:
    """D-SGD on a ring of digits nodes."""
    return {"name": "ring", "seed": 0, "rounds": rounds, "num_clients": num_clients, "data": {"name": "digits"},
            "partition": {"name": "iid"}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20}, "protocol": {"name": "dsgd"},
            "topology": {"name": "ring"}, "runtime": {"name": "sequential"}, "output": {"plot": False}}


def deploy(folder: Path, scenario: dict) -> tuple[Path, Path, list[int]]:
    """The scenario written to a file in `folder`, and a peers file with a free port per node."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    ports = free_ports(scenario["num_clients"])
    peers = folder / "peers.txt"
    peers.write_text("".join(f"{k} 127.0.0.1:{port}\n" for k, port in enumerate(ports)))
    return path, peers, ports


def ring_deployment(tmp_path, num_clients: int, rounds: int) -> tuple[dict, Path, Path, list[int]]:
    """D-SGD on a ring of digits nodes written to a scenario file, and a peers file with a free port per node."""
    scenario = ring_scenario(num_clients, rounds)
    return scenario, *deploy(tmp_path, scenario)


def peer_args(path: Path, k: int, port: int, peers: Path, out: Path, timeout: float) -> list[str]:
    """The `fedsim peer` arguments of node k."""
    return ["peer", str(path), "--node", str(k), "--listen", f"127.0.0.1:{port}", "--peers", str(peers),
            "--out", str(out), "--timeout", str(timeout)]


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Every process's (stdout, stderr), every process stopped whatever happens."""
    try:
        return [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()
            p.wait()


def run_peers(path: Path, peers: Path, ports: list[int], out: Path, timeout: float,
              launch: dict[int, list[str]] | None = None) -> tuple[list[int], list[tuple[str, str]]]:
    """Every node's `fedsim peer` process (node k started with `launch[k]` instead of `-m fedsim` where given);
    their exit statuses and (stdout, stderr)."""
    processes = [subprocess.Popen([sys.executable, *(launch or {}).get(k, ["-m", "fedsim"]),
                                   *peer_args(path, k, port, peers, out, timeout)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k, port in enumerate(ports)]
    outputs = finish(processes, 180)
    return [p.returncode for p in processes], outputs


CONFIGURATIONS = {
    "dsgd": ring_scenario(4, 3),
    "dfedsam_mgs": ring_scenario(4, 3) | {
        "partition": {"name": "quantity"}, "algorithm": {"name": "fedsam", "rho": 0.05, "lr": 0.05, "batch_size": 20},
        "protocol": {"name": "dsgd", "gossip_steps": 2}, "runtime": {"name": "vectorized"}},
    "choco": ring_scenario(4, 3) | {
        "protocol": {"name": "dsgd", "consensus_step": 0.5},
        "compression": {"gossip": {"name": "random_k", "ratio": 0.2, "error_feedback": "ef21"}}},
    "cdproxsgt": ring_scenario(4, 3) | {
        "algorithm": {"name": "gradient", "batch_size": 20, "local_steps": 1},
        "protocol": {"name": "cdproxsgt", "lr": 0.1, "l1": 1e-3, "gamma_x": 0.5, "gamma_y": 0.5},
        "compression": {"gossip": {"name": "topk", "ratio": 0.3, "error_feedback": "ef21"}}},
    "token": ring_scenario(4, 5) | {
        "algorithm": {"name": "fedavg", "lr": 0.5, "batch_size": 20}, "runtime": {"name": "vectorized"},
        "protocol": {"name": "token", "walk": "srrw", "alpha": 1.0, "tokens": 2, "repetitions": 2}},
}
"""Each runs over 4 peers: D-SGD; DFedSAM-MGS (uneven data, so uneven local steps); CHOCO-SGD and CDProxSGT (the
links carry the gossip codec's payloads, each peer decodes its neighbours' into its own mirrors); SA-SRRW tokens
(every process keeps every token, a token's job runs where its node is, the changes are summed over the peers)."""
RUN_IN_TURN = ("import json, sys\nfrom fedsim.cli import main\n"
               "sys.exit(next((code for args in json.loads(sys.argv[1]) if (code := main(args))), 0))\n")
"""One process running `fedsim` command lines (a JSON list of argument lists) in turn, stopping at the first failing."""


@pytest.fixture(scope="module")
def four_peer_runs(tmp_path_factory) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Every configuration run by the same 4 processes, one per node, each configuration in turn on its own ports;
    node 0's run directory of each, and the processes' (stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("peers")
    deployments = {name: deploy(tmp / name, scenario) for name, scenario in CONFIGURATIONS.items()}
    commands = [[peer_args(path, k, ports[k], peers, tmp / name / "run", 60)
                 for name, (path, peers, ports) in deployments.items()] for k in range(4)]
    processes = [subprocess.Popen([sys.executable, "-c", RUN_IN_TURN, json.dumps(node_commands)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node_commands in commands]
    outputs = finish(processes, 240)
    assert [p.returncode for p in processes] == [0] * 4, [err for _, err in outputs]
    return {name: tmp / name / "run" for name in CONFIGURATIONS}, outputs


def assert_same_figures(rows: list[dict], single: list[dict]) -> None:
    """Every figure of every row (wall time aside) equal to rel 1e-6; lists element by element."""
    assert len(rows) == len(single) and len(rows) > 1
    for a, b in zip(rows, single, strict=True):
        assert set(a) == set(b), (sorted(a), sorted(b))
        for key in sorted(set(a) - {"wall_time"}):
            for x, y in zip(*(v if isinstance(v, list) else [v] for v in (a[key], b[key])), strict=True):
                if isinstance(x, str):
                    assert x == y, (key, a, b)
                else:
                    assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12), (key, a, b)


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_four_peer_processes_give_the_in_process_metrics(four_peer_runs, name):
    """Node 0's metrics rows equal `fedsim.run`'s, figure by figure."""
    import fedsim

    runs, _ = four_peer_runs
    rows = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
    assert_same_figures(rows, fedsim.run(CONFIGURATIONS[name], write=False).metrics.rows)
    assert all(r["nodes_lost"] == 0 for r in rows if "nodes_lost" in r)


def test_only_node_0_writes_a_run_directory(four_peer_runs):
    _, outputs = four_peer_runs
    assert outputs[0][0].count("run directory:") == len(CONFIGURATIONS)
    assert all("run directory" not in out for out, _ in outputs[1:])


def test_a_peer_whose_neighbour_never_comes_ends_with_one_line_naming_it(tmp_path):
    _, path, peers, ports = ring_deployment(tmp_path, 3, 2)
    done = subprocess.run([sys.executable, "-m", "fedsim", "peer", str(path), "--node", "1", "--listen",
                           f"127.0.0.1:{ports[1]}", "--peers", str(peers), "--out", str(tmp_path / "run"),
                           "--timeout", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(f"fedsim: error: node 1: no neighbour answers within 2 s (peer 0 at "
                                  f"127.0.0.1:{ports[0]}, peer 2 at 127.0.0.1:{ports[2]})")
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(("change", "start"), [
    ({"protocol": {"name": "synchronous"}, "topology": {"name": "star"}, "clients_per_round": 2},
     "fedsim: error: protocol.name: fedsim peer runs gossip protocols"),
    ({}, "fedsim: error: --node: 9 is not a node of the topology (0..2)"),
])
def test_peer_settings_that_cannot_run_are_one_line(tmp_path, change, start):
    scenario = {"name": "ring", "seed": 0, "rounds": 2, "num_clients": 3, "data": {"name": "digits"},
                "model": {"name": "logreg"}, "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20},
                "protocol": {"name": "dsgd"}, "topology": {"name": "ring"}, **change}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    peers = tmp_path / "peers.txt"
    peers.write_text("0 127.0.0.1:1\n1 127.0.0.1:2\n2 127.0.0.1:3\n")
    done = subprocess.run([sys.executable, "-m", "fedsim", "peer", str(path), "--node", "9" if not change else "0",
                           "--listen", "127.0.0.1:0", "--peers", str(peers)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(start), done.stderr


def test_dropping_a_node_removes_its_column_and_renormalizes_each_row():
    from fedsim.topologies.mixing import drop_nodes

    W = torch.tensor([[0.5, 0.25, 0.0, 0.25], [0.25, 0.5, 0.25, 0.0], [0.0, 0.25, 0.5, 0.25],
                      [0.25, 0.0, 0.25, 0.5]], dtype=torch.float64).to_sparse_csr()
    dropped = drop_nodes(W, {3}).to_dense()
    expected = torch.tensor([[2 / 3, 1 / 3, 0, 0], [0.25, 0.5, 0.25, 0], [0, 1 / 3, 2 / 3, 0],
                             [0.5, 0, 0.5, 0]], dtype=torch.float64)
    torch.testing.assert_close(dropped, expected)
    assert drop_nodes(W, set()) is W


def test_a_peer_killed_mid_run_is_dropped_and_the_others_finish_reporting_it(tmp_path):
    """Node 3 of a ring of four is SIGKILLed in round 2: its neighbours time out, mix without it (re-normalized
    weights), averages and evaluation leave it out, and every metrics row after says one node was lost."""
    _, path, peers, ports = ring_deployment(tmp_path, 4, 5)
    kill = [str(Path(__file__).with_name("kill_run.py")), "exchange", "12"]
    codes, outputs = run_peers(path, peers, ports, tmp_path / "run", 3, launch={3: kill})
    assert codes == [0, 0, 0, -9], [err for _, err in outputs]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["nodes_lost"] == 0 and rows[-1]["nodes_lost"] == 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["consensus_error"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
