"""Coordination rules: how client messages are combined into the next global model, and when.

A server rule sees the sample-weighted mean of the clients' messages (a sum, so it reduces across MPI ranks or
devices the same way) and updates its state: `init(params) -> state`, `update(state, mean_message) -> state`.
The state always holds the global model under "params", plus whatever the rule keeps (momentum, moments).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import Field

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

    def update(self, state: ServerState, mean_message: Pytree) -> ServerState: ...


SERVERS: Registry = Registry("server rule")
"""Entries: a ServerRule class constructed with its validated parameters."""

import_submodules(__name__, __path__)
