"""FedSAM (Qu et al., ICML 2022): the ascent point's global normalization, the SAM step on one minibatch, and rho = 0
giving FedAvg's numbers bit for bit."""

from __future__ import annotations

import pytest
import torch
from rulekit import batch_of
from torch.func import vmap

import fedsim
from fedsim.clients import ALGORITHMS
from fedsim.clients.fedsam import FedSAM, FedSAMParams, ascent_point
from fedsim.errors import ScenarioError
from fedsim.runtime.local import job_info


class Quadratic:
    """Oracle stand-in for f(w) = sum_k a_k w_k^2 / 2 (gradient a * w), recording the batches it is asked about."""

    def __init__(self, a):
        self.a, self.batches = a, []

    def grad(self, params, batch):
        self.batches.append(batch)
        return {k: self.a[k] * w for k, w in params.items()}


def test_ascent_point_normalizes_by_one_norm_over_all_leaves():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([-1.0])}
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    point = ascent_point(params, grads, 0.5)
    # ||g|| = 5 over both leaves (per-leaf norms would move each leaf by 0.5).
    torch.testing.assert_close(point["a"], torch.tensor([1.0 + 0.3, 2.0]))
    torch.testing.assert_close(point["b"], torch.tensor([-1.0 + 0.4]))


def test_zero_gradient_leaves_the_point_in_place_even_under_vmap():
    params = {"w": torch.tensor([[1.0, -2.0], [1.0, -2.0]])}
    grads = {"w": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}
    point = vmap(lambda p, g: ascent_point(p, g, 10.0))(params, grads)
    assert torch.equal(point["w"][0], params["w"][0])
    torch.testing.assert_close(point["w"][1], torch.tensor([1.0, 8.0]))


def test_sam_step_descends_along_the_gradient_at_the_ascent_point_of_the_same_minibatch():
    rule = FedSAM(FedSAMParams(lr=0.1, rho=0.2))
    a = {"w": torch.tensor([1.0, 3.0])}
    w = torch.tensor([2.0, 1.0])
    oracle = Quadratic(a)
    batch = batch_of(torch.zeros(1), torch.zeros(1))
    state = rule.step(rule.init({"params": {"w": w}}, None, job_info(10, 1, 0)), batch, oracle)
    g = a["w"] * w
    perturbed = w + 0.2 * g / g.norm()
    torch.testing.assert_close(state["params"]["w"], w - 0.1 * a["w"] * perturbed)
    assert len(oracle.batches) == 2 and all(b is batch for b in oracle.batches)


def test_fedsam_is_registered_with_fedavgs_server_and_charges_two_gradients_a_step():
    entry = ALGORITHMS.get("fedsam")
    assert entry.meta["server"] == "fedavg" and entry.meta["stragglers"] == "drop"
    assert entry.obj.step_cost == 2


def test_fedsam_with_rho_zero_gives_fedavgs_metrics_bit_for_bit(tiny):
    local = {"lr": 0.05, "batch_size": 20, "local_epochs": 2}
    sam = fedsim.run({**tiny, "algorithm": {"name": "fedsam", "rho": 0.0, **local}}, write=False).metrics.rows
    avg = fedsim.run({**tiny, "algorithm": {"name": "fedavg", **local}}, write=False).metrics.rows
    assert len(sam) == len(avg) == tiny["rounds"] + 1
    for s, f in zip(sam, avg, strict=True):
        assert {k: v for k, v in s.items() if not k.endswith("_time")} == \
            {k: v for k, v in f.items() if not k.endswith("_time")}
    # Same learning, but each step is charged two gradient evaluations on the clock.
    assert sam[-1]["sim_time"] > avg[-1]["sim_time"]
    assert sam[-1]["loss"] < sam[0]["loss"]


def test_negative_rho_is_refused_naming_the_field(tiny):
    with pytest.raises(ScenarioError, match=r"^algorithm\.rho: Input should be greater than or equal to 0"):
        fedsim.run({**tiny, "algorithm": {"name": "fedsam", "rho": -0.1}}, write=False)
