"""SpiderBoost (Wang et al., NeurIPS 2019) and private SpiderBoost (Arora et al., ICML 2023, Algorithm 2): with full
samples the estimator is the exact gradient, so the run is gradient descent; Poisson samples give an unbiased
estimate; clipping bounds every record's term; the noise has the paper's stds (checkpoint sigma1 C0 / b1, difference
sigma2 min(C1 ||w_t - w_{t-1}||, cap) / b2); the run is accounted as the composition of its releases and calibrates to
a target; the user level (our federated extension) clips whole clients; Theorem B.3's settings; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedsim
from fedsim.accounting import PrivacyLedger
from fedsim.aggregation import Aggregate
from fedsim.clients import Batch
from fedsim.clients.spiderboost import SpiderBoostClient, SpiderBoostParams
from fedsim.errors import ScenarioError
from fedsim.keyed_random import key_from_seed
from fedsim.models import MODELS, build_model
from fedsim.oracle import FuncOracle
from fedsim.params import tree_leaves, tree_map
from fedsim.privacy import Population
from fedsim.private_spider import tree_noise_multiplier
from fedsim.registry import NoParams
from fedsim.runtime import Job
from fedsim.runtime.context import padded_schedules
from fedsim.runtime.local import job_batches, job_info
from fedsim.scenario import load_scenarios
from fedsim.servers.private_spiderboost import PrivateSpiderBoostParams, PrivateSpiderBoostServer
from fedsim.servers.spiderboost import SpiderBoostServer, SpiderBoostServerParams, theorem_b3_settings
from fedsim.simulation import build_simulation
from fedsim.tasks import Classification, Objective

FEATURES, CLASSES = 6, 3


@pytest.fixture
def objective() -> Objective:
    model = build_model("logreg", MODELS.get("logreg").params(), (FEATURES,), CLASSES, seed=1)
    return Objective(model, Classification(NoParams()))


@pytest.fixture
def spider(tiny) -> dict:
    """Every client every round (the sample level's setting), full checkpoints, phases of 4."""
    return {**tiny, "rounds": 6, "clients_per_round": 10, "algorithm": {"name": "spiderboost", "batch_size": 16},
            "server": {"name": "spiderboost", "lr": 0.5, "phase_length": 4}}


def records(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g) * torch.linspace(0.2, 4.0, n)[:, None]
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def flat(tree) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in tree_leaves(tree)])


def client_message(objective: Objective, message: dict, x: torch.Tensor, y: torch.Tensor, key_seed: int,
                   batch_size: int = 8, client: int = 0) -> dict:
    """One client job of the spiderboost rule over (x, y) in minibatches, as a runtime runs it."""
    rule = SpiderBoostClient(SpiderBoostParams(batch_size=batch_size))
    oracle = FuncOracle(objective, weighted=True)
    state = rule.init(message, None, job_info(len(y), -(-len(y) // batch_size), client))
    for step, start in enumerate(range(0, len(y), batch_size)):
        rows = slice(start, start + batch_size)
        batch = Batch(x[rows], y[rows], torch.ones(len(y[rows])), key_from_seed(key_seed), torch.tensor(step))
        state = rule.step(state, batch, oracle)
    return rule.final(state)[0]


def broadcast(params, previous, checkpoint: bool, rate: float, **extra) -> dict:
    return {"params": params, "previous": previous, "checkpoint": torch.tensor(float(checkpoint)),
            "rate": torch.tensor(rate, dtype=torch.float64), **extra}


def pooled_gradient(objective: Objective, params, x: torch.Tensor, y: torch.Tensor):
    oracle = FuncOracle(objective, weighted=False)
    return oracle.grad(params, Batch(x, y, torch.ones(len(y)), key_from_seed(0), torch.tensor(0)))


def record_states(monkeypatch) -> list[dict]:
    """The server state after each step of SpiderBoost (private or not), in order."""
    states, advance = [], SpiderBoostServer.advance

    def recording(self, state, nabla):
        new = advance(self, state, nabla)
        states.append(new)
        return new

    monkeypatch.setattr(SpiderBoostServer, "advance", recording)
    return states


def test_with_full_samples_spiderboost_is_gradient_descent_on_the_pooled_data(spider, monkeypatch):
    """Rates 1: the checkpoint is the full gradient and each difference the exact change, so nabla_t = grad F(w_t)
    (the telescoping sum of line 14) and w_{t+1} = w_t - eta grad F(w_t)."""
    states = record_states(monkeypatch)
    fedsim.run(spider, write=False)
    sim = build_simulation(load_scenarios(spider)[0][0])
    x, y = sim.data.x_train, sim.data.y_train
    w = states[0]["previous"]
    for state in states:
        g = pooled_gradient(sim.objective, w, x, y)
        torch.testing.assert_close(flat(state["nabla"]), flat(g), rtol=1e-4, atol=1e-6)
        w = tree_map(lambda a, b: a - 0.5 * b, w, g)
        torch.testing.assert_close(flat(state["params"]), flat(w), rtol=1e-4, atol=1e-6)
    assert len(states) == 6


def test_poisson_samples_estimate_the_sum_of_gradients_without_bias(objective):
    """Each record joins with probability r: the client's sum over r is, on average over keys, the sum of every
    record's gradient (here 200 jobs, within 4 standard errors)."""
    x, y = records(40, seed=0)
    params = objective.model.init_params
    full = flat(pooled_gradient(objective, params, x, y)) * len(y)
    rate = 0.25
    sums = torch.stack([flat(client_message(objective, broadcast(params, params, True, rate), x, y, key)["sum"])
                        for key in range(200)]) / rate
    error = (sums.mean(0) - full).abs()
    assert torch.all(error <= 4 * sums.std(0) / math.sqrt(len(sums)) + 1e-6)
    counts = [int(torch.count_nonzero(s.abs().sum() > 0)) for s in sums]
    assert sum(counts) > 175  # not a degenerate sampler: most jobs sample someone


def test_a_difference_is_the_sum_of_each_records_gradient_change(objective):
    """Not a checkpoint, rate 1: the message is sum_i grad f(w_t; z_i) - grad f(w_{t-1}; z_i)."""
    x, y = records(20, seed=1)
    w0 = objective.model.init_params
    w1 = tree_map(lambda v: v + 0.1, w0)
    change = flat(pooled_gradient(objective, w1, x, y)) - flat(pooled_gradient(objective, w0, x, y))
    message = client_message(objective, broadcast(w1, w0, False, 1.0), x, y, key_seed=3)
    torch.testing.assert_close(flat(message["sum"]), change * len(y), rtol=1e-4, atol=1e-5)


def test_clipping_bounds_each_records_term_and_leaves_small_ones_alone(objective):
    """With the broadcast bound, each record adds at most the bound; a bound above every term changes nothing."""
    x, y = records(12, seed=2)
    w0 = objective.model.init_params
    w1 = tree_map(lambda v: v - 0.3, w0)
    plain = client_message(objective, broadcast(w1, w0, False, 1.0), x, y, 5, batch_size=1)
    loose = client_message(objective, broadcast(w1, w0, False, 1.0, clip=torch.tensor(1e6, dtype=torch.float64)),
                           x, y, 5, batch_size=1)
    assert torch.equal(flat(plain["sum"]), flat(loose["sum"]))
    for i in range(len(y)):
        term = client_message(objective, broadcast(w1, w0, False, 1.0, clip=torch.tensor(0.05, dtype=torch.float64)),
                              x[i:i + 1], y[i:i + 1], 5, batch_size=1)
        assert float(flat(term["sum"]).norm()) <= 0.05 * (1 + 1e-5)


def server_update(server, state, seed: int, template) -> dict:
    zeros = {"sum": tree_map(torch.zeros_like, template)}
    aggregate = Aggregate(zeros, {"sum": "uniform"}, {"sum": 0.0}, 0, 10, int(state["step"]), [], None,
                          key_from_seed(seed))
    return server.update(state, aggregate)


@pytest.mark.parametrize("level", ["sample", "user"])
def test_the_noise_has_the_papers_stds_at_checkpoints_and_differences(objective, level):
    """Line 8: std sigma1 C0 / b1; line 12: std sigma2 min(C1 ||w_t - w_{t-1}||, cap) / b2 (b = rate x n records,
    or p N clients at the user level); measured over 300 server keys per coordinate."""
    sizes = np.array([30, 50, 20])
    population = Population(sizes, 0.5 if level == "user" else None)
    hp = SpiderBoostServerParams(lr=0.1, phase_length=3, checkpoint_rate=0.8, difference_rate=0.2)
    params = PrivateSpiderBoostParams(clip=2.0, difference_clip=3.0, noise_multiplier=1.5, difference_noise_ratio=0.5,
                                      level=level)
    server = PrivateSpiderBoostServer(params, SpiderBoostServer(hp), population)
    w0 = objective.model.init_params
    state = server.init(w0)
    checkpoint = torch.stack([flat(server_update(server, state, s, w0)["nabla"]) for s in range(300)])
    b1, b2 = (0.5 * 3, 0.5 * 3) if level == "user" else (0.8 * 100, 0.2 * 100)
    assert abs(float(checkpoint.std()) / (1.5 * 2.0 / b1) - 1) < 0.05
    for shift, bound in ((0.01, None), (5.0, 4.0)):  # short step: C1 ||dw||; long step: capped at 2 C0
        w1 = tree_map(lambda v, shift=shift: v + shift, w0)
        moved = {**state, "params": w1, "previous": w0, "step": torch.tensor(1), "nabla": tree_map(torch.zeros_like,
                                                                                                   w0)}
        length = float((flat(w1) - flat(w0)).norm())
        expected = 0.75 * (3.0 * length if bound is None else bound) / b2
        assert float(server.bound(moved)) == pytest.approx(min(3.0 * length, 4.0))
        difference = torch.stack([flat(server_update(server, moved, s, w0)["nabla"]) for s in range(300)])
        assert abs(float(difference.std()) / expected - 1) < 0.05


def test_without_noise_and_binding_clips_the_private_run_is_the_plain_run(spider, monkeypatch):
    states = record_states(monkeypatch)
    fedsim.run(spider, write=False)
    plain = [flat(s["params"]) for s in states]
    states.clear()
    rows = fedsim.run({**spider, "privacy": {"name": "private_spiderboost", "clip": 1e6, "difference_clip": 1e6,
                                             "difference_cap": 1e7, "noise_multiplier": 0.0}}, write=False).metrics.rows
    assert all(torch.equal(a, flat(b["params"])) for a, b in zip(plain, states, strict=True))
    assert math.isinf(rows[-1]["epsilon_rdp"])


def test_epsilon_is_the_composition_of_checkpoints_and_differences(spider):
    """6 rounds in phases of 4: checkpoints at steps 0 and 4 (sigma1, b1 / n), four differences (sigma2, b2 / n)."""
    spec = {**spider, "server": {**spider["server"], "checkpoint_rate": 0.9, "difference_rate": 0.3},
            "privacy": {"name": "private_spiderboost", "noise_multiplier": 2.0, "difference_noise_ratio": 1.5,
                        "accountants": ["rdp", "pld"]}}
    rows = fedsim.run(spec, write=False).metrics.rows
    ledger = PrivacyLedger()
    ledger.record(2.0, 0.9, 2)
    ledger.record(3.0, 0.3, 4)
    assert rows[-1]["epsilon_rdp"] == pytest.approx(ledger.epsilon(1e-5, "rdp"), rel=1e-9)
    assert rows[-1]["epsilon_pld"] == pytest.approx(ledger.epsilon(1e-5, "pld"), rel=1e-9)
    assert rows[0]["epsilon_rdp"] == 0.0


def test_a_target_epsilon_calibrates_both_multipliers_and_is_spent(spider):
    spec = {**spider, "server": {**spider["server"], "difference_rate": 0.3},
            "privacy": {"name": "private_spiderboost", "target_epsilon": 3.0, "difference_noise_ratio": 2.0}}
    result = fedsim.run(spec, write=False)
    assert result.metrics.rows[-1]["epsilon_rdp"] == pytest.approx(3.0, rel=5e-3)
    assert result.metrics.rows[-1]["epsilon_rdp"] <= 3.0
    assert any("noise_multiplier" in n and "6 server steps" in n for n in result.notices)


@pytest.mark.parametrize("aggregation", ["naive", "tree"])
def test_runtimes_give_the_same_private_run(spider, aggregation):
    """Clients of different sizes (short last batches, padding), vectorized in chunks of 3, vmapped throughout or the
    chunk's last clients one by one without padding rows: the sequential run's losses."""
    spec = {**spider, "partition": {"name": "quantity"}, "server": {**spider["server"], "difference_rate": 0.3},
            "privacy": {"name": "private_spiderboost", "noise_multiplier": 1.0, "clip": 0.5,
                        "aggregation": aggregation}}
    sequential = [r["loss"] for r in fedsim.run(spec, write=False).metrics.rows]
    for min_batch in (1, 100):
        runtime = {"name": "vectorized", "chunk_size": 3, "min_batch": min_batch}
        rows = fedsim.run({**spec, "runtime": runtime}, write=False).metrics.rows
        assert [r["loss"] for r in rows] == pytest.approx(sequential, rel=1e-6)


def test_at_the_user_level_each_client_sends_its_clipped_mean(objective):
    x, y = records(20, seed=4)
    w0 = objective.model.init_params
    one = torch.ones((), dtype=torch.float64)
    big = client_message(objective, broadcast(w0, w0, True, 1.0, clip=one * 1e6, user=one), x, y, 6)
    mean = flat(pooled_gradient(objective, w0, x, y))
    torch.testing.assert_close(flat(big["sum"]), mean, rtol=1e-4, atol=1e-6)
    small = client_message(objective, broadcast(w0, w0, True, 1.0, clip=one * 0.01, user=one), x, y, 6)
    torch.testing.assert_close(flat(small["sum"]), mean * 0.01 / float(mean.norm()), rtol=1e-4, atol=1e-7)


def test_a_user_level_run_samples_clients_and_counts_a_release_per_round(spider):
    spec = {**spider, "rounds": 5, "clients_per_round": 5,
            "protocol": {"name": "synchronous", "client_sampling": "poisson"},
            "privacy": {"name": "private_spiderboost", "level": "user", "noise_multiplier": 1.2}}
    rows = fedsim.run(spec, write=False).metrics.rows
    ledger = PrivacyLedger()
    ledger.record(1.2, 0.5, 5)
    assert rows[-1]["epsilon_rdp"] == pytest.approx(ledger.epsilon(1e-5), rel=1e-9)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_fedsim_privacy_plans_the_schedule(spider):
    spec = {**spider, "server": {**spider["server"], "difference_rate": 0.3},
            "privacy": {"name": "private_spiderboost", "noise_multiplier": 2.0}}
    [(variant, mechanism, plan)] = fedsim.api.privacy_plan(spec)
    ledger = PrivacyLedger()
    ledger.record(2.0, 1.0, 2)
    ledger.record(2.0, 0.3, 4)
    assert mechanism == "private_spiderboost" and plan["releases"] == 6 and plan["sampling_rate"] == 1.0
    assert plan["epsilon_rdp"] == pytest.approx(ledger.epsilon(1e-5), rel=1e-9)


def test_the_gradient_norm_metric_is_the_pooled_training_gradients_norm(spider):
    spec = {**spider, "rounds": 1, "evaluation": {"gradient_norm": True}}
    row = fedsim.run(spec, write=False).metrics.rows[0]
    sim = build_simulation(load_scenarios(spec)[0][0])
    g = pooled_gradient(sim.objective, sim.objective.model.init_params, sim.data.x_train, sim.data.y_train)
    assert row["grad_norm"] == pytest.approx(float(flat(g).norm()), rel=1e-5)


def test_theorem_b3_settings_follow_the_papers_formulas():
    """L0 = 1, L1 = 2, F0 = 1, d = 10, n = 10^4, epsilon 1, delta 1e-5, worked by hand: alpha = sqrt(10 ln 1e5) / 1e4
    = 1.073e-3; b2 = max((1 / (sqrt(2) alpha))^(2/3) = 75.7, 1e4 alpha^(2/3) / 2^(1/6) = 93.3) -> 93;
    T = max((2^(1/4) / alpha)^(4/3) = 1.15e4, 1 / alpha = 932) -> 11469; q = 1 / (T alpha^2) = 75.7 -> 75;
    eta = 1 / (2 L1) = 0.25."""
    assert theorem_b3_settings(1.0, 2.0, 1.0, 10, 10_000, 1.0, 1e-5) == {
        "lr": 0.25, "checkpoint_rate": 1.0, "difference_rate": 0.0093, "phase_length": 75, "rounds": 11469}


def test_ordered_batches_take_the_records_in_their_stored_order_in_every_runtime():
    """`sampling: ordered` (SpiderBoost's: a record's position names it): the sequential runtime's batches and the
    vectorized runtime's padded schedule both go through rows 0 .. n - 1 in order, epoch after epoch."""
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    hp = SpiderBoostParams(batch_size=4)
    rows = [b.y.tolist() for b in job_batches(x, y, hp, 3, local_seed=5, key=key_from_seed(0))]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    schedule = padded_schedules(0, [Job(0, 0, 3), Job(0, 1, 5)], [10, 7], 4, ordered=True)
    assert schedule[:, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1], [-1] * 4, [-1] * 4]
    assert schedule[:, 1].tolist() == [[0, 1, 2, 3], [4, 5, 6, -1], [0, 1, 2, 3], [4, 5, 6, -1], [0, 1, 2, 3]]


def sampled_records(message: dict) -> torch.Tensor:
    """Which records a message summed, for one-hot records (record i's gradient lives in weight column i only)."""
    return message["sum"]["1.weight"].abs().sum(0) > 0


def test_under_tree_aggregation_each_record_joins_at_most_one_leaf_of_a_phase():
    """200 one-hot records, 4 leaves at rate 0.2: the leaves' samples are disjoint, cover about 80% of the records,
    repeat for the same phase key and client, and change with another client or phase key."""
    n, leaves, rate = 200, 4, 0.2
    model = build_model("logreg", MODELS.get("logreg").params(), (n,), CLASSES, seed=1)
    objective = Objective(model, Classification(NoParams()))
    x, y = torch.eye(n), torch.arange(n) % CLASSES
    w0 = objective.model.init_params
    g = torch.Generator().manual_seed(0)
    w1 = tree_map(lambda v: v + torch.randn(v.shape, generator=g), w0)
    one = torch.ones((), dtype=torch.float64)

    def leaf_sample(leaf: int, phase_key: int, client: int = 0) -> torch.Tensor:
        message = broadcast(w1, w0, False, rate, tree=one, leaf=one * leaf, phase_key=key_from_seed(phase_key))
        return sampled_records(client_message(objective, message, x, y, key_seed=leaf, batch_size=32, client=client))

    samples = torch.stack([leaf_sample(leaf, 9) for leaf in range(1, leaves + 1)])
    assert int(samples.sum(0).max()) == 1
    assert abs(float(samples.any(0).float().mean()) - leaves * rate) < 0.1
    assert torch.equal(samples[2], leaf_sample(3, 9))
    assert not torch.equal(samples[2], leaf_sample(3, 9, client=1))
    assert not torch.equal(samples[2], leaf_sample(3, 10))


def test_a_tree_of_one_leaf_at_full_rates_without_noise_is_the_naive_run(spider, monkeypatch):
    """Phases of 2 at rates 1: the one leaf holds every record, its prefix is the difference itself."""
    states = record_states(monkeypatch)
    spec = {**spider, "server": {**spider["server"], "phase_length": 2}}
    noiseless = {"name": "private_spiderboost", "noise_multiplier": 0.0, "clip": 0.5, "difference_clip": 0.5}
    fedsim.run({**spec, "privacy": noiseless}, write=False)
    naive = [flat(s["params"]) for s in states]
    states.clear()
    fedsim.run({**spec, "privacy": {**noiseless, "aggregation": "tree"}}, write=False)
    assert all(torch.equal(a, flat(b["params"])) for a, b in zip(naive, states, strict=True))


def test_a_tree_phase_is_accounted_once_at_the_trees_multiplier_and_the_phases_rate(spider):
    """6 rounds in phases of 4 (3 leaves at rate 0.25): 2 checkpoints, and 2 phases whose leaves were released, each
    one Gaussian at sigma2 / sqrt(2) (floor(log2 3) + 1 = 2 levels) on a sample of rate 3 x 0.25."""
    spec = {**spider, "server": {**spider["server"], "difference_rate": 0.25},
            "privacy": {"name": "private_spiderboost", "noise_multiplier": 2.0, "aggregation": "tree"}}
    rows = fedsim.run(spec, write=False).metrics.rows
    ledger = PrivacyLedger()
    ledger.record(2.0, 1.0, 2)
    ledger.record(tree_noise_multiplier(2.0, 3), 0.75, 2)
    assert tree_noise_multiplier(2.0, 3) == pytest.approx(2.0 / math.sqrt(2))
    assert rows[-1]["epsilon_rdp"] == pytest.approx(ledger.epsilon(1e-5), rel=1e-9)
    vectorized = fedsim.run({**spec, "runtime": {"name": "vectorized"}}, write=False).metrics.rows
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in vectorized], rel=1e-6)


@pytest.mark.parametrize(("change", "field"), [
    ({"algorithm": {"name": "fedavg"}, "server": {"name": "fedavg"}}, "privacy.name"),
    ({"clients_per_round": 5}, "clients_per_round"),
    ({"privacy": {"name": "private_spiderboost", "level": "user"}}, "protocol.client_sampling"),
    ({"protocol": {"name": "synchronous", "client_sampling": "poisson"}}, "protocol.client_sampling"),
    ({"privacy": {"name": "private_spiderboost", "level": "user"}, "clients_per_round": 5,
      "protocol": {"name": "synchronous", "client_sampling": "poisson"},
      "server": {"name": "spiderboost", "difference_rate": 0.1}}, "server.difference_rate"),
    ({"privacy": {"name": "private_spiderboost", "clip": 0}}, "privacy.clip"),
    ({"privacy": {"name": "private_spiderboost", "difference_noise_ratio": -1}}, "privacy.difference_noise_ratio"),
    ({"algorithm": {"name": "spiderboost", "local_epochs": 2}}, "algorithm.local_epochs"),
    ({"server": {"name": "spiderboost", "phase_length": 0}}, "server.phase_length"),
    ({"server": {"name": "spiderboost", "difference_rate": 1.5}}, "server.difference_rate"),
    ({"compression": {"uplink": {"name": "topk", "ratio": 0.5}}}, "compression.uplink"),
    ({"compression": {"downlink": {"name": "topk", "ratio": 0.5}}}, "compression.downlink"),
    ({"privacy": {"name": "dpfedavg"}, "protocol": {"name": "synchronous", "client_sampling": "poisson"}},
     "privacy.name"),
    ({"privacy": {"name": "private_spiderboost", "aggregation": "tree", "level": "user"},
      "protocol": {"name": "synchronous", "client_sampling": "poisson"}, "clients_per_round": 5},
     "privacy.aggregation"),
    ({"privacy": {"name": "private_spiderboost", "aggregation": "tree"},
      "server": {"name": "spiderboost", "phase_length": 1}}, "server.phase_length"),
    ({"privacy": {"name": "private_spiderboost", "aggregation": "tree"},
      "server": {"name": "spiderboost", "phase_length": 4, "difference_rate": 0.5}}, "server.difference_rate"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(spider, change, field):
    spec = {**spider, "privacy": {"name": "private_spiderboost"}, **change}
    with pytest.raises(ScenarioError) as error:
        fedsim.run(spec, write=False)
    assert field in str(error.value) and "\n" not in str(error.value)
