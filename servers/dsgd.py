"""Decentralized SGD (D-PSGD, Lian et al., NeurIPS 2017): every node keeps its own model, takes local steps on its
own data and averages with its graph neighbours through a mixing matrix W, with no server.

Two orders of the same round (Sayed's diffusion; Koloskova et al., ICML 2020, eq. 2 and its CTA form):
adapt-then-combine (ATC) x <- W (x + delta(x)), and combine-then-adapt (CTA) y = W x, x <- y + delta(y), where
delta(x_i) is node i's change from its local steps started at x_i. The nodes a process owns (all of them in one
process, a contiguous block per MPI rank: `sim.transport`) live in one `StackedStore` (a leading node axis), so
mixing is one sparse product per leaf over the owned rows and the neighbours' rows the transport brings (the halo),
and the vectorized runtime runs the owned nodes' local steps in one vmapped batch (one start per job, stacked on
the vmap axis). The network average and the consensus error are sums over processes.

Local-update gossip (DFedAvg, Sun et al. 2022; DFedSAM and DFedSAM-MGS, Shi et al., ICML 2023, Algorithm 1): the
node's local steps are the client algorithm's (`fedavg`: SGD, `fedsam`: SAM steps, `sgdm`: heavy-ball SGD), `K`
of them (`local_steps`), then `gossip_steps` Q mixing steps of the current iterate, z <- W z, Q times (MGS: Q > 1;
with Q = 1 and K = 1, D-SGD itself). The graph may change with the round (`fedsim.topologies.schedule`): each
round mixes over its own graph's matrix, and the transport re-plans its exchanges when the graph changes.

Compressed gossip (CHOCO-SGD, `compression.gossip` and `consensus_step`): each gossip step every node sends its
model through the gossip codec, receivers keep its public copy x^_j (the codec's receiver mirror, e.g. EF21's h_i),
and x_i <- x_i + gamma ((W x^)_i - x^_i) (`PublicCopies`).

Cost model: each gossip step every node sends its model (the half-step model under ATC, its current one under
CTA) to each neighbour it is heard by, counted as `bytes_up` (Q times per directed edge and round, the model's bytes
each, or the gossip codec's payload bytes; there is no download). A round t lasts as long as its slowest node's
`job_seconds(t, i, work_i, 0, bytes sent_i)`: a simplification that charges a node's sends one after another on
its uplink, plus one latency each way, and ignores that a node must wait for its neighbours' models rather than only
its own work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedsim.gossip_protocol import (
    GossipProtocol,
    MixingParams,
    PublicCopies,
    check_mixing,
    refuse_client_server_settings,
)
from fedsim.params import tree_map
from fedsim.recording import Recorder
from fedsim.sampling import full_steps
from fedsim.servers import PROTOCOLS

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema
    from fedsim.simulation import Simulation


class DSGDParams(MixingParams):
    """How nodes order local steps and mixing, which mixing matrix they use, and how many local steps they take."""

    order: Literal["atc", "cta"] = Field("atc", description="atc: local steps, then mix; cta: mix, then local steps")
    local_steps: int | None = Field(None, ge=0, description="local steps per node and round (0: gossip only); "
                                                            "default: local_epochs * ceil(n_k / batch_size)")
    gossip_steps: int = Field(1, ge=1, description="mixing steps per round, each of the current iterate "
                                                   "(DFedSAM-MGS's Q; bytes count Q times per edge)")
    consensus_step: float = Field(1.0, gt=0, le=1, description="CHOCO's gamma: x_i += gamma ((W x^)_i - x^_i) "
                                                               "over the public copies x^ the gossip codec sends")


def check_dsgd(params: DSGDParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Refuse settings D-SGD would silently ignore (a client sample, stragglers, a server rule) and graphs it
    cannot mix over, when the scenario is validated (so `fedsim check` reports them)."""
    refuse_client_server_settings("dsgd", spec, components, "runs every node every round",
                                  "mixes models between nodes")
    check_mixing(params, spec, components)


@PROTOCOLS.register("dsgd", params=DSGDParams, peer_to_peer=True, carries=("delta",), paths=("gossip",),
                    check=check_dsgd)
class DecentralizedSGD(GossipProtocol):
    """Synchronous gossip rounds: every node trains and mixes every round (`fedsim.gossip_protocol`)."""

    def __init__(self, params: DSGDParams, sim: Simulation, recorder: Recorder) -> None:
        hp = sim.rule.hp
        steps = np.full(sim.scenario.spec.num_clients, params.local_steps) if params.local_steps is not None else \
            full_steps(np.asarray(sim.data.train_sizes), hp.local_epochs, hp.batch_size, hp.local_steps)
        super().__init__(params, sim, recorder, steps)
        gossip = self.spec.compression.gossip is not None or params.consensus_step != 1
        self.public = PublicCopies.build(self.spec, sim, self.owned, self.graphs, params.consensus_step,
                                         sim.model.init_params) if gossip else None
        """The gossip codec's senders and receivers (CHOCO-SGD); None: exact gossip x <- W x."""

    def state_dict(self) -> dict[str, Any]:
        public = {} if self.public is None else {"public": self.public.state_dict()}
        return {**super().state_dict(), **public}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.public is not None:
            self.public.load_state_dict(state["public"])

    def mix_nodes(self, t: int) -> np.ndarray:
        """Q gossip steps over the owned nodes along round t's graph through the transport (which brings the
        neighbours' rows here, or, relayed, has each node mix its own); lost peers are left out on re-normalized
        rows. Returns every node's bytes sent (its payloads times the nodes that hear it)."""
        neighbourhood, W = self.graphs.at(t).neighbourhood, self.graphs.mixing(t)
        sent = 0
        for q in range(self.params.gossip_steps):
            if self.public is None:
                self.nodes.assign(neighbourhood.gossip(self.nodes.stacked, W))
                sent += self.model_bytes
            else:
                rows, nbytes = self.public.gossip(self.nodes.stacked, t, q, neighbourhood, W)
                self.nodes.assign(rows)
                sent += nbytes
        return sent * self.graphs.at(t).out_degrees

    def take_step(self, t: int) -> float:
        """Round t in the configured order; returns its simulated seconds."""
        sends = self.mix_nodes(t) if self.params.order == "cta" else None
        deltas, work = self.node_messages(t, "delta")
        tree_map(torch.Tensor.add_, self.nodes.stacked, deltas)  # x + delta(x), in the store's rows
        if self.params.order == "atc":
            sends = self.mix_nodes(t)
        return self.finish_round(t, work, sends)
