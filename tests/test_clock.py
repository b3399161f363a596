"""The virtual clock, simulated round durations and exact byte counts."""

from __future__ import annotations

import pytest

import fedsim
from fedsim.clock import Clock, Event
from fedsim.data import build_federated_data
from fedsim.data.base import DATASETS, PARTITIONERS
from fedsim.models import MODELS, build_model
from fedsim.params import tree_nbytes


class Log:
    def __init__(self):
        self.seen: list[tuple[float, str]] = []

    def handle(self, event: Event, clock: Clock) -> None:
        self.seen.append((clock.now, event.kind))
        if event.kind == "a":
            clock.schedule(1.0, "c")


def test_events_arrive_in_time_order_with_ties_in_schedule_order():
    clock, log = Clock(), Log()
    clock.schedule(2.0, "b")
    clock.schedule(0.5, "a")
    clock.schedule(2.0, "b2")
    clock.run(log)
    assert log.seen == [(0.5, "a"), (1.5, "c"), (2.0, "b"), (2.0, "b2")]


def test_past_events_are_refused():
    with pytest.raises(ValueError):
        Clock().schedule(-1.0, "x")


def test_round_time_is_the_slowest_kept_client_and_bytes_are_exact(tiny):
    systems = {"name": "homogeneous", "speed": 100.0, "latency": 0.5, "bandwidth_up": 1000.0,
               "bandwidth_down": 2000.0}
    r = fedsim.run({**tiny, "rounds": 1, "systems": systems}, write=False)
    data = build_federated_data("digits", DATASETS.get("digits").params(), "iid", PARTITIONERS.get("iid").params(),
                                10, 0)
    model = build_model("logreg", MODELS.get("logreg").params(), data.feature_shape, 10, 0)
    model_bytes = tree_nbytes(model.init_params)
    assert model_bytes == (64 * 10 + 10) * 4
    up = model_bytes + 8
    # Every client does one epoch; the round ends when the largest of the 4 sampled clients is done.
    largest = max(data.train_sizes)
    expected = 0.5 + model_bytes / 2000.0 + largest / 100.0 + 0.5 + up / 1000.0
    row = r.metrics.last()
    assert row["sim_time"] <= expected + 1e-9
    assert row["sim_time"] >= 0.5 + model_bytes / 2000.0 + min(data.train_sizes) / 100.0 + 0.5 + up / 1000.0
    assert row["bytes_down"] == 4 * model_bytes
    assert row["bytes_up"] == 4 * up


def test_slower_clients_make_longer_rounds_but_the_same_model(tiny):
    fast = fedsim.run({**tiny, "systems": {"name": "homogeneous", "speed": 1000.0}}, write=False)
    slow = fedsim.run({**tiny, "systems": {"name": "lognormal", "speed": 100.0}}, write=False)
    assert slow.metrics.last()["sim_time"] > fast.metrics.last()["sim_time"]
    assert slow.metrics.last()["loss"] == fast.metrics.last()["loss"]
