"""User-level DP-FedAvg (McMahan et al., ICLR 2018) around any client and server rule: Poisson client sampling, each
client's whole message clipped to S (flat or per layer, optionally after every local step) and weighted by
min(n_k / w_cap, 1), the fixed and bounded estimators with Gaussian noise of std z times their sensitivity, one
accounted release per round (empty rounds too), and one-line errors; adaptive clipping (Andrew et al., NeurIPS 2021):
the clip follows the target quantile of the update norms, in both runtimes and across a resume, at the same epsilon."""

from __future__ import annotations

import itertools
import json
import math
import signal

import numpy as np
import pytest
import torch

import fedsim
from fedsim import run_state
from fedsim.accounting import PrivacyLedger
from fedsim.aggregation import Aggregate
from fedsim.checkpoint import completed, read_manifest, read_rank
from fedsim.clients import LocalTrainingParams
from fedsim.clients.fedavg import LocalSGD
from fedsim.errors import RunInterrupted, ScenarioError
from fedsim.keyed_random import key_from_seed
from fedsim.oracle import AutogradOracle
from fedsim.params import tree_leaves, tree_map
from fedsim.privacy import Population
from fedsim.runtime.context import RuntimeContext, client_tensors
from fedsim.runtime.local import client_batches
from fedsim.sampling import plan_round
from fedsim.scenario import load_scenarios
from fedsim.servers import ServerParams
from fedsim.servers.dpfedavg import (
    BIT_KEY,
    CLIP_KEY,
    ClippedClient,
    DPFedAvgParams,
    NoisyServer,
    client_weights,
    clipped,
    update_noise_multiplier,
)
from fedsim.servers.fedavg import FedAvgServer
from fedsim.simulation import build_simulation

Z, S = 0.8, 0.5
ZA = 0.3
"""z of the adaptive runs: 8 of 10 clients a round give the default sigma_b = 8 / 20, and 2 sigma_b > z."""


@pytest.fixture
def private(tiny) -> dict:
    return {**tiny, "rounds": 3, "clients_per_round": 4,
            "protocol": {"name": "synchronous", "client_sampling": "poisson"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20},
            "privacy": {"name": "dpfedavg", "clip": S, "noise_multiplier": Z}}


@pytest.fixture
def adaptive(private) -> dict:
    return {**private, "clients_per_round": 8,
            "privacy": {"name": "dpfedavg", "clip": S, "noise_multiplier": ZA, "adaptive_clip": True}}


def record_clips(monkeypatch) -> list[float]:
    """The clip each adaptive server step leaves in the server state, in order (filled as runs go)."""
    clips, update = [], NoisyServer.update

    def recording(self, state, aggregate):
        new = update(self, state, aggregate)
        clips.extend([float(new[CLIP_KEY])] if CLIP_KEY in new else [])
        return new

    monkeypatch.setattr(NoisyServer, "update", recording)
    return clips


def norm(tree) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in tree_leaves(tree)))


def test_poisson_client_sampling_draws_each_client_with_probability_k_over_n():
    sizes = np.full(50, 10)
    counts = np.zeros(50)
    rounds = 2000
    for t in range(rounds):
        plan = plan_round(3, t, sizes, 5, 0.0, 1, 10, poisson=True)
        assert len(set(plan.clients.tolist())) == len(plan.clients)
        counts[plan.clients] += 1
    sd = math.sqrt(rounds * 0.1 * 0.9)
    assert np.abs(counts - rounds * 0.1).max() < 5 * sd


def test_without_noise_or_binding_clip_it_is_uniform_fedavg_over_every_client(tiny):
    everyone = {**tiny, "rounds": 2, "clients_per_round": 10, "algorithm": {"name": "fedavg", "lr": 0.05,
                                                                            "batch_size": 20}}
    plain = fedsim.run({**everyone, "server": {"name": "fedavg", "weighting": "uniform"}}, write=False).metrics.rows
    private = fedsim.run({**everyone, "protocol": {"name": "synchronous", "client_sampling": "poisson"},
                          "privacy": {"name": "dpfedavg", "clip": 1e6, "noise_multiplier": 0.0}},
                         write=False).metrics.rows
    for a, b in zip(plain, private, strict=True):
        assert b["client_updates"] == a["client_updates"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["accuracy"] == a["accuracy"]


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_clients_message_is_clipped_to_s_and_weighted(clipping):
    message = {"delta": {"w": torch.full((3, 4), 2.0), "b": torch.full((4,), -1.0)}, "control": torch.ones(5)}
    out = clipped(message, S, clipping)
    assert norm(out) <= S * (1 + 1e-6) and norm(out) == pytest.approx(S, rel=1e-5)
    if clipping == "per_layer":
        assert all(float(v.norm()) <= S / math.sqrt(3) * (1 + 1e-6) for v in tree_leaves(out))
    small = {"delta": torch.full((2,), 0.01)}
    assert torch.equal(clipped(small, S, clipping)["delta"], small["delta"])


def test_the_client_weight_is_samples_over_the_cap_at_most_one():
    assert client_weights(np.array([5, 20, 80]), 40.0).tolist() == [0.125, 0.5, 1.0]
    assert client_weights(np.array([5, 20]), None).tolist() == [1.0, 1.0]
    rule = ClippedClient(DPFedAvgParams(clip=1e6, weight_cap=40.0), LocalSGD(LocalTrainingParams(lr=0.1)))
    start = {"params": {"w": torch.zeros(2)}}
    state = rule.init(start, None, {"num_samples": torch.tensor(20), "steps": torch.tensor(0)})
    state = {**state, "inner": {**state["inner"], "params": {"w": torch.tensor([1.0, 2.0])}}}
    assert torch.equal(rule.final(state)[0]["delta"]["w"], torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize(("clip", "bit"), [(0.05, 0.0), (1e6, 1.0)])
def test_with_clipping_after_every_step_an_update_is_unclipped_only_if_no_projection_bound(tiny, clip, bit):
    sim = build_simulation(load_scenarios({**tiny, "algorithm": {"name": "fedavg", "lr": 1.0, "batch_size": 5}})[0][0])
    rule = ClippedClient(DPFedAvgParams(clip_every_step=True, adaptive_clip=True), sim.rule)
    start = {"params": sim.model.init_params, CLIP_KEY: torch.tensor(clip, dtype=torch.float64)}
    state = rule.init(start, None, {"num_samples": torch.tensor(100), "steps": torch.tensor(8)})
    x, y = client_tensors(RuntimeContext(sim.rule, sim.objective, sim.data, 0), 0, torch.device("cpu"))
    for batch in client_batches(x, y, 5, 8, torch.Generator().manual_seed(0), key_from_seed(1)):
        state = rule.step(state, batch, AutogradOracle(sim.objective))
    message = rule.final(state)[0]
    assert norm(message["delta"]) <= clip * (1 + 1e-5) and float(message[BIT_KEY]["bit"]) == bit


def test_clipping_after_every_step_keeps_the_local_model_within_s_of_the_rounds_model(tiny):
    sim = build_simulation(load_scenarios({**tiny, "algorithm": {"name": "fedavg", "lr": 1.0, "batch_size": 5}})[0][0])
    rule = ClippedClient(DPFedAvgParams(clip=0.05, clip_every_step=True), sim.rule)
    start = {"params": sim.model.init_params}
    state = rule.init(start, None, {"num_samples": torch.tensor(100), "steps": torch.tensor(8)})
    x, y = client_tensors(RuntimeContext(sim.rule, sim.objective, sim.data, 0), 0, torch.device("cpu"))
    for batch in client_batches(x, y, 5, 8, torch.Generator().manual_seed(0), key_from_seed(1)):
        state = rule.step(state, batch, AutogradOracle(sim.objective))
        moved = {k: state["inner"]["params"][k] - start["params"][k] for k in start["params"]}
        assert norm(moved) <= 0.05 * (1 + 1e-5)
    assert norm(moved) == pytest.approx(0.05, rel=1e-4)  # lr 1 moves further than S: the projection binds


def aggregate_of_zeros(count: int, key: int, results=()) -> Aggregate:
    mean = {"delta": {"w": torch.zeros(4000)}}
    return Aggregate(mean, {"delta": "uniform"}, {"delta": float(count)}, count, 10, 0, list(results), None,
                     key_from_seed(key))


@pytest.mark.parametrize(("estimator", "std"), [("fixed", Z * S / (0.4 * 10)), ("bounded", 2 * Z * S / (0.4 * 6))])
def test_the_noise_std_is_z_times_the_estimators_sensitivity(estimator, std):
    params = DPFedAvgParams(clip=S, noise_multiplier=Z, estimator=estimator,
                            **({"min_weight": 6.0} if estimator == "bounded" else {}))
    server = NoisyServer(params, FedAvgServer(ServerParams()), Population(np.full(10, 50), 0.4))
    state = server.init({"w": torch.zeros(4000)})
    moved = server.update(state, aggregate_of_zeros(3, key=5))["params"]["w"]
    assert abs(float(moved.std()) / std - 1) < 0.05 and abs(float(moved.mean())) < 0.1 * std
    again = server.update(state, aggregate_of_zeros(3, key=5))["params"]["w"]
    assert torch.equal(moved, again)


def test_the_fixed_estimator_divides_the_sum_by_q_w_and_the_bounded_by_at_least_q_w_min(tiny):
    base = FedAvgServer(ServerParams())
    population = Population(np.full(10, 50), 0.4)
    fixed = NoisyServer(DPFedAvgParams(noise_multiplier=0.0), base, population)
    mean = {"delta": {"w": torch.tensor([1.0, -2.0])}}
    agg = Aggregate(mean, {"delta": "uniform"}, {"delta": 3.0}, 3, 10, 0, [], None, key_from_seed(0))
    step = fixed.update(fixed.init({"w": torch.zeros(2)}), agg)["params"]["w"]
    torch.testing.assert_close(step, torch.tensor([3.0, -6.0]) / 4.0)
    bounded = NoisyServer(DPFedAvgParams(noise_multiplier=0.0, estimator="bounded", min_weight=2.0), base, population)
    assert bounded.denominator(agg) == pytest.approx(0.8)


def test_each_round_is_one_release_of_z_and_q_empty_rounds_included(private):
    spec = {**private, "clients_per_round": 1, "rounds": 6}  # q = 0.1 over 10 clients: some rounds draw no one
    rows = fedsim.run(spec, write=False).metrics.rows
    updates = [b["client_updates"] - a["client_updates"] for a, b in zip(rows, rows[1:], strict=False)]
    assert 0 in updates, "seed 0 draws an empty round at q = 0.1"
    for r in rows:
        ledger = PrivacyLedger()
        if r["round"]:
            ledger.record(Z, 0.1, r["round"])
        assert r["epsilon_rdp"] == pytest.approx(ledger.epsilon(1e-5), rel=1e-12)
    empty = updates.index(0)
    assert rows[empty + 1]["loss"] != rows[empty]["loss"]  # the empty round's noise moved the model


@pytest.mark.parametrize("algorithm, server", [("scaffold", None), ("fedavg", {"name": "fedadam", "lr": 0.01})])
def test_it_wraps_scaffold_and_fedadam(private, algorithm, server):
    spec = {**private, "algorithm": {"name": algorithm, "lr": 0.05, "batch_size": 20}}
    if server is not None:
        spec["server"] = server
    rows = fedsim.run(spec, write=False).metrics.rows
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["epsilon_rdp"] > 0


@pytest.mark.parametrize("clipping", ["fixed", "adaptive", "adaptive_every_step"])
def test_the_runtimes_agree(private, adaptive, monkeypatch, clipping):
    clips = record_clips(monkeypatch)
    spec = private if clipping == "fixed" else adaptive
    if clipping == "adaptive_every_step":
        spec = {**spec, "privacy": {**spec["privacy"], "clip": 0.05, "clip_every_step": True}}
    rows = {}
    for rt in ("sequential", "vectorized"):
        rows[rt] = fedsim.run({**spec, "runtime": {"name": rt}}, write=False).metrics.rows
    for a, b in zip(rows["sequential"], rows["vectorized"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["epsilon_rdp"] == a["epsilon_rdp"]
    half = len(clips) // 2
    assert clips[:half] == pytest.approx(clips[half:], rel=1e-12)
    assert len(clips) == (0 if clipping == "fixed" else 2 * spec["rounds"])


def test_a_target_epsilon_calibrates_z_over_the_rounds(private):
    spec = {**private, "rounds": 4, "privacy": {"name": "dpfedavg", "clip": S, "target_epsilon": 5.0}}
    last = fedsim.run(spec, write=False).metrics.rows[-1]
    assert 5.0 * 0.99 <= last["epsilon_rdp"] <= 5.0


def test_a_resolved_scenarios_adaptive_defaults_validate_without_adaptive_clip():
    assert DPFedAvgParams.model_validate(DPFedAvgParams().model_dump()).adaptive_clip is False


@pytest.mark.parametrize(("change", "field"), [
    ({"protocol": {"name": "synchronous"}}, "protocol.client_sampling"),
    ({"privacy": {"name": "dpfedavg", "min_weight": 3.0}}, "privacy"),
    ({"privacy": {"name": "dpfedavg", "clip": 0}}, "privacy.clip"),
    ({"privacy": {"name": "dpfedavg", "noise_multiplier": -1.0}}, "privacy.noise_multiplier"),
    ({"privacy": {"name": "dpfedavg", "weight_cap": 0}}, "privacy.weight_cap"),
    ({"privacy": {"name": "dpfedavg", "estimator": "median"}}, "privacy.estimator"),
    ({"privacy": {"name": "dpfedavg", "target_quantile": 0.7}}, "privacy.target_quantile"),
    ({"privacy": {"name": "dpfedavg", "clip_lr": 0.1}}, "privacy.clip_lr"),
    ({"privacy": {"name": "dpfedavg", "quantile_noise": 1.0}}, "privacy.quantile_noise"),
    ({"privacy": {"name": "dpfedavg", "adaptive_clip": True, "target_quantile": 1.0}}, "privacy.target_quantile"),
    ({"privacy": {"name": "dpfedavg", "adaptive_clip": True, "clip_lr": 0}}, "privacy.clip_lr"),
    ({"privacy": {"name": "dpfedavg", "adaptive_clip": True, "quantile_noise": -1.0}}, "privacy.quantile_noise"),
    # z = 1 and the default sigma_b = 4 clients / 20: 2 sigma_b <= z leaves z_Delta undefined
    ({"privacy": {"name": "dpfedavg", "adaptive_clip": True}}, "privacy.quantile_noise"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(private, change, field):
    with pytest.raises(ScenarioError) as exc:
        fedsim.run({**private, **change}, write=False)
    assert str(exc.value).startswith(field) and "\n" not in str(exc.value)


def client_messages(client: ClippedClient, broadcast: dict, deltas: list[torch.Tensor]) -> list[dict]:
    """The clipped messages of clients whose local training moved the model by `deltas`."""
    messages = []
    for delta in deltas:
        state = client.init(broadcast, None, {"num_samples": torch.tensor(50), "steps": torch.tensor(1)})
        state = {**state, "inner": {**state["inner"], "params": {"w": broadcast["params"]["w"] + delta}}}
        messages.append(client.final(state)[0])
    return messages


def aggregate_of(messages: list[dict], population: int, t: int) -> Aggregate:
    """What the protocol hands the server for `messages` (uniformly weighted), at server step t."""
    n = len(messages)
    mean = tree_map(lambda *vs: torch.stack(vs).double().mean(0).to(vs[0].dtype), *messages)
    return Aggregate(mean, {k: "uniform" for k in mean}, {k: float(n) for k in mean}, n, population, t, [], None,
                     key_from_seed(t))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_an_adaptive_client_clips_to_the_broadcast_clip_and_reports_whether_it_was_unclipped(clipping):
    client = ClippedClient(DPFedAvgParams(clip=S, adaptive_clip=True, clipping=clipping),
                           LocalSGD(LocalTrainingParams(lr=0.1)))
    broadcast = {"params": {"w": torch.zeros(2)}, CLIP_KEY: torch.tensor(2.0, dtype=torch.float64)}
    small, large = client_messages(client, broadcast, [torch.tensor([0.6, 0.8]), torch.tensor([1.8, 2.4])])
    assert torch.equal(small["delta"]["w"], torch.tensor([0.6, 0.8])) and float(small[BIT_KEY]["bit"]) == 1.0
    assert norm(large["delta"]) == pytest.approx(2.0, rel=1e-6) and float(large[BIT_KEY]["bit"]) == 0.0


@pytest.mark.parametrize("start", [100.0, 0.1])
def test_without_noise_the_clip_settles_at_the_target_quantile_of_the_update_norms(start):
    """Ten clients of update norms 1, ..., 10, all sampled (q = 1): 30% of them are unclipped exactly for C in
    [3, 4), and the geometric steps near there (factors exp(+-0.2 * 0.1)) are too small to jump over it."""
    params = DPFedAvgParams(clip=start, noise_multiplier=0.0, adaptive_clip=True, target_quantile=0.3,
                            quantile_noise=0.0)
    client = ClippedClient(params, LocalSGD(LocalTrainingParams(lr=0.1)))
    server = NoisyServer(params, FedAvgServer(ServerParams()), Population(np.full(10, 50), 1.0))
    deltas = [torch.tensor([0.6, 0.8]) * k for k in range(1, 11)]
    state, clips = server.init({"w": torch.zeros(2)}), []
    for t in range(150):
        state = {**state, "params": {"w": torch.zeros(2)}}  # the same updates every round
        messages = client_messages(client, server.broadcast(state), deltas)
        state = server.update(state, aggregate_of(messages, 10, t))
        clips.append(float(state[CLIP_KEY]))
    assert all(3.0 <= c < 4.0 for c in clips[-30:])
    assert all(math.isclose(b / a, math.exp(-0.2 * (1 - 0.3)) if start > 4 else math.exp(0.2 * 0.3))
               for a, b in itertools.pairwise(clips[:10]))


def test_in_a_run_a_too_large_clip_shrinks_and_a_too_small_one_grows_round_over_round(adaptive, monkeypatch):
    clips = record_clips(monkeypatch)
    for start in (100.0, 1e-4):
        fedsim.run({**adaptive, "rounds": 4, "privacy": {**adaptive["privacy"], "clip": start}}, write=False)
    shrinking, growing = [100.0, *clips[:4]], [1e-4, *clips[4:]]
    assert all(b < a for a, b in itertools.pairwise(shrinking)) and shrinking[-1] < 100.0 * math.exp(-0.2 * 0.5 * 2)
    assert all(b > a for a, b in itertools.pairwise(growing)) and growing[-1] > 1e-4 * math.exp(0.2 * 0.5 * 2)


@pytest.mark.parametrize(("z", "sigma_b"), [(0.8, 1.0), (1.1, 5.0), (0.3, 0.4)])
def test_the_update_and_count_noise_multipliers_compose_to_z(z, sigma_b):
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2, rel=1e-12) and z_delta > z
    params = DPFedAvgParams(clip=S, noise_multiplier=z, adaptive_clip=True, quantile_noise=sigma_b)
    server = NoisyServer(params, FedAvgServer(ServerParams()), Population(np.full(10, 50), 0.4))
    state = server.init({"w": torch.zeros(4000)})
    zeros = {"delta": {"w": torch.zeros(4000)}, BIT_KEY: {"bit": torch.tensor(1.0)}}
    moved = server.update(state, aggregate_of([zeros] * 3, 10, 5))["params"]["w"]
    assert abs(float(moved.std()) / (z_delta * S / (0.4 * 10)) - 1) < 0.05


def test_the_default_count_noise_is_the_expected_clients_per_round_over_20():
    params = DPFedAvgParams(noise_multiplier=1.0, adaptive_clip=True)
    assert NoisyServer(params, FedAvgServer(ServerParams()), Population(np.full(100, 50), 0.4)).quantile_noise == 2.0


def test_an_adaptive_run_spends_the_non_adaptive_epsilon_and_its_empty_rounds_move_the_clip(private, monkeypatch):
    spec = {**private, "clients_per_round": 1, "rounds": 6}  # q = 0.1: seed 0 draws empty rounds
    fixed = fedsim.run(spec, write=False).metrics.rows
    clips = record_clips(monkeypatch)
    rows = fedsim.run({**spec, "privacy": {**spec["privacy"], "adaptive_clip": True, "quantile_noise": 1.0}},
                      write=False).metrics.rows
    assert [r["epsilon_rdp"] for r in rows] == [r["epsilon_rdp"] for r in fixed]
    updates = [b["client_updates"] - a["client_updates"] for a, b in itertools.pairwise(rows)]
    empty = updates.index(0)
    before = clips[empty - 1] if empty else S
    assert clips[empty] != before and math.isfinite(clips[empty])


def test_a_resumed_adaptive_run_restores_the_clip_from_its_checkpoint(adaptive, tmp_path, monkeypatch):
    spec = {**adaptive, "rounds": 4, "checkpoint": {"every": 1}, "output": {"plot": False},
            "privacy": {**adaptive["privacy"], "clip": 100.0}}
    whole = fedsim.run(spec, out=tmp_path / "whole")
    clips = record_clips(monkeypatch)
    after_event, fired = run_state.Checkpointing.after_event, itertools.count()

    def interrupt_after_two_rounds(self, clock):
        if self.state.protocol.server_steps == 2 and next(fired) == 0:
            self.signals.received = signal.SIGINT
        after_event(self, clock)

    monkeypatch.setattr(run_state.Checkpointing, "after_event", interrupt_after_two_rounds)
    with pytest.raises(RunInterrupted):
        fedsim.run(spec, out=tmp_path / "run")
    directory = next(p for d in (tmp_path / "run").rglob("checkpoints") for p in completed(d.parent))
    saved = read_rank(directory, read_manifest(directory), 0)["protocol"]["server"][CLIP_KEY]
    assert float(saved) == clips[1] < 100.0
    fedsim.resume(tmp_path / "run")

    def rows(path):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
                for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "run") == rows(whole.out_dir)
