"""Time-based reports: time to a target, staleness, participation and idle fraction from the job timeline, the
files a run writes from them (timeline-<variant>.npz, timeline.png, async.png, summary.json), and their resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedsim
from fedsim.api import check
from fedsim.errors import ScenarioError
from fedsim.protocol import ProtocolBase
from fedsim.recording import OUTCOMES, JobLog
from fedsim.runtime import Job
from fedsim.systems import JobPhases
from fedsim.timeline import (
    Target,
    idle_fractions,
    participation_counts,
    staleness_histogram,
    time_to_target,
    timeline_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Crash(Exception):
    """A crash in the middle of a run."""


def rows_of(accuracies: list[float]) -> list[dict]:
    return [{"variant": "v", "round": i, "sim_time": 2.5 * i, "client_updates": 4 * i, "accuracy": a,
             "test_loss": 1 - a} for i, a in enumerate(accuracies)]


def test_time_to_target_is_the_first_evaluation_reaching_it():
    rows = rows_of([0.1, 0.5, 0.95, 0.8, 0.97])
    assert time_to_target(rows, Target("accuracy", 0.9)) == {
        "metric": "accuracy", "target": 0.9, "sim_time": 5.0, "server_steps": 2, "client_updates": 8}
    assert time_to_target(rows, Target("test_loss", 0.5))["server_steps"] == 1  # a loss target is reached going down


def test_a_target_never_reached_gives_none():
    reached = time_to_target(rows_of([0.1, 0.5]), Target("accuracy", 0.9))
    assert reached["sim_time"] is None and reached["server_steps"] is None and reached["client_updates"] is None


@pytest.fixture
def log() -> dict[str, np.ndarray]:
    """Five clients, the run ending at 10 s: client 0 two used jobs (busy 4 + 3 s of 10), client 1 one refused job
    (4 of 8 s), client 2 one dropped job (4 of 5 s), client 3 two overlapping used jobs (1-5 and 3-7 s: 6 of 9 s),
    client 4 none."""
    timeline = JobLog()
    jobs = [(0, 0.0, (1, 2, 1), "used", 0), (1, 2.0, (0.5, 3, 0.5), "stale", 3), (3, 1.0, (0, 4, 0), "used", 1),
            (3, 3.0, (0, 4, 0), "used", 0), (0, 6.0, (1, 1, 1), "used", 2), (2, 5.0, (1, 2, 1), "dropped", 0)]
    for i, (client, start, phases, outcome, staleness) in enumerate(jobs):
        timeline.job(Job(i, client, 5, version=0), start, JobPhases(*phases), outcome, staleness)
    for now in (4.0, 5.0, 7.0, 9.0):
        timeline.server_step(now)
    return timeline.arrays()


def test_staleness_histogram_counts_used_jobs_only(log):
    assert staleness_histogram(log).tolist() == [2, 1, 1]


def test_participation_counts_used_jobs_per_client_including_unused_clients(log):
    assert participation_counts(log, num_clients=5).tolist() == [2, 0, 0, 2, 0]


def test_idle_fraction_is_time_outside_jobs_since_the_first_job(log):
    clients, idle = idle_fractions(log, end=10.0)
    assert clients.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(idle, [0.3, 0.5, 0.2, 1 / 3])
    _, clipped = idle_fractions(log, end=8.0)  # client 0's second job (6-9 s) counts up to the end only
    np.testing.assert_allclose(clipped[0], 1 - 6 / 8)


def test_timeline_summary_counts_outcomes_and_spreads(log):
    summary = timeline_summary(log, num_clients=5, end=10.0)
    assert (summary["jobs"], summary["used"], summary["refused"], summary["dropped"]) == (6, 4, 1, 1)
    assert summary["server_steps"] == 4 and summary["staleness_histogram"] == [2, 1, 1]
    assert summary["participation"]["clients_used"] == 2 and summary["participation"]["mean"] == 0.8
    assert summary["idle_fraction"]["max"] == pytest.approx(0.5)


@pytest.mark.parametrize("protocol", ["synchronous", "fedasync"])
def test_a_run_writes_timeline_pictures_arrays_and_summary_figures(tiny, tmp_path: Path, protocol):
    scenario = {**tiny, "rounds": 6 if protocol == "fedasync" else 3, "protocol": {"name": protocol},
                "evaluation": {"target": 0.15}}
    result = fedsim.run(scenario, out=tmp_path / "run")
    run = tmp_path / "run"
    for picture in ("plot.png", "timeline.png", "async.png"):
        assert (run / picture).read_bytes().startswith(PNG_MAGIC)
    with np.load(run / "timeline-tiny.npz") as saved:
        for name, values in result.timelines["tiny"].items():
            np.testing.assert_array_equal(saved[name], values)
        assert saved["outcome_names"].tolist() == ["used", "stale", "dropped", "unfinished"]
    [summary] = json.loads((run / "summary.json").read_text())
    rows = result.metrics.rows
    in_flight = 3 if protocol == "fedasync" else 0  # FedAsync stops with C - 1 = 3 jobs under way
    assert summary["timeline"]["used"] == rows[-1]["client_updates"] == len(result.timelines["tiny"]["job"]) - in_flight
    assert summary["timeline"]["unfinished"] == in_flight
    assert summary["timeline"]["server_steps"] == rows[-1]["round"]
    first = next(r for r in rows if r["accuracy"] >= 0.15)
    assert summary["time_to_target"] == {"metric": "accuracy", "target": 0.15, "sim_time": first["sim_time"],
                                         "server_steps": first["round"], "client_updates": first["client_updates"]}
    assert "time to target (s)" in result.summary()
    if protocol == "fedasync":
        assert sum(summary["timeline"]["staleness_histogram"][1:]) > 0  # updates that other updates overtook


def test_plot_false_writes_no_pictures_but_the_timeline_arrays(tiny, tmp_path: Path):
    fedsim.run({**tiny, "output": {"plot": False}}, out=tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert not {"plot.png", "timeline.png", "async.png"} & files and "timeline-tiny.npz" in files


def test_a_variant_without_jobs_gets_no_timeline_pictures(tiny, tmp_path: Path):
    """Gossip protocols log no client jobs: the run still writes plot.png (and its graph, topology.png) and reports
    zero jobs."""
    fedsim.run({**tiny, "rounds": 2, "protocol": {"name": "dsgd"}, "topology": {"name": "ring"},
                "clients_per_round": None}, out=tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"plot.png", "topology.png"} <= files and not {"timeline.png", "async.png"} & files
    assert json.loads((tmp_path / "run" / "summary.json").read_text())[0]["timeline"]["jobs"] == 0


def test_two_targets_or_an_accuracy_target_without_accuracy_are_refused(tiny):
    with pytest.raises(ScenarioError, match=r"^evaluation\.target_loss: give target \(accuracy\) or target_loss"):
        check({**tiny, "evaluation": {"target": 0.9, "target_loss": 0.1}}, write=False)
    regression = {**tiny, "data": {"name": "least_squares"}, "model": {"name": "linear"},
                  "evaluation": {"target": 0.9}}
    with pytest.raises(ScenarioError, match=r"^evaluation\.target: task 'regression' reports no accuracy"):
        check(regression, write=False)


def test_a_resumed_run_writes_the_same_timeline_and_summary(tiny, tmp_path: Path, monkeypatch):
    """Killed inside the second variant (fedasync, jobs in flight): the first variant's timeline is read back from
    its file, the second's from the checkpoint."""
    scenario = {**tiny, "checkpoint": {"every": 1}, "evaluation": {"target": 0.15},
                "variants": {"sync": {}, "async": {"protocol": {"name": "fedasync"}, "rounds": 6}}}
    whole = fedsim.run(scenario, out=tmp_path / "whole").out_dir
    commit, calls = ProtocolBase.commit, []

    def crashing(self, result):
        calls.append(1)
        if len(calls) == 12 + 3:  # the synchronous variant commits 3 rounds x 4 clients
            raise Crash
        return commit(self, result)

    monkeypatch.setattr(ProtocolBase, "commit", crashing)
    with pytest.raises(Crash):
        fedsim.run(scenario, out=tmp_path / "run")
    monkeypatch.setattr(ProtocolBase, "commit", commit)
    resumed = fedsim.resume(tmp_path / "run").out_dir

    def summary(path: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "wall_time"}
                for row in json.loads((path / "summary.json").read_text())]

    assert summary(resumed) == summary(whole)
    for name in ("timeline-sync.npz", "timeline-async.npz", "timeline.png", "async.png"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


def test_jobs_still_running_at_the_end_are_logged_unfinished_up_to_the_end():
    """FedAsync stops at its budget with C - 1 jobs in flight: they go on the timeline as unfinished, cut at the
    run's end, which the timeline records."""
    result = fedsim.run({"name": "ends", "seed": 0, "rounds": 6, "num_clients": 10, "clients_per_round": 4,
                         "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
                         "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20},
                         "protocol": {"name": "fedasync"}, "systems": {"name": "lognormal"}}, write=False)
    log = result.timelines["ends"]
    unfinished = log["outcome"] == OUTCOMES.index("unfinished")
    assert unfinished.sum() == 3 and log["ended"][0] == result.metrics.last()["sim_time"]
    assert np.all(log["end"][unfinished] <= log["ended"][0]) and np.all(log["start"][unfinished] <= log["ended"][0])
