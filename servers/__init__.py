"""Coordination rules: how client results are combined (server rules) and when things happen (protocols).

A server rule is `init(params) -> state`, `broadcast(state) -> server_message` (the model, plus whatever its clients
need: SCAFFOLD's control variate) and `update(state, aggregate) -> state`, where the aggregate
(`fedsim.aggregation.Aggregate`) carries per-key weighted means, the count of results, total weights, the
population size, the round, the server's random key and, for rules registered with `per_result=True`, every
result's message. The state always holds the global model under "params".

A protocol (`PROTOCOLS`, one file each) owns the event handling on the virtual clock, its budget and its state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import Field

from fedsim.aggregation import Aggregate
from fedsim.params import Pytree
from fedsim.registry import Params, Registry, import_submodules

ServerState = dict[str, Any]


class ServerParams(Params):
    """Parameters every server rule shares."""

    lr: float = Field(1.0, gt=0)
    weighting: Literal["samples", "uniform"] = "samples"


class ServerRule(Protocol):
    hp: ServerParams

    def init(self, params: Pytree) -> ServerState: ...

    def broadcast(self, state: ServerState) -> Pytree: ...

    def weighting(self, template: Pytree) -> dict[str, str]:
        """How each top-level key of the clients' messages is weighted ("samples" or "uniform")."""
        ...

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState: ...


class ServerBase:
    """Defaults most server rules share: broadcast the model alone, weight every message key by `hp.weighting`."""

    hp: ServerParams
    steps_without_results = False
    """Whether a round whose sampling drew no client still takes a server step (with an aggregate of no results)."""
    key_weighting: Mapping[str, str] = {}
    """Message keys weighted otherwise than `hp.weighting` (e.g. SCAFFOLD's control deltas: "uniform")."""

    def broadcast(self, state: ServerState) -> Pytree:
        return {"params": state["params"]}

    def weighting(self, template: Pytree) -> dict[str, str]:
        return {key: self.key_weighting.get(key, self.hp.weighting) for key in template}


SERVERS: Registry = Registry("server rule")
"""Entries: a ServerRule class constructed with its validated parameters. Metadata: `per_result` (True: the
aggregate also carries every result's message)."""

PROTOCOLS: Registry = Registry("protocol")
"""Entries: a protocol class constructed with `(params, simulation, recorder)`; see `fedsim.protocol`. Metadata:
`needs` (top-level scenario fields the protocol requires, e.g. `clients_per_round`), `asynchronous` (True: its
jobs go through `fedsim.async_jobs`, so on real devices it runs on a `RealTimeClock`), `stragglers` (the straggler
models it honours: "fraction", "deadline"), `availability` (True: it honours the systems profile's availability
and dropouts; others refuse them), `peer_to_peer` (True:
the protocol runs on a peer-to-peer topology, not the client/server star), `paths` (the message paths a codec can
go on, of "uplink", "downlink", "gossip"; uplink and downlink by default), `check` (`fn(params, spec,
components)`, raising ScenarioError for settings the protocol cannot honour; run by the scenario validator, so
`fedsim check` reports them before any run), `client_rate` (`fn(params, clients_per_round, num_clients)`: the
probability each client is drawn with per round when the protocol draws them independently, else None) and
`no_privacy` (why a private run cannot be accounted under the protocol)."""

import_submodules(__name__, __path__)
