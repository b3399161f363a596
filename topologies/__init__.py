"""Communication graphs (networkx): entries are `fn(params, num_nodes) -> networkx.Graph`.

Client/server federated learning runs on the star, server at node 0 and clients 1..N; decentralized protocols
will run on the other graphs.
"""

from __future__ import annotations

from fedsim.registry import Registry, import_submodules

TOPOLOGIES: Registry = Registry("topology")

import_submodules(__name__, __path__)
