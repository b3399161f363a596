"""CDProxSGT (Yan, Chen, Chen, Cui, Lu, Xu, ICML 2023, Algorithm 2; `yonggui-yan/DProxSGT`,
`Compress_FMNIST/core_compress.py::train_CDProxSGT`): decentralized proximal stochastic gradient tracking with
compressed gossip, for min (1/n) sum_i f_i(x) + lambda |x|_1 over nodes with heterogeneous data.

Every round t, each node i takes one stochastic gradient g_i^t = grad F_i(x_i^t; xi) (the `gradient` client rule:
`local_steps: 1` and a small `batch_size` for the paper's O(1)-sample gradients), then

    y_i <- y_i + g_i^t - g_i^{t-1}                              gradient tracking (g^{-1} = 0, y^{-1} = 0)
    y   <- y + gamma_y ((W y^) - y^)                            y^: public copies of y through the gossip codec
    x_i <- prox_{eta lambda |.|_1}(x_i - eta y_i)               soft thresholding at eta lambda
    x   <- x + gamma_x ((W x^) - x^)                            x^: public copies of x through the gossip codec

The public copies are `PublicCopies` (CHOCO-style: with `compression.gossip: {..., error_feedback: {name: ef21,
first_message: compressed}}`, y^_j += Q(y_j - y^_j) from y^ = 0, as the authors' code starts them). With the
identity codec and gamma_x = gamma_y = 1 this is DProxSGT (Algorithm 1; `train_DProxSGT`: y <- W (y + g - g_prev),
x <- W prox(x - eta y)). Under a doubly stochastic W the trackers keep mean_i y_i = mean_i g_i (the tracking
invariant). One codec configuration serves both x and y (the paper's experiments compress both with the same
top-k); their draws are independent (channels 0 and 1).

Cost model: each round every node sends one y payload and one x payload to each node that hears it (`bytes_up`);
a round lasts as long as its slowest node's gradient and sends (`GossipProtocol.finish_round`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from fedsim.params import tree_leaves, tree_map
from fedsim.recording import Recorder
from fedsim.sampling import full_steps
from fedsim.servers import PROTOCOLS

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema
    from fedsim.simulation import Simulation


class CDProxSGTParams(MixingParams):
    """Step size, L1 weight, and the consensus steps of the compressed gossip of x and of the trackers y."""

    lr: float = Field(gt=0, description="eta: the proximal gradient step on x_i - eta y_i")
    l1: float = Field(0.0, ge=0, description="lambda: r(x) = lambda |x|_1 (0: no regularizer, no prox)")
    gamma_x: float = Field(1.0, gt=0, le=1, description="consensus step of the models' gossip")
    gamma_y: float = Field(1.0, gt=0, le=1, description="consensus step of the trackers' gossip")


def soft_threshold(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """prox of threshold * |.|_1: sign(v) max(|v| - threshold, 0) (`RegL1_FMNIST/core.py::prox_Norm1`)."""
    return v.sign() * (v.abs() - threshold).clamp_min(0.0)


def check_cdproxsgt(params: CDProxSGTParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Refuse what CDProxSGT would ignore (a client sample, a server rule) and graphs it cannot mix over, when the
    scenario is validated (`fedsim check`); `carries` keeps it to rules that send a gradient."""
    refuse_client_server_settings("cdproxsgt", spec, components, "runs every node every round",
                                  "tracks gradients between nodes")
    check_mixing(params, spec, components)


@PROTOCOLS.register("cdproxsgt", params=CDProxSGTParams, peer_to_peer=True, carries=("grad",), paths=("gossip",),
                    check=check_cdproxsgt)
class CDProxSGT(GossipProtocol):
    """Compressed decentralized proximal stochastic gradient tracking; the evaluated model is the network average
    of x, and rows add the fraction of exactly zero parameters the L1 prox leaves (`sparsity`)."""

    def __init__(self, params: CDProxSGTParams, sim: Simulation, recorder: Recorder) -> None:
        hp = sim.rule.hp
        steps = full_steps(np.asarray(sim.data.train_sizes), hp.local_epochs, hp.batch_size, hp.local_steps)
        super().__init__(params, sim, recorder, steps)
        zeros = tree_map(torch.zeros_like, self.nodes.stacked)
        self.trackers, self.last_grads = zeros, tree_map(torch.clone, zeros)
        """The owned nodes' y_i and g_i^{t-1}, stacked like the models."""
        template = sim.model.init_params
        self.public_x = PublicCopies.build(self.spec, sim, self.owned, self.graphs, params.gamma_x, template, 0)
        self.public_y = PublicCopies.build(self.spec, sim, self.owned, self.graphs, params.gamma_y, template, 1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "trackers": self.trackers, "last_grads": self.last_grads,
                "public_x": self.public_x.state_dict(), "public_y": self.public_y.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.trackers, self.last_grads = state["trackers"], state["last_grads"]
        self.public_x.load_state_dict(state["public_x"])
        self.public_y.load_state_dict(state["public_y"])

    def extra_metrics(self) -> dict[str, float]:
        zeros = sum(float((leaf == 0).sum()) for leaf in tree_leaves(self.nodes.stacked))
        totals = self.transport.sum({"zeros": torch.tensor(zeros, dtype=torch.float64)})
        size = sum(v.numel() for v in tree_leaves(self.sim.model.init_params)) * self.alive()
        return {**super().extra_metrics(), "sparsity": float(totals["zeros"]) / size}

    def take_step(self, t: int) -> float:
        """Round t: gradients, tracking, gossip of y, the proximal step, gossip of x; returns its seconds."""
        neighbourhood, W = self.graphs.at(t).neighbourhood, self.graphs.mixing(t)
        grads, work = self.node_messages(t, "grad")
        tracked = tree_map(lambda y, g, last: y + (g - last), self.trackers, grads, self.last_grads)
        self.trackers, sent_y = self.public_y.gossip(tracked, t, 0, neighbourhood, W)
        self.last_grads = grads
        eta, threshold = self.params.lr, self.params.lr * self.params.l1
        stepped = tree_map(lambda x, y: soft_threshold(x - eta * y, threshold) if threshold else x - eta * y,
                           self.nodes.stacked, self.trackers)
        rows, sent_x = self.public_x.gossip(stepped, t, 0, neighbourhood, W)
        self.nodes.assign(rows)
        return self.finish_round(t, work, (sent_x + sent_y) * self.graphs.at(t).out_degrees)
