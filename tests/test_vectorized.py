"""The vectorized runtime gives the sequential runtime's numbers, for every algorithm, with masking and chunks."""

from __future__ import annotations

import math

import pytest
import torch
from rulekit import client_server_algorithms, rule_params

import fedsim
from fedsim.clients import ALGORITHMS, LocalTrainingParams
from fedsim.clients.fedavg import LocalSGD
from fedsim.errors import ScenarioError
from fedsim.params import tree_leaves
from fedsim.registry import Entry
from fedsim.runtime.context import local_batches, padded_schedule
from fedsim.scenario import load_scenarios
from fedsim.simulation import build_simulation
from fedsim.sizes import parse_bytes

HETEROGENEOUS = {
    "partition": {"name": "quantity", "sigma": 1.0},
    "stragglers": {"fraction": 0.5},
    "model": {"name": "mlp", "hidden": [16]},
}


def scenario(tiny, algorithm: str, runtime: dict) -> dict:
    hp = rule_params(algorithm, {"lr": 0.05, "batch_size": 7, "local_epochs": 2})
    return {**tiny, **HETEROGENEOUS, "algorithm": {"name": algorithm, **hp}, "runtime": runtime}


def assert_same_metrics(a, b, rel: float = 1e-6) -> None:
    assert len(a.metrics) == len(b.metrics)
    for ra, rb in zip(a.metrics.rows, b.metrics.rows, strict=True):
        for key in ("loss", "test_loss", "accuracy", "sim_time", "bytes_up", "bytes_down"):
            assert math.isclose(ra[key], rb[key], rel_tol=rel, abs_tol=1e-9), (key, ra, rb)


@pytest.mark.parametrize("min_batch", [1, 3, 8], ids=["always-vmapped", "last-few-unbatched", "all-unbatched"])
@pytest.mark.parametrize("algorithm", client_server_algorithms())
def test_every_algorithm_gives_the_sequential_numbers(tiny, algorithm, min_batch):
    sequential = fedsim.run(scenario(tiny, algorithm, {"name": "sequential"}), write=False)
    runtime = {"name": "vectorized", "chunk_size": 4, "min_batch": min_batch}
    vectorized = fedsim.run(scenario(tiny, algorithm, runtime), write=False)
    # Heavy-ball momentum (sgdm, default 0.9) carries each step's rounding into every later step: about 10x the
    # others' drift over 2 local epochs (2.5e-6 measured), still float rounding.
    assert_same_metrics(sequential, vectorized, rel=1e-5 if algorithm == "sgdm" else 1e-6)


def test_compiled_steps_give_the_sequential_numbers(tiny):
    # 9 clients a round in chunks of 5: the chunk of 4 runs padded to the compiled size 5.
    small = {"model": {"name": "logreg"}, "rounds": 2, "clients_per_round": 9}
    sequential = fedsim.run({**scenario(tiny, "fedprox", {"name": "sequential"}), **small}, write=False)
    runtime = {"name": "vectorized", "chunk_size": 5, "compile": True}
    compiled = fedsim.run({**scenario(tiny, "fedprox", runtime), **small}, write=False)
    assert_same_metrics(sequential, compiled)


def test_compiled_chunks_reuse_a_compiled_size_at_most_a_quarter_larger(tiny):
    resolved, _ = load_scenarios({**tiny, "runtime": {"name": "vectorized", "compile": True}})
    runtime = build_simulation(resolved[0]).runtime
    sizes = [runtime._compiled_size(0, n) for n in (100, 90, 80, 79, 50, 60, 100, 64)]
    assert sizes == [100, 100, 100, 79, 50, 60, 100, 79]


def test_a_resumed_runtime_pads_chunks_to_the_sizes_it_had_compiled(tiny):
    resolved, _ = load_scenarios({**tiny, "runtime": {"name": "vectorized", "compile": True}})
    runtime = build_simulation(resolved[0]).runtime
    runtime._compiled_size(0, 100)
    restored = build_simulation(resolved[0]).runtime
    restored.load_state_dict(runtime.state_dict())
    assert restored._compiled_size(0, 90) == 100  # a fresh runtime would compile 90


def test_compile_without_a_cpp_compiler_is_a_clear_error(tiny, monkeypatch):
    monkeypatch.setattr(fedsim.runtime.vectorized.shutil, "which", lambda name: None)
    with pytest.raises(ScenarioError, match=r"^runtime.compile: torch.compile needs a C\+\+ compiler"):
        fedsim.run({**tiny, "runtime": {"name": "vectorized", "compile": True}}, write=False)


@pytest.mark.parametrize("min_batch", [1, 3])
def test_clients_below_min_batch_finish_unbatched(tiny, monkeypatch, min_batch):
    handed_over: list[int] = []
    original = fedsim.runtime.vectorized.VectorizedRuntime._one_by_one

    def spy(self, slot, state, *args):
        handed_over.append(len(next(iter(tree_leaves(state)))))
        return original(self, slot, state, *args)

    monkeypatch.setattr(fedsim.runtime.vectorized.VectorizedRuntime, "_one_by_one", spy)
    fedsim.run(scenario(tiny, "fedprox", {"name": "vectorized", "min_batch": min_batch}), write=False)
    assert all(0 < clients < min_batch for clients in handed_over)
    assert bool(handed_over) == (min_batch > 1)


def test_one_chunk_and_many_chunks_agree(tiny):
    whole = fedsim.run(scenario(tiny, "fedprox", {"name": "vectorized"}), write=False)
    pieces = fedsim.run(scenario(tiny, "fedprox", {"name": "vectorized", "chunk_size": 1}), write=False)
    assert_same_metrics(whole, pieces)


def test_padded_schedule_holds_the_same_minibatches_as_the_loop():
    for n, batch, steps in [(23, 5, 11), (4, 10, 3), (30, 10, 3), (17, 4, 1)]:
        loop = list(local_batches(n, batch, steps, torch.Generator().manual_seed(7)))
        padded = padded_schedule(n, batch, steps, torch.Generator().manual_seed(7))
        assert padded.shape == (steps, batch)
        for row, idx in zip(padded, loop, strict=True):
            assert torch.equal(row[row >= 0], idx)


def test_persistent_client_state_is_the_same_under_both_runtimes(tiny, carry_rule, monkeypatch):
    stores = {}
    original = fedsim.simulation.build_simulation

    def keep(scenario, data=None):
        sim = original(scenario, data)
        stores[scenario.components["runtime"].name] = sim.runtime.ctx.states
        return sim

    monkeypatch.setattr(fedsim.api, "build_simulation", keep)
    results = [fedsim.run({**scenario(tiny, "carry", {"name": r}), "rounds": 6}, write=False)
               for r in ("sequential", "vectorized")]
    assert_same_metrics(*results)
    seq, vec = stores["sequential"], stores["vectorized"]
    assert len(seq) == len(vec) > 4
    for client in range(10):
        if seq.get(client) is not None:
            for k, v in seq.get(client).items():
                torch.testing.assert_close(vec.get(client)[k], v, rtol=1e-4, atol=1e-6)


def test_rule_that_cannot_vectorize_runs_sequentially_with_a_notice(tiny, monkeypatch):
    monkeypatch.setitem(ALGORITHMS._entries, "loopy",
                        Entry("loopy", LocalSGD, LocalTrainingParams,
                              {"stragglers": "drop", "server": "fedavg", "vectorizable": False}))
    result = fedsim.run(scenario(tiny, "loopy", {"name": "vectorized"}), write=False)
    assert result.notices == ["algorithm loopy cannot run vectorized; running it sequentially"]


def test_memory_budget_too_small_for_one_client_is_an_error(tiny):
    with pytest.raises(ScenarioError, match=r"^runtime.memory_budget: 1000 bytes is less than one client needs"):
        fedsim.run(scenario(tiny, "fedavg", {"name": "vectorized", "memory_budget": "1kB"}), write=False)


def test_memory_budget_sets_the_chunk_size(tiny, monkeypatch):
    sizes = []
    original = fedsim.runtime.vectorized.VectorizedRuntime._run_chunk

    def spy(self, slot, jobs, states, params):
        sizes.append(len(jobs))
        return original(self, slot, jobs, states, params)

    monkeypatch.setattr(fedsim.runtime.vectorized.VectorizedRuntime, "_run_chunk", spy)
    fedsim.run({**scenario(tiny, "fedavg", {"name": "vectorized", "memory_budget": "100kB"}), "rounds": 1},
               write=False)
    assert sizes and max(sizes) < 4


@pytest.mark.parametrize(("text", "size"), [("2GiB", 2**31), ("512MB", 512 * 10**6), ("1e3", 1000), (42, 42)])
def test_sizes_parse(text, size):
    assert parse_bytes(text) == size


