"""Any graph, read from an edge-list text file: one edge per line as two node ids `i j` (whitespace between),
`#` starting a comment, blank lines skipped. Nodes are the integers 0..n-1; a node in no edge is isolated (and
refused as a separate component unless `allow_disconnected`). A third column (a weight) is refused: mixing
matrices weigh edges by the nodes' degrees, so a weight would be silently ignored. Every mistake is one line naming
the setting, the file and the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import networkx as nx
from pydantic import Field

from fedsim.errors import ScenarioError
from fedsim.strict_input import shorten
from fedsim.topologies import TOPOLOGIES, TopologyParams

MAX_LINE_CHARS = 1000
"""Longest line read: two node ids and a comment never need more (a binary file is refused, not read whole)."""

SelfLoops = Literal["error", "drop"]


class EdgeListParams(TopologyParams):
    """Where the edges are and how to read them."""

    path: str = Field(min_length=1, description="text file of `i j` lines (node ids 0..num_clients-1; # comments); "
                                                "relative paths are from the working directory")
    self_loops: SelfLoops = Field("error", description="a line `i i`: error (refuse the file) or drop (skip it)")
    directed: bool = Field(False, description="read `i j` as the directed edge i -> j (j hears i) instead of a "
                                              "link both ways")


class _BadLine(Exception):
    """What is wrong with one line of the file (turned into a ScenarioError naming the file and line)."""


def _parse(text: str, num_nodes: int | None) -> tuple[int, int]:
    """The two node ids of one edge line (its comment stripped), checked against 0..num_nodes-1."""
    fields = text.split()
    if len(fields) == 3:
        raise _BadLine(f"a third column ({shorten(fields[2])}, a weight?) is not supported: mixing matrices weigh "
                       f"edges by degree; remove it")
    if len(fields) != 2:
        raise _BadLine(f"expected two node ids `i j`, got {len(fields)} fields ({shorten(text.strip())})")
    nodes = []
    for field in fields:
        try:
            node = int(field)
        except ValueError:
            raise _BadLine(f"node {shorten(field)} is not an integer") from None
        if node < 0 or (num_nodes is not None and node >= num_nodes):
            within = f"0 to {num_nodes - 1} (num_clients is {num_nodes})" if num_nodes is not None else "0 or more"
            raise _BadLine(f"node {node} does not exist: nodes are {within}")
        nodes.append(node)
    return nodes[0], nodes[1]


def _read_edges(path: str, num_nodes: int | None, self_loops: SelfLoops, setting: str) -> list[tuple[int, int]]:
    edges: list[tuple[int, int]] = []
    with open(Path(path).expanduser(), encoding="utf-8-sig") as f:
        for line, text in enumerate(iter(lambda: f.readline(MAX_LINE_CHARS + 2), ""), start=1):
            try:
                if len(text.rstrip("\r\n")) > MAX_LINE_CHARS:
                    raise _BadLine(f"longer than {MAX_LINE_CHARS} characters")
                content = text.split("#", 1)[0]
                if not content.strip():
                    continue
                i, j = _parse(content, num_nodes)
                if i == j and self_loops == "error":
                    raise _BadLine(f"self-loop on node {i}; remove the line, or set self_loops: drop to skip "
                                   f"self-loops")
            except _BadLine as bad:
                raise ScenarioError(f"{setting}: {shorten(path)} line {line}: {bad}") from None
            if i != j:
                edges.append((i, j))
    return edges


def read_edge_list(path: str, num_nodes: int | None = None, directed: bool = False, self_loops: SelfLoops = "error",
                   setting: str = "topology.path") -> nx.Graph:
    """The graph of an edge-list file over nodes 0..num_nodes-1 (default: 0 to the largest id in the file): a
    DiGraph of edges i -> j if `directed`. Mistakes are one ScenarioError line starting with `setting`."""
    try:
        edges = _read_edges(path, num_nodes, self_loops, setting)
    except UnicodeDecodeError:
        raise ScenarioError(f"{setting}: cannot read {shorten(path)}: not UTF-8 text") from None
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL character
        raise ScenarioError(f"{setting}: cannot read {shorten(path)}: {getattr(e, 'strerror', None) or e}") from None
    count = num_nodes if num_nodes is not None else 1 + max((max(e) for e in edges), default=-1)
    graph = nx.DiGraph() if directed else nx.Graph()
    graph.add_nodes_from(range(count))
    graph.add_edges_from(edges)
    return graph


@TOPOLOGIES.register("edge_list", params=EdgeListParams, client_server=False)
def edge_list(params: EdgeListParams, num_nodes: int, seed: int) -> nx.Graph:
    """Any graph, read from a text file of `i j` lines, one edge each (see `read_edge_list`)."""
    return read_edge_list(params.path, num_nodes, params.directed, params.self_loops)
