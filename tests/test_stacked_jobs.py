"""Stacked jobs: starts handed to `run_jobs` as one pytree with a leading job axis, and results taken back stacked,
give exactly the numbers of per-job starts and results, as do jobs held as columns; the batched minibatch draws are
torch's own; a gossip round's bookkeeping (commits, seconds, divergence) takes no step per node."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import fedsim
import fedsim.runtime.context as context
from fedsim.errors import DivergenceError
from fedsim.params import tree_leaves, tree_map
from fedsim.protocol import ProtocolBase
from fedsim.runtime import Job, JobResult, Jobs, Stacked, StackedResults, run_stacked
from fedsim.runtime.context import leading_positions, padded_schedule, padded_schedules
from fedsim.runtime.local import job_keys
from fedsim.runtime.mpi import MPIRuntime
from fedsim.runtime.vectorized import VectorizedRuntime
from fedsim.scenario import load_scenarios
from fedsim.seeding import Stream, derive_seed
from fedsim.simulation import build_simulation
from fedsim.systems import LogNormalParams, lognormal

STEPS = [1, 3, 0, 2, 5, 1, 1, 4, 2, 3, 1, 6]
"""Step counts of the jobs: clients leave a vectorized chunk at different steps and the last few finish alone."""


def simulation(algorithm: str, runtime: dict[str, Any]) -> Any:
    """A digits + logreg simulation of 12 clients (its runtime and rule), as `fedsim.run` builds it."""
    mapping = {"name": "stacked", "seed": 3, "rounds": 1, "num_clients": 12, "clients_per_round": 12,
               "data": {"name": "digits"},
               "model": {"name": "logreg"}, "algorithm": {"name": algorithm, "lr": 0.05, "batch_size": 16},
               "runtime": runtime} | ({"server": {"name": "scaffold"}} if algorithm == "scaffold" else {})
    [resolved], _ = load_scenarios(mapping)
    return build_simulation(resolved)


def job_starts(sim: Any, n: int) -> list[dict[str, Any]]:
    """A different start per job (the model moved by a keyed draw), with the server's control where it has one."""
    g = torch.Generator().manual_seed(0)
    starts = []
    for _ in range(n):
        params = tree_map(lambda v: v + 0.1 * torch.randn(v.shape, generator=g), sim.model.init_params)
        starts.append({"params": params, **({"control": tree_map(torch.zeros_like, params)}
                                            if sim.scenario.components["server"].name == "scaffold" else {})})
    return starts


def assert_same_results(got: list[JobResult], want: list[JobResult]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.job, a.num_samples, a.work, a.message_bytes) == (b.job, b.num_samples, b.work, b.message_bytes)
        for x, y in ((a.message, b.message), (a.client_state, b.client_state), (a.codec_state, b.codec_state)):
            assert (x is None) == (y is None)
            if x is not None:
                assert all(torch.equal(u, v) for u, v in zip(tree_leaves(x), tree_leaves(y), strict=True))


@pytest.mark.parametrize("runtime", [{"name": "sequential"}, {"name": "vectorized"},
                                     {"name": "vectorized", "chunk_size": 5, "devices": ["cpu", "cpu"]}],
                         ids=["sequential", "vectorized", "chunked-on-two-workers"])
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_stacked_starts_give_exactly_the_results_of_per_job_starts(runtime, algorithm):
    sim = simulation(algorithm, runtime)
    if algorithm == "scaffold":  # clients with a stored control variate, others starting from the initial one
        sim.states.put(1, tree_map(lambda v: torch.full_like(v, 0.01), sim.model.init_params))
    jobs = [Job(7, client, steps, version=2) for client, steps in enumerate(STEPS)]
    starts = job_starts(sim, len(jobs))
    stacked = Stacked(tree_map(lambda *leaves: torch.stack(leaves), *starts))
    want = sim.runtime.run_jobs(jobs, starts)
    assert isinstance(want, list)
    back = sim.runtime.run_jobs(jobs, stacked)
    assert isinstance(back, StackedResults) and StackedResults.of(back) is back  # made stacked, not stacked after
    assert back.has_states == (algorithm == "scaffold")
    assert_same_results(list(back), want)
    for leaf, *per_job in zip(tree_leaves(back.messages), *(tree_leaves(r.message) for r in want), strict=True):
        assert torch.equal(leaf, torch.stack(per_job))
    assert back.work == [r.work for r in want] and [j.client for j in back.jobs] == list(range(len(STEPS)))


def test_a_runtime_that_answers_stacked_starts_with_a_list_has_it_stacked_leaving_out_results_held_elsewhere():
    sim = simulation("fedavg", {"name": "sequential"})
    jobs = [Job(0, client, 2) for client in range(4)]
    results = sim.runtime.run_jobs(jobs, job_starts(sim, 4))
    remote = JobResult(Job(0, 9, 2), None, 5, 10, 100)

    class ListOnly:
        def run_jobs(self, jobs: list[Job], starts: Any) -> list[JobResult]:
            return [*results[:2], remote, *results[2:]]

    back = run_stacked(ListOnly(), jobs, Stacked({"x": torch.zeros(4)}))
    assert [j.client for j in back.jobs] == [0, 1, 2, 3] and not back.has_states
    for leaf, *per_job in zip(tree_leaves(back.messages), *(tree_leaves(r.message) for r in results), strict=True):
        assert torch.equal(leaf, torch.stack(per_job))


def test_stacked_rows_are_views_or_copies_and_take_copies_only_scattered_rows():
    tree = {"a": torch.arange(12.0).reshape(6, 2), "b": {"c": torch.arange(6)}}
    rows = Stacked(tree)
    assert len(rows) == 6 and rows[2]["a"].data_ptr() == tree["a"][2].data_ptr()
    assert torch.equal(rows[-1]["b"]["c"], torch.tensor(5))
    copied = Stacked(tree, copies=True)[2]["a"]
    assert torch.equal(copied, tree["a"][2]) and copied.data_ptr() != tree["a"][2].data_ptr()
    assert rows.take(range(6)) is rows
    assert rows.take([2, 3, 4]).tree["a"].data_ptr() == tree["a"][2].data_ptr()
    assert torch.equal(rows.take([4, 0]).tree["b"]["c"], torch.tensor([4, 0]))
    with pytest.raises(IndexError):
        rows[6]
    with pytest.raises(ValueError, match="leading job axis"):
        Stacked({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_dsgd_hands_the_runtime_its_node_rows_whole_and_gets_stacked_results(monkeypatch):
    seen: list[Any] = []
    original = VectorizedRuntime._run_chunk

    def spy(self, slot, jobs, states, starts):
        seen.append(starts)
        out = original(self, slot, jobs, states, starts)
        assert isinstance(out, StackedResults)
        return out

    monkeypatch.setattr(VectorizedRuntime, "_run_chunk", spy)
    fedsim.run({"name": "g", "seed": 0, "rounds": 2, "num_clients": 6, "data": {"name": "digits"},
                "model": {"name": "logreg"}, "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20},
                "protocol": {"name": "dsgd", "local_steps": 2}, "topology": {"name": "ring"},
                "runtime": {"name": "vectorized"}}, write=False)
    assert len(seen) == 2 and all(isinstance(s, Stacked) and len(s) == 6 for s in seen)


def test_mpi_passes_its_rank_its_share_of_stacked_starts():
    jobs = [Job(0, client, 1) for client in range(5)]
    stacked = Stacked({"x": torch.arange(5.0)})
    handed: list[Any] = []

    class Inner:
        threads = 1

        def run_jobs(self, mine: list[Job], starts: Any) -> list[JobResult]:
            handed.append(starts)
            return [JobResult(j, {"x": s["x"]}, 1, 1, 4) for j, s in zip(mine, starts, strict=True)]

    class Rank1Of2:
        def Get_size(self) -> int:  # noqa: N802 (mpi4py's names)
            return 2

        def Get_rank(self) -> int:  # noqa: N802
            return 1

        def allgather(self, mine: list[Any]) -> list[list[Any]]:
            return [[(i, 1, 1, 4) for i in (0, 2, 4)], mine]

    results = MPIRuntime(Inner(), Rank1Of2()).run_jobs(jobs, stacked)
    assert isinstance(handed[0], Stacked) and torch.equal(handed[0].tree["x"], torch.tensor([1.0, 3.0]))
    assert [r.here for r in results] == [False, True, False, True, False]
    assert float(results[3].message["x"]) == 3.0


def test_batched_minibatch_draws_equal_each_jobs_own_generator(monkeypatch):
    assert context.draws_like_torch()
    calls = []
    monkeypatch.setattr(context, "leading_positions", lambda *a: calls.append(len(a[0])) or leading_positions(*a))
    rng = np.random.default_rng(1)
    n = 400
    sizes = np.concatenate([rng.integers(1, 40, n // 4), rng.integers(40, 5000, n - n // 4)])
    steps = rng.integers(1, 4, n)
    steps[:5] = [0, 9, 1, 2, 40]  # no step, several epochs, and more positions than a batched draw takes
    jobs = [Job(int(i) % 7, int(c), int(s)) for i, (c, s) in enumerate(zip(rng.integers(0, 2**32, n), steps,
                                                                          strict=True))]
    for batch in (10, 16):
        got = padded_schedules(5, jobs, sizes.tolist(), batch)
        generators = [torch.Generator().manual_seed(derive_seed(5, Stream.LOCAL, j.id, j.client)) for j in jobs]
        own = [padded_schedule(int(size), batch, j.steps, g) for j, size, g in zip(jobs, sizes, generators,
                                                                                   strict=True)]
        assert got.shape == (max(steps), n, batch)
        for k, rows in enumerate(own):
            assert torch.equal(got[: len(rows), k], rows) and bool((got[len(rows) :, k] == -1).all())
    assert len(calls) == 2 and min(calls) > 300  # the jobs that need a few positions of one permutation


def test_leading_positions_are_the_first_entries_of_torch_randperm():
    rng = np.random.default_rng(2)
    seeds = rng.integers(0, 2**63 - 1, 300, dtype=np.int64)
    sizes = np.concatenate([[1, 2, 3], rng.integers(1, 64, 147), rng.integers(64, 10**6, 150)])
    count = np.minimum(rng.integers(1, 65, 300), sizes)
    got = leading_positions(seeds & 0xFFFFFFFF, sizes, count, int(count.max()))
    for row, seed, size, k in zip(got, seeds, sizes, count, strict=True):
        want = torch.randperm(int(size), generator=torch.Generator().manual_seed(int(seed)))[:k].numpy()
        assert np.array_equal(row[:k], want) and bool((row[k:] == -1).all())


def test_job_keys_are_the_two_words_of_each_jobs_derived_seed():
    jobs = [Job(0, 3, 1), Job(2**31, 8, 1), Job(5, 2**32 - 1, 1)]
    for stream in (Stream.ORACLE, Stream.CODEC):
        seeds = [derive_seed(9, stream, j.id, j.client) for j in jobs]
        assert torch.equal(job_keys(9, jobs, stream), torch.tensor([[s & 0xFFFFFFFF, s >> 32] for s in seeds]))
    assert job_keys(9, []).shape == (0, 2)


def test_a_stateless_uplink_looks_up_no_senders_codec_state(monkeypatch):
    sim = simulation("fedavg", {"name": "vectorized"})
    looked_up = []
    monkeypatch.setattr(sim.runtime.ctx.codec_states, "get", lambda client: looked_up.append(client))
    jobs = [Job(0, client, 1) for client in range(12)]
    results = sim.runtime.run_jobs(jobs, job_starts(sim, 1)[0])
    assert len(results) == 12 and looked_up == [] and all(r.codec_state is None for r in results)


@pytest.mark.parametrize("runtime", [{"name": "sequential"}, {"name": "vectorized"},
                                     {"name": "vectorized", "chunk_size": 5, "devices": ["cpu", "cpu"]}],
                         ids=["sequential", "vectorized", "chunked-on-two-workers"])
def test_jobs_held_as_columns_give_exactly_the_results_of_job_objects(runtime):
    sim = simulation("scaffold", runtime)
    jobs = [Job(7, client, steps, version=2) for client, steps in enumerate(STEPS)]
    columns = Jobs(7, np.arange(len(STEPS)), STEPS, 2)
    assert list(columns) == jobs and columns[-1] == jobs[-1] and list(columns[2:5]) == jobs[2:5]
    assert Jobs.of(columns) is columns and Jobs.of(jobs).steps.tolist() == STEPS
    starts = Stacked(tree_map(lambda *leaves: torch.stack(leaves), *job_starts(sim, len(jobs))))
    assert_same_results(list(sim.runtime.run_jobs(columns, starts)), list(sim.runtime.run_jobs(jobs, starts)))


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_stacked_results_are_committed_per_job_only_where_a_state_is_kept_or_stored(algorithm):
    sim = simulation(algorithm, {"name": "vectorized"})
    results = run_stacked(sim.runtime, Jobs(0, np.arange(len(STEPS)), STEPS),
                          Stacked(tree_map(lambda *leaves: torch.stack(leaves), *job_starts(sim, len(STEPS)))))
    committed: list[int] = []
    protocol = SimpleNamespace(sim=sim, tracks_uploads=False)
    protocol.commit = lambda result: committed.append(result.client) or ProtocolBase.commit(protocol, result)
    ProtocolBase.commit_all(protocol, results)
    assert committed == ([] if algorithm == "fedavg" else list(range(len(STEPS))))
    assert len(sim.states) == (0 if algorithm == "fedavg" else len(STEPS))
    if algorithm == "fedavg":  # a state stored earlier is cleared by its client's stateless result
        sim.states.put(3, {"x": torch.zeros(1)})
        ProtocolBase.commit_all(protocol, results)
        assert committed == list(range(len(STEPS))) and sim.states.get(3) is None


@pytest.mark.parametrize("compute", ["constant", "exponential"])
def test_many_jobs_seconds_at_once_are_exactly_each_jobs_own(compute):
    systems = lognormal(LogNormalParams(compute=compute), 40, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    jobs, clients = rng.integers(0, 9, 40), rng.permutation(40)
    work, down, up = rng.integers(0, 10**6, 40), rng.integers(0, 10**7, 40), 123457
    want = [systems.job_seconds(int(j), int(c), int(w), int(d), up)
            for j, c, w, d in zip(jobs, clients, work, down, strict=True)]
    assert systems.jobs_seconds(jobs, clients, work, down, up).tolist() == want
    assert systems.jobs_seconds(5, clients, 100, 0, up).tolist() == [systems.job_seconds(5, int(c), 100, 0, up)
                                                                     for c in clients]


def test_a_gossip_round_whose_nodes_go_non_finite_stops_the_run_in_that_round_between_rows():
    """Rounds check that the nodes' models are finite (the average is taken only for rows, here every 5 rounds): a
    run whose models overflow in round 1 stops there."""
    with pytest.raises(DivergenceError, match=r"^variant wild, round 1: the network-average model has NaN/inf"):
        fedsim.run({"name": "wild", "seed": 0, "rounds": 6, "num_clients": 12, "data": {"name": "digits"},
                    "model": {"name": "logreg"}, "algorithm": {"name": "fedavg", "lr": 3e37, "batch_size": 8,
                                                               "local_steps": 3},
                    "protocol": {"name": "dsgd"}, "topology": {"name": "ring"}, "runtime": {"name": "vectorized"},
                    "evaluation": {"every": 5}}, write=False)
