"""`fedsim peer SCENARIO --node K --listen HOST:PORT --peers FILE`: node K of a gossip scenario as its own process,
exchanging rows with its neighbours over gRPC. Every node runs the same scenario; node 0 writes the run directory.
The numbers equal an in-process run of the scenario (to float tolerance: sums are added in another order)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.api import RunResult, check, noter, open_run_dir, run_variants
from fedsim.errors import ScenarioError
from fedsim.peers.link import PeerNode
from fedsim.peers.peers_file import check_address, read_peers_file
from fedsim.peers.transport import PeerTransport
from fedsim.scenario import naming_variant
from fedsim.simulation import build_simulation


def run_peer(source: str | Path, node: int, listen: str, peers_file: str | Path,
             overrides: Mapping[str, Any] | None = None, variant: str | None = None, out: str | Path | None = None,
             overwrite: bool = False, timeout: float = 60.0,
             echo: Callable[[str], None] | None = None) -> RunResult:
    """Run node `node` of the scenario's one gossip variant (or `variant`), listening on `listen`, with the other
    nodes' addresses from `peers_file`; waits up to `timeout` seconds for any peer."""
    variants: Sequence[str] | None = [variant] if variant else None
    scenarios, notices, out_path = check(source, overrides, variants, out, overwrite, write=node == 0)
    if len(scenarios) != 1:
        raise ScenarioError(f"--variant: the scenario has variants {', '.join(s.variant for s in scenarios)}; a peer "
                            f"runs one: name it")
    scenario = scenarios[0]
    protocol, n = scenario.components["protocol"], scenario.spec.num_clients
    if not protocol.entry.meta.get("peer_to_peer"):
        raise ScenarioError(f"protocol.name: fedsim peer runs gossip protocols; {protocol.name!r} is client/server "
                            f"(deploy it with fedsim flower-app)")
    if not 0 <= node < n:
        raise ScenarioError(f"--node: {node} is not a node of the topology (0..{n - 1})")
    peers = read_peers_file(peers_file, n, range(n))  # sums over processes reach every node
    link = PeerNode(node, check_address(listen, "--listen"), timeout)
    try:
        link.connect({k: address for k, address in peers.items() if k != node})
        with naming_variant(scenario.declared_name):
            sim = build_simulation(scenario, transport=PeerTransport(link, n))
        note = noter(echo, node == 0)
        for notice in notices:
            note(notice)
        run_dir = open_run_dir(out_path, scenarios, source, overrides, variants) if out_path is not None else None
        return run_variants([sim], run_dir, None, False, note, {}, resume=False, notices=notices)
    finally:
        link.close()
