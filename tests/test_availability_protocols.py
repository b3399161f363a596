"""Availability and dropouts in the protocols: jobs start only when their client is online, a client that drops
out loses its job (never aggregated, logged as dropped), and every runtime gives the same numbers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from rulekit import assert_runtimes_agree

import fedsim
from fedsim.api import build_all
from fedsim.recording import OUTCOMES
from fedsim.runtime.sequential import SequentialRuntime
from fedsim.scenario import load_scenarios

PROTOCOLS = [{"name": "synchronous"}, {"name": "fedasync"}, {"name": "fedbuff", "buffer_size": 2}]


def scenario(protocol: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """12 digits clients, 4 at a time, online 2 s of every 4 s, 20% of jobs dropping out."""
    base = {"name": "online", "seed": 3, "rounds": 8, "num_clients": 12, "clients_per_round": 4,
            "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20}, "protocol": protocol,
            "systems": {"name": "lognormal", "speed": 400.0, "availability": {"kind": "windows", "online": 2.0,
                                                                             "offline": 2.0}, "dropout": 0.2}}
    return {**base, **changes}


def timeline_of(mapping: dict[str, Any]) -> tuple[dict[str, np.ndarray], Any]:
    result = fedsim.run(mapping, write=False)
    return result.timelines[mapping["name"]], result


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p["name"])
def test_jobs_start_only_when_their_client_is_online_and_dropouts_are_never_aggregated(protocol):
    mapping = scenario(protocol)
    timeline, result = timeline_of(mapping)
    (resolved,), _ = load_scenarios(mapping)
    systems = build_all([resolved])[0].systems
    clients, starts = timeline["client"].astype(int), timeline["start"]
    assert all(systems.available_mask([c], s)[0] for c, s in zip(clients, starts, strict=True))
    outcome = timeline["outcome"].astype(int)
    dropped, used = outcome == OUTCOMES.index("dropped"), outcome == OUTCOMES.index("used")
    assert dropped.sum() > 0 and used.sum() == result.metrics.last()["client_updates"]


@pytest.mark.parametrize("protocol", PROTOCOLS[1:], ids=lambda p: p["name"])
def test_an_asynchronous_job_whose_client_drops_out_is_never_run(monkeypatch, protocol):
    ran: list[int] = []
    run_jobs = SequentialRuntime.run_jobs

    def spy(self, jobs, starts):
        ran.extend(job.id for job in jobs)
        return run_jobs(self, jobs, starts)

    monkeypatch.setattr(SequentialRuntime, "run_jobs", spy)
    timeline, _ = timeline_of(scenario(protocol, runtime={"name": "sequential"}))
    dropped = timeline["job"][timeline["outcome"].astype(int) == OUTCOMES.index("dropped")].astype(int)
    assert len(dropped) > 0 and not set(dropped.tolist()) & set(ran)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p["name"])
def test_vectorized_equals_sequential_with_availability_and_dropouts(protocol):
    assert_runtimes_agree(lambda runtime: scenario(protocol, runtime=runtime))


def test_a_synchronous_round_waits_for_a_client_to_come_online():
    """Bernoulli availability, p = 0.05 per 1 s period, 12 clients: about half the periods find nobody online, so
    some rounds start late, at the first period in which someone is (a whole second), with only online clients."""
    mapping = scenario({"name": "synchronous"}, systems={"name": "homogeneous", "speed": 10000.0, "availability": {
        "kind": "bernoulli", "p": 0.05, "period": 1.0}})
    timeline, result = timeline_of(mapping)
    (resolved,), _ = load_scenarios(mapping)
    systems = build_all([resolved])[0].systems
    starts = np.unique(timeline["start"])
    assert len(result.metrics.rows) == 9
    assert np.any((starts > 0) & (starts == np.round(starts)))
    assert all(systems.available_mask([int(c)], s)[0] for c, s in zip(timeline["client"], timeline["start"],
                                                                       strict=True))
