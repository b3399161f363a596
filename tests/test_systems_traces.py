"""The `trace` systems profile: per-client compute durations or speeds replayed from a CSV file, drawn per job
keyed by (seed, job, client); every mistake in the file is one line naming the file and the line."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

import fedsim
from fedsim.errors import ScenarioError
from fedsim.scenario import resolve
from fedsim.systems import SYSTEMS, ClientSystems


def profile(name: str, num_clients: int = 3, seed: int = 0, **params) -> ClientSystems:
    entry, validated = SYSTEMS.resolve({"name": name, **params}, "systems")
    return entry.obj(validated, num_clients, np.random.default_rng(seed))


def trace_file(tmp_path, text: str, name: str = "trace.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_duration_trace_replays_only_the_clients_own_rows_in_proportion(tmp_path):
    path = trace_file(tmp_path, "client,duration\n0,1.0\n1,5.0\n0,2.0\n2,9\n0,2.0\n")
    systems = profile("trace", path=path, latency=0.0)
    draws = Counter(systems.job_seconds(job, 0, 100, 0, 0) for job in range(3000))
    assert set(draws) == {1.0, 2.0}
    assert draws[2.0] / 3000 == pytest.approx(2 / 3, abs=0.03)
    assert {systems.job_seconds(job, 1, 100, 0, 0) for job in range(50)} == {5.0}
    assert {systems.job_seconds(job, 2, 7, 0, 0) for job in range(50)} == {9.0}


def test_speed_trace_gives_work_over_the_drawn_speed(tmp_path):
    path = trace_file(tmp_path, "client,samples_per_second\n0,10\n0,20\n1,4\n")
    systems = profile("trace", num_clients=2, path=path, latency=0.0)
    assert {systems.job_seconds(job, 0, 100, 0, 0) for job in range(200)} == {10.0, 5.0}
    assert systems.job_seconds(3, 1, 100, 0, 0) == 25.0
    assert systems.mean_job_seconds(0, 100, 0, 0) == pytest.approx(7.5)


def test_mean_job_seconds_is_the_clients_mean_trace_duration_plus_its_transfers(tmp_path):
    path = trace_file(tmp_path, "client,duration\n0,1\n0,2\n0,6\n1,4\n")
    systems = profile("trace", num_clients=2, path=path, latency=0.5, bandwidth_down=100.0, bandwidth_up=10.0)
    assert systems.mean_job_seconds(0, 10, 200, 30) == pytest.approx(0.5 + 2.0 + 3.0 + 0.5 + 3.0)
    draws = [systems.job_seconds(job, 0, 10, 200, 30) for job in range(6000)]
    assert np.mean(draws) == pytest.approx(systems.mean_job_seconds(0, 10, 200, 30), rel=0.03)


def test_trace_links_are_those_of_homogeneous(tmp_path):
    path = trace_file(tmp_path, "client,duration\n0,1\n1,1\n2,1\n")
    links = {"latency": 0.2, "bandwidth_up": 1e3, "bandwidth_down": 5e3}
    traced = profile("trace", path=path, **links).job_phases(4, 1, 100, 4000, 700)
    plain = profile("homogeneous", **links).job_phases(4, 1, 100, 4000, 700)
    assert (traced.download, traced.upload) == (plain.download, plain.upload) == pytest.approx((1.0, 0.9))


def test_trace_draws_are_keyed_by_job_and_client_not_by_call_order(tmp_path):
    path = trace_file(tmp_path, "client,duration\n" + "".join(f"{c},{v}\n" for c in range(3) for v in (1, 2, 3, 4)))
    first, second = profile("trace", path=path, seed=5), profile("trace", path=path, seed=5)
    forward = [first.job_seconds(job, client, 1, 0, 0) for job in range(40) for client in range(3)]
    backward = [second.job_seconds(job, client, 1, 0, 0) for job in reversed(range(40)) for client in range(3)]
    assert forward == [v for job in range(40) for v in backward[3 * (39 - job):3 * (40 - job)]]
    assert forward != [profile("trace", path=path, seed=6).job_seconds(job, client, 1, 0, 0)
                       for job in range(40) for client in range(3)]


def test_clients_without_rows_use_speed_when_missing_is_speed(tmp_path):
    path = trace_file(tmp_path, "client,duration\n0,3\n")
    systems = profile("trace", path=path, latency=0.0, missing="speed", speed=50.0)
    assert systems.job_seconds(0, 0, 100, 0, 0) == 3.0
    assert systems.job_seconds(0, 2, 100, 0, 0) == systems.mean_job_seconds(2, 100, 0, 0) == 2.0


BAD_TRACES = [
    ("client,speed\n0,1\n", r"trace\.csv line 1: unknown header 'client,speed'; expected client,duration or "),
    ("", r"trace\.csv line 1: unknown header"),
    ("client,duration\n0,abc\n", r"trace\.csv line 2: duration 'abc' is not a number"),
    ("client,duration\nzero,1\n", r"trace\.csv line 2: client 'zero' is not an integer"),
    ("client,duration\n0,1\n1,0\n", r"trace\.csv line 3: duration 0 must be > 0"),
    ("client,samples_per_second\n0,-2.5\n", r"trace\.csv line 2: samples_per_second -2.5 must be > 0"),
    ("client,duration\n0,nan\n", r"trace\.csv line 2: duration nan is not finite"),
    ("client,duration\n0,1\n1,inf\n", r"trace\.csv line 3: duration inf is not finite"),
    ("client,duration\n0,1\n\n3,1\n", r"trace\.csv line 4: client 3 does not exist \(num_clients is 3"),
    ("client,duration\n-1,1\n", r"trace\.csv line 2: client -1 does not exist"),
    ("client,duration\n0,1,2\n", r"trace\.csv line 2: expected 2 fields \(client,duration\), got 3"),
    ("client,duration\n0," + "1" * 300 + "\n", r"trace\.csv line 2: longer than 200 characters"),
    ("client,duration\n0,1\n2,1\n", r"trace\.csv: client 1 has no row \(1 of 3 clients have none\)"),
    (b"client,duration\n0,\xff\n", r"cannot read .*trace\.csv: not UTF-8 text"),
    (None, r"cannot read .*trace\.csv: No such file"),
]


@pytest.mark.parametrize(("content", "message"), BAD_TRACES)
def test_bad_traces_are_one_line_naming_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "trace.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ScenarioError, match=r"^systems\.path: .*" + message) as caught:
        profile("trace", path=str(path))
    assert "\n" not in str(caught.value)


def test_the_trace_check_hook_refuses_a_bad_file_without_building_anything(tmp_path, tiny):
    path = trace_file(tmp_path, "client,duration\n0,-1\n")
    entry, params = SYSTEMS.resolve({"name": "trace", "path": path}, "systems")
    spec = resolve(tiny, None).spec
    with pytest.raises(ScenarioError, match=r"^systems\.path: .*trace\.csv line 2: duration -1 must be > 0$"):
        entry.meta["check"](params, spec, {})


def test_fedsim_run_refuses_a_bad_trace_before_any_training(tmp_path, tiny, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("fedsim.api.run_variants", no_training)
    path = trace_file(tmp_path, "client,duration\n" + "".join(f"{c},1\n" for c in range(9)) + "12,1\n")
    with pytest.raises(ScenarioError, match=r"^systems\.path: .*trace\.csv line 11: client 12 does not exist"):
        fedsim.run({**tiny, "systems": {"name": "trace", "path": path}}, write=False)


def test_a_run_on_a_trace_spends_the_traced_seconds_per_round(tmp_path, tiny):
    path = trace_file(tmp_path, "client,duration\n" + "".join(f"{c},7.0\n" for c in range(10)))
    systems = {"name": "trace", "path": path, "latency": 0.0, "bandwidth_up": 1e12, "bandwidth_down": 1e12}
    rows = fedsim.run({**tiny, "runtime": {"name": "sequential"}, "systems": systems}, write=False).metrics.rows
    assert rows[-1]["sim_time"] == pytest.approx(3 * 7.0, rel=1e-6)
    assert math.isfinite(rows[-1]["loss"])
