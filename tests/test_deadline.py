"""The deadline straggler model of synchronous rounds: stragglers are the clients too slow for the round's deadline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedsim
from fedsim.errors import ScenarioError
from fedsim.recording import OUTCOMES
from fedsim.runtime.sequential import SequentialRuntime
from fedsim.sampling import full_steps, plan_round, samples_processed, steps_by_deadline
from fedsim.servers.synchronous import SynchronousRounds
from fedsim.systems import JobPhases

SLOW, FAST = 0.1, 1.0
DEADLINE = 1.0
"""Fast clients finish their two epochs in about 0.43 s, slow ones (a tenth of the speed) in about 3.3 s."""


def scenario(algorithm: str = "fedprox", **changes: Any) -> dict[str, Any]:
    algo = {"name": algorithm, "lr": 0.05, "batch_size": 20, "local_epochs": 2, **({"mu": 0.1} if algorithm ==
                                                                                    "fedprox" else {})}
    return {"name": "deadline", "seed": 0, "rounds": 4, "num_clients": 10, "clients_per_round": 6,
            "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
            "algorithm": algo, "runtime": {"name": "sequential"},
            "systems": {"name": "tiers", "multipliers": [FAST, SLOW], "fractions": [0.5, 0.5]},
            "stragglers": {"deadline": DEADLINE}, **changes}


def numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


@pytest.fixture
def spied(monkeypatch) -> dict[str, Any]:
    """What a run did: the protocol, and per round the jobs run (client -> steps) and the upload bytes."""
    seen: dict[str, Any] = {"jobs": {}, "protocol": None, "bytes_up": None}
    run_jobs, start = SequentialRuntime.run_jobs, SynchronousRounds.start

    def spy_jobs(self, jobs, starts):
        results = run_jobs(self, jobs, starts)
        for job in jobs:
            seen["jobs"].setdefault(job.id, {})[job.client] = job.steps
        seen["bytes_up"] = seen["bytes_up"] or (results[0].message_bytes + 8 if results else None)
        return results

    def spy_start(self, clock):
        seen["protocol"] = self
        return start(self, clock)

    monkeypatch.setattr(SequentialRuntime, "run_jobs", spy_jobs)
    monkeypatch.setattr(SynchronousRounds, "start", spy_start)
    return seen


def expected_round(protocol: SynchronousRounds, t: int, up: int, deadline: float) -> dict[int, tuple[int, int]]:
    """Per sampled client of round t: its full steps and the most steps that fit, by the formula
    download + work(s) / work(full) * compute + upload <= deadline (work(s) = samples processed * step cost)."""
    sim, spec = protocol.sim, protocol.spec
    hp, sizes = sim.rule.hp, sim.data.train_sizes
    down = sim.downlink.payload_bytes(sim.server.broadcast(protocol.state))
    out = {}
    for client in plan_round(spec.seed, t, sizes, spec.clients_per_round, 0.0, hp.local_epochs,
                             hp.batch_size).clients.tolist():
        n = int(sizes[client])
        full = int(full_steps(np.array([n]), hp.local_epochs, hp.batch_size, None)[0])

        def work(s: int) -> int:
            return int(samples_processed(np.int64(s), np.int64(n), hp.batch_size)) * sim.rule.step_cost  # noqa: B023

        phases = sim.systems.job_phases(t, client, work(full), down, up)
        fits = [s for s in range(full + 1)
                if phases.download + work(s) / work(full) * phases.compute + phases.upload <= deadline]
        out[client] = (full, max(fits, default=0))
    return out


def full_job(protocol: SynchronousRounds, client: int) -> int:
    hp = protocol.sim.rule.hp
    return int(full_steps(protocol.sim.data.train_sizes[[client]], hp.local_epochs, hp.batch_size, None)[0])


def timeline(protocol: SynchronousRounds) -> dict[str, np.ndarray]:
    return protocol.recorder.timeline.arrays()


def test_a_deadline_longer_than_every_job_changes_nothing():
    for algorithm in ("fedprox", "fedavg"):
        plain = fedsim.run(scenario(algorithm, stragglers={}), write=False).metrics.rows
        late = fedsim.run(scenario(algorithm, stragglers={"deadline": 1e6}), write=False).metrics.rows
        assert numbers(late) == numbers(plain)


@pytest.mark.parametrize("algorithm", ["fedprox", "fedavg"])
def test_exactly_the_clients_whose_full_job_outlasts_the_deadline_run_the_steps_that_fit(spied, algorithm):
    compute = {"compute": "lognormal", "compute_spread": 0.5}
    fedsim.run(scenario(algorithm, systems={**scenario()["systems"], **compute}), write=False)
    protocol, stragglers, partial = spied["protocol"], 0, 0
    for t in range(4):
        expected = expected_round(protocol, t, spied["bytes_up"], DEADLINE)
        ran = spied["jobs"][t]
        for client, (full, fit) in expected.items():
            if fit == full:
                assert ran[client] == full
            elif algorithm == "fedprox" and fit > 0:
                assert ran[client] == fit
                partial += 1
            else:
                assert client not in ran
            stragglers += fit < full
    assert partial > 0 if algorithm == "fedprox" else stragglers > 0
    dropped = timeline(protocol)["outcome"] == OUTCOMES.index("dropped")
    assert dropped.sum() == (stragglers - partial)


def test_fedprox_keeps_partial_work_and_each_round_ends_by_the_deadline(spied):
    rows = fedsim.run(scenario("fedprox"), write=False).metrics.rows
    protocol = spied["protocol"]
    log = timeline(protocol)
    assert (log["outcome"] == OUTCOMES.index("used")).all() and len(log["job"]) == 4 * 6
    assert rows[-1]["client_updates"] == 4 * 6
    assert (log["end"] - log["start"] <= DEADLINE + 1e-9).all()  # the log sums the phases from the start
    for t in range(4):
        mine = log["job"] == t
        start, end = log["start"][mine][0], log["server_steps"][t]
        assert end == pytest.approx(log["end"][mine].max()) and end - start <= DEADLINE
    assert np.diff([row["sim_time"] for row in rows]).max() <= DEADLINE
    partial = [(s, full_job(protocol, c)) for jobs in spied["jobs"].values() for c, s in jobs.items()]
    assert any(0 < s < full for s, full in partial)


def test_fedavg_drops_the_clients_the_deadline_cuts_and_logs_them_at_the_deadline(spied):
    rows = fedsim.run(scenario("fedavg"), write=False).metrics.rows
    protocol = spied["protocol"]
    log = timeline(protocol)
    dropped = log["outcome"] == OUTCOMES.index("dropped")
    used = log["outcome"] == OUTCOMES.index("used")
    assert dropped.any() and used.any()
    np.testing.assert_allclose(log["end"][dropped] - log["start"][dropped], DEADLINE)
    assert rows[-1]["client_updates"] == used.sum() == sum(len(jobs) for jobs in spied["jobs"].values())
    assert rows[-1]["bytes_up"] == used.sum() * spied["bytes_up"]
    assert all(s == full_job(protocol, c) for jobs in spied["jobs"].values() for c, s in jobs.items())


def test_the_slow_clients_are_the_stragglers_and_the_fast_ones_never(spied):
    fedsim.run(scenario("fedprox", rounds=6), write=False)
    protocol = spied["protocol"]
    speed = protocol.sim.systems.speed
    slow = speed < speed.max()
    late = [(c, s < full_job(protocol, c)) for jobs in spied["jobs"].values() for c, s in jobs.items()]
    assert all(is_late == slow[c] for c, is_late in late) and any(is_late for _, is_late in late)
    # The FedProx paper's fraction draws stragglers whatever their speed: fast clients straggle too.
    spied["jobs"].clear()
    fedsim.run(scenario("fedprox", rounds=6, stragglers={"fraction": 0.5}), write=False)
    late = [(c, s < full_job(protocol, c)) for jobs in spied["jobs"].values() for c, s in jobs.items()]
    assert any(is_late and not slow[c] for c, is_late in late)


def test_a_round_nobody_can_serve_takes_no_server_step_and_lasts_the_deadline():
    for algorithm in ("fedprox", "fedavg"):
        rows = fedsim.run(scenario(algorithm, stragglers={"deadline": 0.01}), write=False).metrics.rows
        assert [row["client_updates"] for row in rows] == [0] * 5
        assert len({row["loss"] for row in rows}) == 1
        assert [row["sim_time"] for row in rows] == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])


@pytest.mark.parametrize("algorithm", ["fedprox", "fedavg"])
def test_vectorized_equals_sequential_under_a_deadline(algorithm):
    rows = {name: numbers(fedsim.run(scenario(algorithm, runtime={"name": name}), write=False).metrics.rows)
            for name in ("sequential", "vectorized")}
    for seq, vec in zip(rows["sequential"], rows["vectorized"], strict=True):
        assert vec.keys() == seq.keys()
        for key, value in seq.items():
            assert vec[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


def test_steps_by_deadline_is_the_largest_step_count_that_fits():
    phases = JobPhases(0.5, 4.0, 0.25)
    n, batch, cost, full = 95, 10, 3, 20  # epochs of 10 steps, the last one short
    work = [samples_processed(np.int64(s), np.int64(n), batch) * cost for s in range(full + 1)]
    for deadline in np.linspace(0.5, 5.0, 91):
        steps, cut = steps_by_deadline(phases, float(deadline), full, n, batch, cost)
        fits = [s for s in range(full + 1) if 0.5 + work[s] / work[full] * 4.0 + 0.25 <= deadline]
        assert steps == max(fits, default=0)
        assert cut.total <= deadline or steps == 0
        assert cut.compute == pytest.approx(work[steps] / work[full] * 4.0)


@pytest.mark.parametrize(("stragglers", "protocol", "message"), [
    ({"deadline": 0}, None, "stragglers.deadline"),
    ({"deadline": -3.0}, None, "stragglers.deadline"),
    ({"deadline": "soon"}, None, "stragglers.deadline"),
    ({"deadline": 1.0, "fraction": 0.5}, None, "stragglers.fraction, stragglers.deadline"),
    ({"deadline": 1.0}, {"name": "fedasync"}, "stragglers.deadline: protocol 'fedasync'"),
])
def test_bad_deadlines_name_the_field(stragglers, protocol, message):
    changes = {"stragglers": stragglers, **({"protocol": protocol} if protocol else {})}
    with pytest.raises(ScenarioError, match=f"^{message}"):
        fedsim.run(scenario(**changes), write=False)
