"""The local gradient as a client rule: a job of s minibatch steps returns the mean gradient of those minibatches at
the model it started from, without moving it. Protocols that apply gradients themselves (DADAO, `servers/dadao.py`)
take a node's gradient through the runtime this way, so it is the task's own stochastic or full-batch gradient in
every runtime.

Each minibatch's gradient is weighted by its real samples (padding excluded): a job of one epoch (the default:
`local_epochs` 1, minibatches of `batch_size` over the node's data) returns the exact full-batch gradient of the
node's mean loss; `local_steps: 1` with a small `batch_size` returns a stochastic minibatch gradient.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedsim.clients import ALGORITHMS, Batch, BatchingParams, JobInfo, Oracle, StepState
from fedsim.params import Pytree, tree_map, tree_zeros_like


class GradientParams(BatchingParams):
    """How many minibatches, of what size, a gradient averages over (no learning rate: the rule takes no step)."""

    local_epochs: int = Field(1, ge=1, description="passes over the node's data per gradient (1: the full "
                                                   "gradient)")
    local_steps: int | None = Field(None, ge=1, le=10**7, description="minibatches per gradient instead of "
                                                                      "local_epochs passes (1: a stochastic "
                                                                      "gradient)")


@ALGORITHMS.register("gradient", params=GradientParams, stragglers="drop", server="fedavg", protocol="dadao",
                     sends=("grad",), no_dpsgd="it weights each step's gradient by the step's batch size, which "
                                               "Poisson sampling makes private")
class LocalGradient:
    """Sends {"grad": the sample-weighted mean of its minibatches' gradients at the start}; keeps no state."""

    step_cost = 1

    def __init__(self, hp: GradientParams) -> None:
        self.hp = hp

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return None

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        params = server_message["params"]
        return {"params": params, "sum": tree_zeros_like(params), "samples": torch.zeros(())}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        samples = batch.w.sum()
        grads = oracle.grad(state["params"], batch)
        return {**state, "sum": tree_map(lambda s, g: s + samples * g, state["sum"], grads),
                "samples": state["samples"] + samples}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        samples = state["samples"].clamp_min(1.0)
        return {"grad": tree_map(lambda s: s / samples, state["sum"])}, None
