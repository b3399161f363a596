"""DP-SGD around a client rule: exactly the wrapped rule when nothing binds, per-sample clipping to C, Gaussian noise
of std sigma C / L (L the expected batch size of Poisson sampling) drawn the same in every runtime, padding rows that
count for nothing, and one-line errors (fixed-size batches refused)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import vmap

import fedsim
from fedsim.clients import Batch, LocalTrainingParams
from fedsim.clients.dpsgd import (
    DPSGD,
    NOISE_STREAMS,
    DPSGDParams,
    PrivateOracle,
    clip_factors,
    clipping_correction,
    dpsgd,
)
from fedsim.clients.fedavg import LocalSGD
from fedsim.clients.scaffold import Scaffold
from fedsim.errors import ScenarioError
from fedsim.keyed_random import key_from_seed
from fedsim.models import MODELS, build_model
from fedsim.oracle import STREAMS_PER_STEP, AutogradOracle, FuncOracle
from fedsim.params import tree_leaves, tree_map
from fedsim.privacy import PRIVACY, Population
from fedsim.registry import NoParams
from fedsim.scenario import load_scenarios
from fedsim.servers import ServerParams
from fedsim.servers.fedavg import FedAvgServer
from fedsim.tasks import Classification, Objective, Regression, RegressionParams

FEATURES, CLASSES = 6, 3


@pytest.fixture
def objective() -> Objective:
    model = build_model("logreg", MODELS.get("logreg").params(), (FEATURES,), CLASSES, seed=1)
    return Objective(model, Classification(NoParams()))


def batch(n: int, seed: int, step: int = 0, padding: int = 0, key_seed: int = 7) -> Batch:
    """n samples (the last `padding` of them weight 0) of scaled random inputs, so per-sample gradient norms vary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g) * torch.linspace(0.2, 4.0, n)[:, None]
    y = torch.randint(0, CLASSES, (n,), generator=g)
    w = torch.cat([torch.ones(n - padding), torch.zeros(padding)])
    return Batch(x, y, w, key_from_seed(key_seed), torch.tensor(step))


def private(objective: Objective, b: Batch, clip: float, sigma: float, clipping: str = "flat",
            expected: float | None = None) -> dict[str, torch.Tensor]:
    """The private gradient of a Poisson batch of expected size `expected` (by default its own number of real rows,
    so the result is a mean over them)."""
    expected = float(b.w.sum()) if expected is None else expected
    oracle = FuncOracle(objective, weighted=True, denominator=expected)
    params = DPSGDParams(clip=clip, noise_multiplier=sigma, clipping=clipping)
    return PrivateOracle(oracle, params, expected).grad(objective.model.init_params, b)


def wrap(params: DPSGDParams, rule) -> DPSGD:
    """The client rule DP-SGD makes of `rule` (it leaves the server rule as it is)."""
    return dpsgd(params, rule, FedAvgServer(ServerParams()), Population(np.full(3, 10), None))[0]


def clipped_mean_by_hand(objective: Objective, b: Batch, clip: float, clipping: str) -> dict[str, torch.Tensor]:
    """mean over the real rows of each sample's autograd gradient scaled to norm at most C (flat) or C / sqrt(L) per
    parameter tensor (per-layer); also checks every clipped gradient is within its bound."""
    oracle, real = AutogradOracle(objective), b.w > 0
    grads = [oracle.grad(objective.model.init_params, Batch(b.x[i:i + 1], b.y[i:i + 1], b.w[i:i + 1], b.key, b.step))
             for i in range(len(b.y)) if real[i]]
    layers = len(grads[0])
    clipped = []
    for g in grads:
        if clipping == "flat":
            norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
            c = {k: min(1.0, clip / norm) for k in g}
        else:
            c = {k: min(1.0, clip / math.sqrt(layers) / float(v.norm())) for k, v in g.items()}
        clipped.append({k: v * c[k] for k, v in g.items()})
    for g in clipped:
        assert math.sqrt(sum(float(v.square().sum()) for v in g.values())) <= clip * (1 + 1e-6)
        if clipping == "per_layer":
            assert all(float(v.norm()) <= clip / math.sqrt(layers) * (1 + 1e-6) for v in g.values())
    return {k: torch.stack([g[k] for g in clipped]).mean(0) for k in clipped[0]}


def without_wall_time(result) -> list[dict]:
    """The rows without wall time, variant and the privacy columns (which a run without privacy lacks)."""
    return [{k: v for k, v in r.items() if k not in ("wall_time", "variant", "epsilon_rdp", "delta")}
            for r in result.metrics.rows]


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("oracle_kind", ["autograd", "func-poisson-padded", "func-mean"])
def test_without_binding_clip_or_noise_steps_are_exactly_the_wrapped_rules(objective, oracle_kind, clipping):
    oracle = {"autograd": AutogradOracle(objective),
              "func-poisson-padded": FuncOracle(objective, weighted=True, denominator=10.0),
              "func-mean": FuncOracle(objective, weighted=False)}[oracle_kind]
    padding = 3 if oracle_kind == "func-poisson-padded" else 0
    plain = LocalSGD(LocalTrainingParams(lr=0.3, sampling="poisson"))
    wrapped = wrap(DPSGDParams(clip=1e6, noise_multiplier=0.0, clipping=clipping), plain)
    message = {"params": objective.model.init_params}
    a, b = plain.init(message, None, {}), wrapped.init(message, None, {})
    for step in range(5):
        minibatch = batch(10, seed=step, step=step, padding=padding)
        a, b = plain.step(a, minibatch, oracle), wrapped.step(b, minibatch, oracle)
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert not torch.equal(a["params"]["1.weight"], objective.model.init_params["1.weight"])
    assert all(torch.equal(u, v) for u, v in zip(tree_leaves(plain.final(a)[0]), tree_leaves(wrapped.final(b)[0]),
                                                strict=True))


@pytest.mark.parametrize("runtime", [{"name": "sequential"}, {"name": "vectorized", "min_batch": 1}],
                         ids=["sequential", "vectorized"])
def test_a_run_without_binding_clip_or_noise_equals_the_run_without_privacy(tiny, runtime):
    spec = {**tiny, "rounds": 2, "runtime": runtime, "algorithm": {**tiny["algorithm"], "sampling": "poisson"}}
    plain = fedsim.run(spec, write=False)
    wrapped = fedsim.run({**spec, "privacy": {"name": "dpsgd", "clip": 1e6, "noise_multiplier": 0.0}}, write=False)
    assert without_wall_time(wrapped) == without_wall_time(plain)
    assert [r["epsilon_rdp"] for r in wrapped.metrics.rows] == [0.0, math.inf, math.inf]  # no noise: no privacy


@pytest.mark.parametrize("padding", [0, 4])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_the_private_gradient_is_the_mean_of_clipped_per_sample_gradients(objective, clipping, padding):
    b, clip = batch(12, seed=3, padding=padding), 2.5
    norms = torch.stack([v.reshape(len(b.y), -1).square().sum(1) for v in tree_leaves(
        FuncOracle(objective, weighted=True).per_sample_grads(objective.model.init_params, b))]).sum(0).sqrt()[b.w > 0]
    assert (norms > clip).sum() >= 3 and (norms < clip).sum() >= 3  # clipping binds for some samples, not all
    expected = clipped_mean_by_hand(objective, b, clip, clipping)
    torch.testing.assert_close(private(objective, b, clip, 0.0, clipping), expected, atol=1e-6, rtol=0)


def test_clip_factors_bound_every_per_sample_gradient(objective):
    b = batch(12, seed=4)
    per_sample = AutogradOracle(objective).per_sample_grads(objective.model.init_params, b)
    for clipping, bound in [("flat", 0.3), ("per_layer", 0.3 / math.sqrt(2))]:
        factors = clip_factors(per_sample, 0.3, clipping)
        clipped = tree_map(lambda g, c: g * c.reshape(-1, *[1] * (g.dim() - 1)), per_sample, factors)
        squares = [v.reshape(len(b.y), -1).square().sum(1) for v in tree_leaves(clipped)]
        norms = [s.sqrt() for s in squares] if clipping == "per_layer" else [sum(squares).sqrt()]
        assert all(bool((n <= bound * (1 + 1e-6)).all()) for n in norms)
        assert any(bool(torch.isclose(n, torch.tensor(bound)).any()) for n in norms)
    huge = clip_factors(per_sample, 1e6, "flat")
    assert all(bool((c == 1.0).all()) for c in tree_leaves(huge))


def test_the_noise_is_sigma_c_over_b_times_the_oracles_normals_on_dpsgds_stream(objective):
    b, clip, sigma = batch(8, seed=5, step=3), 0.4, 1.5
    noise = tree_map(torch.sub, private(objective, b, clip, sigma), private(objective, b, clip, 0.0))
    z = FuncOracle(objective, weighted=True).normal(b, like=objective.model.init_params, stream=NOISE_STREAMS)
    torch.testing.assert_close(noise, tree_map(lambda v: sigma * clip * v / 8, z), atol=1e-6, rtol=1e-5)
    assert NOISE_STREAMS < STREAMS_PER_STEP


def test_the_noise_has_std_sigma_c_over_b_per_coordinate(objective):
    clip, sigma, size, draws = 0.5, 0.8, 16, 300
    clean = private(objective, batch(size, seed=6), clip, 0.0)
    samples = torch.stack([torch.cat([(n - c).reshape(-1) for n, c in zip(
        tree_leaves(private(objective, batch(size, seed=6, key_seed=k), clip, sigma)), tree_leaves(clean),
        strict=True)]) for k in range(draws)])
    expected = sigma * clip / size
    assert abs(float(samples.std()) / expected - 1) < 0.1
    assert abs(float(samples.mean())) < 0.1 * expected
    per_coordinate = samples.std(0) / expected
    assert float(per_coordinate.min()) > 0.75 and float(per_coordinate.max()) < 1.25


def test_each_gradient_call_of_a_step_draws_its_own_noise_and_repeats_with_the_key(objective):
    oracle, b, params = FuncOracle(objective, weighted=True, denominator=8.0), batch(8, seed=7), \
        objective.model.init_params
    first = PrivateOracle(oracle, DPSGDParams(), 8.0)
    g1, g2 = first.grad(params, b), first.grad(params, b)
    again = PrivateOracle(oracle, DPSGDParams(), 8.0).grad(params, b)
    other_key = PrivateOracle(oracle, DPSGDParams(), 8.0).grad(params, batch(8, seed=7, key_seed=8))
    other_step = PrivateOracle(oracle, DPSGDParams(), 8.0).grad(params, batch(8, seed=7, step=1))
    assert all(torch.equal(g1[k], again[k]) for k in g1)
    for g in (g2, other_key, other_step):
        assert all(not torch.allclose(g1[k], g[k]) for k in g1)


def test_value_and_grad_gives_the_plain_loss_with_the_private_gradient(objective):
    oracle, b, params = AutogradOracle(objective), batch(8, seed=8), objective.model.init_params
    value, grads = PrivateOracle(oracle, DPSGDParams(clip=0.2), 8.0).value_and_grad(params, b)
    assert torch.equal(value, oracle.value_and_grad(params, b)[0])
    expected = PrivateOracle(oracle, DPSGDParams(clip=0.2), 8.0).grad(params, b)
    assert all(torch.equal(grads[k], expected[k]) for k in grads)
    assert not torch.allclose(grads["1.weight"], oracle.grad(params, b)["1.weight"])


def test_random_draws_pass_through_and_dpsgds_noise_streams_are_reserved(objective):
    oracle, b, params = FuncOracle(objective, weighted=True), batch(4, seed=9), objective.model.init_params
    wrapped = PrivateOracle(oracle, DPSGDParams(), 4.0)
    assert torch.equal(wrapped.normal(b, params, 3)["1.bias"], oracle.normal(b, params, 3)["1.bias"])
    assert torch.equal(wrapped.uniform(b, params, 2)["1.bias"], oracle.uniform(b, params, 2)["1.bias"])
    assert torch.equal(wrapped.per_sample_grads(params, b)["1.weight"], oracle.per_sample_grads(params, b)["1.weight"])
    with pytest.raises(ValueError, match="dpsgd: random stream"):
        wrapped.normal(b, params, NOISE_STREAMS)


def test_a_padding_row_contributes_nothing(objective):
    b = batch(10, seed=10, padding=3)
    moved = b._replace(x=torch.where(b.w[:, None] > 0, b.x, b.x * 50 + 3), y=torch.where(b.w > 0, b.y, 2 - b.y))
    assert not torch.equal(moved.x, b.x)
    g, h = private(objective, b, 0.3, 1.0), private(objective, moved, 0.3, 1.0)
    assert all(torch.equal(g[k], h[k]) for k in g)
    unpadded = Batch(b.x[:7], b.y[:7], b.w[:7], b.key, b.step)
    torch.testing.assert_close(g, private(objective, unpadded, 0.3, 1.0))


def test_a_non_finite_padding_row_is_selected_away():
    per_sample = {"w": torch.tensor([[1.0, 2.0], [0.3, -0.4], [math.nan, math.inf]])}
    w = torch.tensor([1.0, 1.0, 0.0])
    correction = clipping_correction(per_sample, clip_factors(per_sample, 1.0, "flat"), w)
    # Row 0 (norm sqrt 5) is scaled to norm 1, row 1 (norm 0.5) is kept: sum_i (c_i - 1) g_i = (1/sqrt 5 - 1) [1, 2].
    expected = (1 / math.sqrt(5) - 1) * torch.tensor([1.0, 2.0])
    torch.testing.assert_close(correction["w"], expected)


def test_runtimes_draw_the_same_noise_and_the_noise_changes_the_run(tiny):
    spec = {**tiny, "rounds": 2, "partition": {"name": "quantity", "sigma": 1.0},
            "algorithm": {**tiny["algorithm"], "batch_size": 7, "sampling": "poisson"}}
    privacy = {"name": "dpsgd", "clip": 1.0, "noise_multiplier": 1.0}
    sequential = fedsim.run({**spec, "privacy": privacy, "runtime": {"name": "sequential"}}, write=False)
    # min_batch 1: every step runs vmapped (FuncOracle, padded batches), not one client at a time.
    vectorized = fedsim.run({**spec, "privacy": privacy, "runtime": {"name": "vectorized", "min_batch": 1}},
                            write=False)
    for a, b in zip(sequential.metrics.rows, vectorized.metrics.rows, strict=True):
        for key in ("loss", "test_loss", "accuracy"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a, b)
    noiseless = fedsim.run({**spec, "privacy": {**privacy, "noise_multiplier": 0.0},
                            "runtime": {"name": "sequential"}}, write=False)
    reseeded = fedsim.run({**spec, "seed": 1, "privacy": privacy, "runtime": {"name": "sequential"}}, write=False)
    for other in (noiseless, reseeded):
        assert other.metrics.rows[-1]["loss"] != sequential.metrics.rows[-1]["loss"]


def test_the_wrapper_delegates_everything_but_the_oracle():
    rule = Scaffold(LocalTrainingParams(lr=0.2, batch_size=5, sampling="poisson"))
    server = FedAvgServer(ServerParams())
    wrapped, same = dpsgd(DPSGDParams(), rule, server, Population(np.full(3, 10), None))
    assert same is server
    assert isinstance(wrapped, DPSGD) and wrapped.rule is rule
    assert wrapped.hp is rule.hp and wrapped.step_cost == rule.step_cost
    message = {"params": {"w": torch.ones(3)}, "control": {"w": torch.full((3,), 0.5)}}
    assert torch.equal(wrapped.initial_state(message)["w"], torch.zeros(3))
    state = wrapped.init(message, None, {})
    assert torch.equal(state["correction"]["w"], rule.init(message, None, {})["correction"]["w"])
    entry = PRIVACY.get("dpsgd")
    assert entry.obj is dpsgd and entry.params is DPSGDParams and entry.meta == {"wraps": "client", "unit": "sample"}


@pytest.mark.parametrize(("privacy", "field"), [
    ({"clip": 0}, "privacy.clip"),
    ({"clip": -1.0}, "privacy.clip"),
    ({"noise_multiplier": -0.5}, "privacy.noise_multiplier"),
    ({"clipping": "per_sample"}, "privacy.clipping"),
    ({"clip": "1.0"}, "privacy.clip"),
    ({"nosie_multiplier": 1.0}, "privacy.nosie_multiplier"),
])
def test_bad_parameters_are_one_line_scenario_errors_naming_the_field(tiny, privacy, field):
    with pytest.raises(ScenarioError) as exc:
        load_scenarios({**tiny, "privacy": {"name": "dpsgd", **privacy}})
    message = str(exc.value)
    assert message.startswith(f"{field}:") and "\n" not in message


def test_fixed_size_batches_are_refused_naming_the_sampling_field(tiny):
    with pytest.raises(ScenarioError, match=r"^algorithm\.sampling: privacy dpsgd needs Poisson") as exc:
        fedsim.run({**tiny, "privacy": {"name": "dpsgd"}}, write=False)
    assert "\n" not in str(exc.value)


def test_noisy_gd_on_a_scalar_quadratic_has_the_stationary_variance_eta_s2_over_2_minus_eta():
    """DP-GD with clipping inactive on f(b) = (b - m)^2 / 2 (a linear model whose inputs are 0, so only its bias b
    moves): b <- b - eta ((b - m) + xi), xi ~ N(0, s^2), s = sigma C / L, an AR(1) whose stationary variance is
    eta s^2 / (2 - eta) (research notes, Test 5.2). 2,000 independent chains (keys) run vmapped; the variance is read
    over chains and the last 40 of 120 steps."""
    n, m, clip, sigma, eta = 10, 1.5, 10.0, 0.2, 0.5
    model = build_model("linear", MODELS.get("linear").params(bias=True), (1,), 1, seed=0)
    objective = Objective(model, Regression(RegressionParams()))
    rule = wrap(DPSGDParams(clip=clip, noise_multiplier=sigma),
                LocalSGD(LocalTrainingParams(lr=eta, batch_size=n, sampling="poisson")))
    oracle = FuncOracle(objective, weighted=True, denominator=float(n))
    x, y, w = torch.zeros(n, 1), torch.full((n,), m), torch.ones(n)
    chains = 2000
    start = {"params": {k: v.expand(chains, *v.shape).clone() for k, v in model.init_params.items()}}
    state = vmap(lambda s: rule.init(s, None, {}))(start)
    keys = torch.stack([torch.arange(chains), torch.full((chains,), 3)], dim=1)
    step = vmap(rule.step, in_dims=(0, Batch(None, None, None, 0, None), None))
    tail = []
    for t in range(120):
        state = step(state, Batch(x, y, w, keys, torch.tensor(t)), oracle)
        if t >= 80:
            tail.append(state["params"]["1.bias"].reshape(-1) - m)
    s = sigma * clip / n
    expected = eta * s * s / (2 - eta)
    measured = float(torch.stack(tail).var())
    assert abs(measured / expected - 1) < 0.1, (measured, expected)
    assert float(torch.stack(tail).abs().max()) < clip  # clipping never bound: every per-sample gradient is |b - m|
