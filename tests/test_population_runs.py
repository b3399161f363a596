"""Generated populations in whole runs: a million clients with memory bounded by the clients in flight, the
same numbers under both runtimes, and client state spilled to disk under a memory budget."""

from __future__ import annotations

import math
import tracemalloc

import pytest

import fedsim
from fedsim.errors import ScenarioError


def population(num_clients: int, per_round: int, runtime: dict) -> dict:
    return {"name": "pop", "seed": 0, "rounds": 2, "num_clients": num_clients, "clients_per_round": per_round,
            "data": {"name": "synthetic_population"}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 10},
            "evaluation": {"clients": 200}, "runtime": runtime}


def test_million_client_population_runs_in_memory_bounded_by_the_clients_in_flight():
    tracemalloc.start()
    result = fedsim.run(population(1_000_000, 1000, {"name": "vectorized"}), write=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [r["round"] for r in result.metrics.rows] == [0, 1, 2]
    assert result.metrics.last()["loss"] < result.metrics.rows[0]["loss"]
    # Materialised, the population would hold about 10 GB of features; sizes alone are 16 MB.
    assert peak < 300 * 2**20


def test_population_gives_the_same_numbers_under_both_runtimes():
    a = fedsim.run(population(500, 50, {"name": "sequential"}), write=False)
    b = fedsim.run(population(500, 50, {"name": "vectorized", "chunk_size": 16}), write=False)
    for ra, rb in zip(a.metrics.rows, b.metrics.rows, strict=True):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-6)


def test_population_cannot_be_repartitioned():
    with pytest.raises(ScenarioError, match=r"^partition.name: 'synthetic_population' generates"):
        fedsim.run({**population(100, 10, {"name": "sequential"}), "partition": {"name": "iid"}}, write=False)


def test_client_state_spills_to_disk_under_a_memory_budget(carry_rule, monkeypatch, tmp_path):
    stores = {}
    original = fedsim.simulation.build_simulation

    def keep(scenario, data=None):
        sim = original(scenario, data)
        stores[scenario.components["runtime"].params.state_memory] = sim.runtime.ctx.states
        return sim

    monkeypatch.setattr(fedsim.api, "build_simulation", keep)
    base = {**population(300, 60, {"name": "vectorized"}), "rounds": 4,
            "algorithm": {"name": "carry", "lr": 0.05, "batch_size": 10}}
    in_memory = fedsim.run(base, write=False)
    spilled = fedsim.run({**base, "runtime": {"name": "vectorized", "state_memory": "8kB",
                                              "spill_dir": str(tmp_path)}}, write=False)
    assert [r["loss"] for r in in_memory.metrics.rows] == [r["loss"] for r in spilled.metrics.rows]
    store = stores[8000]
    assert store.spilled > 0 and store.memory_bytes <= 8000
    assert len(store) == len(stores[None]) > 60
