"""Per-FedAvg's client (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020, "Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach", Algorithm 1): local steps on the MAML objective
F_k(w) = f_k(w - alpha grad f_k(w)), so the global model is one that a client adapts well with one gradient step.

One local step, from three independent batches D, D', D'' (two for the first-order variant):
    w~ = w - alpha grad f(w; D)
    fo: w <- w - beta grad f(w~; D')
    hf: w <- w - beta (I - alpha hess f(w; D'')) grad f(w~; D')
The runtime gives a step one minibatch of `batch_size` samples; the step deals it into 2 (fo) or 3 (hf) parts.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.func import vjp

from fedsim.clients import ALGORITHMS, Batch, LocalTrainingParams, Oracle, StepState
from fedsim.clients.fedavg import LocalSGD
from fedsim.params import Pytree, tree_map


class PerFedAvgParams(LocalTrainingParams):
    """`lr` is the paper's beta (the outer step, which moves the model sent to the server) and `alpha` the inner,
    adaptation step; `batch_size` is the total of one step's batches (each part gets about batch_size / 2 or / 3)."""

    alpha: float = Field(0.01, gt=0, description="the inner (personalization) step size of the MAML objective")
    variant: Literal["fo", "hf"] = Field(
        "hf", description="hf: the paper's update with the Hessian term on a third batch (Algorithm 1; with hvp: "
                          "finite_difference, the paper's Hessian-free Per-FedAvg (HF)); fo: first-order, the Hessian "
                          "term dropped (Per-FedAvg (FO), as the pFedMe repository implements it)")
    hvp: Literal["autodiff", "finite_difference"] = Field(
        "autodiff", description="how hf forms hess f(w; D'') g: exactly by autodiff (a vector-Jacobian product of the "
                                "gradient), or by the estimate (grad f(w + delta g) - grad f(w - delta g)) / (2 delta)")
    delta: float = Field(0.001, gt=0, description="the finite-difference step of hvp: finite_difference")


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """The minibatch dealt into `parts` interleaved parts (part j: rows j, j + parts, ...). A batch's real samples
    are its leading rows (padding, w = 0, trails), so every runtime deals the same samples to the same part, whether
    it pads the batch or not; the parts of n samples hold n // parts or one more."""
    return [Batch(batch.x[j::parts], batch.y[j::parts], batch.w[j::parts], batch.key, batch.step)
            for j in range(parts)]


def weighted_grad(oracle: Oracle, params: Pytree, batch: Batch) -> Pytree:
    """The minibatch's loss gradient as the weighted mean of per-sample gradients (padding rows weigh 0): the same
    numbers as `oracle.grad`, but a function torch.func can differentiate in every runtime (the autograd oracle's
    `grad` detaches its input)."""
    total = batch.w.sum().clamp_min(1.0)
    return tree_map(lambda g: torch.tensordot(batch.w, g, dims=1) / total, oracle.per_sample_grads(params, batch))


def hessian_vector_product(oracle: Oracle, params: Pytree, batch: Batch, vector: Pytree) -> Pytree:
    """hess f(params; batch) vector, exactly: the vector-Jacobian product of the gradient (reverse over reverse; the
    Hessian is symmetric), about twice as fast here as the directional derivative by forward mode."""
    _, pullback = vjp(lambda p: weighted_grad(oracle, p, batch), params)
    return pullback(vector)[0]


def finite_difference_hvp(oracle: Oracle, params: Pytree, batch: Batch, vector: Pytree, delta: float) -> Pytree:
    """The paper's Hessian-free estimate (grad f(w + delta v) - grad f(w - delta v)) / (2 delta) (Per-FedAvg (HF))."""
    plus = oracle.grad({k: torch.add(w, vector[k], alpha=delta) for k, w in params.items()}, batch)
    minus = oracle.grad({k: torch.add(w, vector[k], alpha=-delta) for k, w in params.items()}, batch)
    return {k: (plus[k] - minus[k]) / (2 * delta) for k in plus}


@ALGORITHMS.register("perfedavg", params=PerFedAvgParams, stragglers="drop", server="fedavg",
                     no_dpsgd="each step takes several gradients, and per-sample gradients of its own for the "
                              "Hessian term")
class PerFedAvg(LocalSGD):
    """Per-FedAvg's client: MAML steps on its own data, sending the model change to a FedAvg server. A step costs
    one minibatch gradient (fo: two on halves) or two (hf: two on thirds and a Hessian-vector product, about two
    gradients' work, on the last third: 4/3 of a minibatch, rounded up). Stateless; a client's own model is one
    alpha-step of gradient descent on its whole training split from the global model."""

    hp: PerFedAvgParams

    def __init__(self, hp: PerFedAvgParams) -> None:
        super().__init__(hp)
        self.parts = 2 if hp.variant == "fo" else 3
        self.step_cost = 1 if hp.variant == "fo" else 2

    def meta_direction(self, params: Pytree, parts: list[Batch], oracle: Oracle) -> Pytree:
        """The stochastic gradient of the MAML objective at `params` (fo: without the Hessian term)."""
        alpha = self.hp.alpha
        inner = oracle.grad(params, parts[0])
        adapted = {k: torch.add(w, inner[k], alpha=-alpha) for k, w in params.items()}
        outer = oracle.grad(adapted, parts[1])
        if self.hp.variant == "fo":
            return outer
        if self.hp.hvp == "autodiff":
            curvature = hessian_vector_product(oracle, params, parts[2], outer)
        else:
            curvature = finite_difference_hvp(oracle, params, parts[2], outer, self.hp.delta)
        return {k: torch.add(g, curvature[k], alpha=-alpha) for k, g in outer.items()}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        parts = split_batch(batch, self.parts)
        if any(part.y.shape[0] == 0 for part in parts):
            return state  # fewer samples than parts (a short last batch): no independent batches, no step
        params = state["params"]
        d = self.meta_direction(params, parts, oracle)
        new = {k: torch.add(w, d[k], alpha=-self.hp.lr) for k, w in params.items()}
        # Under vmap a padded part can hold no real sample: that client skips the step, as unpadded runtimes do.
        filled = torch.stack([part.w.sum() > 0 for part in parts]).all()
        return {**state, "params": {k: torch.where(filled, v, params[k]) for k, v in new.items()}}

    def personalize(self, server_message: Pytree, client_state: Pytree | None, data: Batch, oracle: Oracle) -> Pytree:
        """One alpha-step of gradient descent on the client's training split (`data`) from the global model: the
        paper's personalized model. Never the test split (the pFedMe repository adapts on test batches)."""
        params = server_message["params"]
        grads = oracle.grad(params, data)
        return {k: torch.add(w, grads[k], alpha=-self.hp.alpha) for k, w in params.items()}
