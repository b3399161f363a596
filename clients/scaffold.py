"""SCAFFOLD's client (Karimireddy et al., ICML 2020, Algorithm 1, option II control variates): local SGD corrected by
the drift estimate c - c_i, so clients on skewed data step along the global direction instead of their own."""

from __future__ import annotations

import torch

from fedsim.clients import ALGORITHMS, Batch, JobInfo, LocalTrainingParams, Oracle, StepState
from fedsim.params import Pytree, tree_sub, tree_zeros_like


@ALGORITHMS.register("scaffold", params=LocalTrainingParams, stragglers="drop", server="scaffold",
                     receives=("params", "control"), sends=("delta", "control"))
class Scaffold:
    """Client side of SCAFFOLD: steps y <- y - lr (g(y) + c - c_i) from the server's x, then refreshes its control
    variate c_i by option II and sends (y - x, c_i+ - c_i). Its persistent state is c_i (zeros at first)."""

    step_cost = 1

    def __init__(self, hp: LocalTrainingParams) -> None:
        self.hp = hp

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return tree_zeros_like(server_message["params"])

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        params = server_message["params"]
        c_i = tree_zeros_like(params) if client_state is None else client_state
        # The correction c - c_i is the same at every local step (Algorithm 1, line 10), so it is formed once.
        correction = tree_sub(server_message["control"], c_i)
        steps = next(iter(params.values())).new_zeros((), dtype=torch.int64)
        return {"params": params, "anchor": params, "server_control": server_message["control"], "control": c_i,
                "correction": correction, "steps": steps}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        params, correction = state["params"], state["correction"]
        grads = oracle.grad(params, batch)
        new = {k: torch.add(w, grads[k] + correction[k], alpha=-self.hp.lr) for k, w in params.items()}
        return {**state, "params": new, "steps": state["steps"] + 1}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        delta = tree_sub(state["params"], state["anchor"])
        k = state["steps"]
        took_steps = k > 0
        # Option II: c_i+ - c_i = -c + (x - y) / (K lr), K the steps actually taken (stragglers take fewer); a client
        # that took none keeps c_i (no division by zero: K is clamped to 1 where the result is discarded anyway).
        scale = 1.0 / (k.clamp_min(1).to(delta[next(iter(delta))].dtype) * self.hp.lr)
        control = {name: torch.where(took_steps, -state["server_control"][name] - d * scale,
                                     torch.zeros_like(d)) for name, d in delta.items()}
        new_control = {name: c + control[name] for name, c in state["control"].items()}
        return {"delta": delta, "control": control}, new_control
