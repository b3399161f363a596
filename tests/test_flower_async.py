"""Asynchronous protocols on Flower nodes: jobs are pushed as they are dispatched and handled as their replies
come (a real-time clock), so staleness follows the devices' real speeds; `train-delay` makes a node slower."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
import yaml

pytest.importorskip("flwr")

import test_flower_bridge as bridge  # noqa: E402
from test_flower_bridge import bridged, nodes, small  # noqa: E402

from fedsim.cli import main  # noqa: E402
from fedsim.clock import RealTimeClock  # noqa: E402
from fedsim.flower.client import NodeConfigError, train_delay  # noqa: E402
from fedsim.runtime import Job  # noqa: E402

flower_processes = bridge.flower_processes


def asynchronous(protocol: dict[str, Any], rounds: int = 5) -> dict[str, Any]:
    """Two clients, both in flight, on logistic regression."""
    return {**small("fedavg"), "num_clients": 2, "clients_per_round": 2, "stragglers": {"fraction": 0.0},
            "rounds": rounds, "protocol": protocol}


class ScriptedArrivals:
    """Job results that arrive in a fixed order, `gap` real seconds apart."""

    def __init__(self, order: list[int], gap: float) -> None:
        self.order, self.gap = list(order), gap

    def wait_arrival(self, timeout: float | None) -> int | None:
        if timeout is not None and timeout < self.gap:
            time.sleep(max(0.0, timeout))
            return None
        time.sleep(self.gap)
        return self.order.pop(0)


class Log:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, float]] = []

    def handle(self, event, clock) -> None:
        self.seen.append((event.kind, event.payload.get("job", event.payload.get("n")), clock.now))
        if event.kind == "arrival" and not clock.awaiting and not clock._queue:
            clock.stop()


def test_the_real_time_clock_delivers_arrivals_as_results_come_not_at_their_scheduled_times():
    clock = RealTimeClock(ScriptedArrivals([2, 0, 1], gap=0.05))
    for job, delay in ((0, 1.0), (1, 2.0), (2, 3.0)):
        clock.schedule(delay, "arrival", job=Job(job, job, 1))
    clock.schedule(0.12, "tick", n=7)
    log = Log()
    clock.run(log)
    assert [(kind, getattr(x, "id", x)) for kind, x, _ in log.seen] == [("arrival", 2), ("arrival", 0), ("tick", 7),
                                                                        ("arrival", 1)]
    times = [now for _, _, now in log.seen]
    assert times == sorted(times) and times[-1] < 1.0  # real seconds, not the scheduled 1-3 s
    assert times[2] == pytest.approx(0.12)


@pytest.mark.parametrize("protocol", [{"name": "fedasync"}, {"name": "fedbuff", "buffer_size": 1}])
def test_an_asynchronous_protocol_on_flower_nodes_learns_with_staleness_from_real_arrivals(protocol):
    rows = bridged(asynchronous(protocol), [nodes(2)[0], {**nodes(2)[1], "train-delay": 0.3}])
    assert [r["round"] for r in rows] == list(range(6))
    assert [r["client_updates"] for r in rows] == list(range(6))
    assert all(a["sim_time"] < b["sim_time"] for a, b in itertools.pairwise(rows))
    assert max(r["staleness"] for r in rows) >= 1
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]


@pytest.mark.parametrize("value", [-1.0, "slow", True])
def test_a_bad_train_delay_is_one_line_naming_it(value):
    with pytest.raises(NodeConfigError, match=r"^node_config\.train-delay: "):
        train_delay({"train-delay": value})


@pytest.mark.flower_processes
def test_on_real_supernodes_the_slow_nodes_updates_are_the_stale_ones(flower_processes, tmp_path):
    """Node 1 waits 15 s after each job: while its job is out, node 0's updates come back fresh (staleness 0),
    and node 1's arrives server steps old. The budget is 40 real seconds, so node 1 answers in it."""
    processes = flower_processes
    processes.start_federation(nodes=2, node_config={1: "train-delay=15.0"})
    for name, protocol in (("fedasync", {"name": "fedasync"}), ("fedbuff", {"name": "fedbuff", "buffer_size": 1})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**asynchronous(protocol), "rounds": None, "time_budget": 40.0}))
        app, out = tmp_path / f"{name}-app", tmp_path / f"{name}-out"
        assert main(["flower-app", str(path), "--out", str(app)]) == 0
        done = processes.flwr_run(app, out, timeout=200.0)
        assert done.returncode == 0, done.stdout + done.stderr + processes.logs()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["sim_time"] >= 40.0, processes.logs()
        staleness = [r["staleness"] for r in rows[1:]]
        assert 0.0 in staleness and max(staleness) >= 1, staleness
