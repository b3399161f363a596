"""The peers file of a decentralized deployment: where each node listens, one `NODE HOST:PORT` line per node (`#`
starts a comment), checked against the scenario's topology so a typo is one line naming it rather than a node
waiting on nobody."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedsim.errors import ScenarioError
from fedsim.strict_input import shorten

MAX_PEERS_FILE_BYTES = 1 << 20


def read_peers_file(path: str | Path, num_nodes: int, needed: Iterable[int]) -> dict[int, str]:
    """Node id -> HOST:PORT for every node the file names; each must be a node of the topology (0..num_nodes-1)
    named once, and the file must name every node in `needed` (this node and its neighbours)."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_PEERS_FILE_BYTES + 1).decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"--peers: cannot read {path} ({getattr(e, 'strerror', None) or type(e).__name__})") \
            from None
    if len(text) > MAX_PEERS_FILE_BYTES:
        raise ScenarioError(f"--peers: {path} is larger than {MAX_PEERS_FILE_BYTES} bytes")
    peers: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"--peers: {path}, line {number}"
        if len(fields) != 2 or not fields[0].isdigit():
            raise ScenarioError(f"{where}: expected NODE HOST:PORT, got {shorten(line.strip())}")
        node = int(fields[0])
        if node >= num_nodes:
            raise ScenarioError(f"{where}: node {node} is not a node of the topology (0..{num_nodes - 1})")
        if node in peers:
            raise ScenarioError(f"{where}: node {node} is named twice")
        peers[node] = check_address(fields[1], f"{where}, node {node}")
    missing = sorted(set(needed) - set(peers))
    if missing:
        raise ScenarioError(f"--peers: {path} has no address for node {missing[0]}, which this node exchanges with")
    return peers


def check_address(address: str, setting: str) -> str:
    """HOST:PORT with a port in 0..65535 (0: a listening port chosen by the system)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ScenarioError(f"{setting}: expected HOST:PORT, got {shorten(address)}")
    return f"{host}:{int(port)}"
