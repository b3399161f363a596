"""Helpers for calling rules directly in tests: aggregates, batches and oracle stand-ins; comparing runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fedsim
from fedsim import api
from fedsim.aggregation import Aggregate
from fedsim.clients import ALGORITHMS, Batch
from fedsim.clock import Clock
from fedsim.params import tree_map
from fedsim.recording import Recorder
from fedsim.run_state import RunState
from fedsim.runtime.base import torch_threads
from fedsim.scenario import load_scenarios
from fedsim.servers import PROTOCOLS
from fedsim.simulation import build_simulation
from fedsim.state_tree import flatten_state, unflatten_state


def aggregate_of(mean, count: int = 1, population: int = 10, round_index: int = 0) -> Aggregate:
    """An aggregate of `count` results with the given per-key mean (sample weighting, one sample each)."""
    weighting = {key: "samples" for key in mean}
    return Aggregate(mean, weighting, {key: float(count) for key in mean}, count, population, round_index, [], None,
                     torch.zeros(2, dtype=torch.int64))


def batch_of(x, y) -> Batch:
    """A Batch of weight-1 samples with a fixed key, for calling a rule's step directly."""
    return Batch(x, y, torch.ones(len(y)), torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64))


class FixedGradient:
    """An oracle stand-in whose gradient is a fixed pytree (to check a rule's update arithmetic)."""

    def __init__(self, grads):
        self.grads = grads

    def grad(self, params, batch):
        return self.grads


def spy_on_run(monkeypatch, server_class) -> tuple[list, list]:
    """Lists that fill, as a run goes, with the simulations it builds and every state `server_class.update` returns
    (to check a server's state against the clients' states end to end)."""
    sims, servers = [], []
    original_update = server_class.update

    def keep_sim(scenario, data=None):
        sims.append(build_simulation(scenario, data))
        return sims[-1]

    def keep_state(self, state, aggregate):
        servers.append(original_update(self, state, aggregate))
        return servers[-1]

    monkeypatch.setattr(api, "build_simulation", keep_sim)
    monkeypatch.setattr(server_class, "update", keep_state)
    return sims, servers


def sequential_and_vectorized(monkeypatch, scenario: dict, vectorized: dict) -> tuple:
    """`scenario` run under the sequential runtime and under `vectorized` (the runtime section's other settings):
    (sequential result, vectorized result, {runtime name: its simulation})."""
    sims = {}

    def keep(resolved, data=None):
        sims[resolved.components["runtime"].name] = build_simulation(resolved, data)
        return sims[resolved.components["runtime"].name]

    monkeypatch.setattr(api, "build_simulation", keep)
    results = [fedsim.run({**scenario, "runtime": runtime}, write=False)
               for runtime in ({"name": "sequential"}, {"name": "vectorized", **vectorized})]
    return results[0], results[1], sims


def assert_same_client_states(sims: dict, num_clients: int) -> list[int]:
    """The vectorized run holds a state for exactly the clients the sequential one does, equal to float tolerance;
    returns those clients (at least one)."""
    seq, vec = sims["sequential"].states, sims["vectorized"].states
    held = [k for k in range(num_clients) if seq.get(k) is not None]
    assert held and [k for k in range(num_clients) if vec.get(k) is not None] == held
    for k in held:
        torch.testing.assert_close(vec.get(k), seq.get(k), rtol=1e-4, atol=1e-6)
    return held


def numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics rows without the variant name and the wall-clock seconds (what two runs of one scenario share)."""
    return [{k: v for k, v in row.items() if k not in ("variant", "wall_time")} for row in rows]


def assert_runtimes_agree(scenario_for: Callable[[dict[str, str]], dict[str, Any]],
                          rel: float = 1e-5) -> dict[str, list[dict[str, Any]]]:
    """Run `scenario_for(runtime)` under the sequential and vectorized runtimes; every row's figures agree to `rel`
    (lists, such as histograms of counts, exactly). Returns each runtime's rows."""
    rows = {rt: fedsim.run(scenario_for({"name": rt}), write=False).metrics.rows for rt in ("sequential", "vectorized")}
    assert len(rows["sequential"]) == len(rows["vectorized"])
    for seq, vec in zip(numbers(rows["sequential"]), numbers(rows["vectorized"]), strict=True):
        lists = {k for k, v in seq.items() if isinstance(v, list)}
        assert {k: vec[k] for k in lists} == {k: seq[k] for k in lists}
        assert {k: v for k, v in vec.items() if k not in lists} == pytest.approx(
            {k: v for k, v in seq.items() if k not in lists}, rel=rel)
    return rows


def client_server_algorithms() -> list[str]:
    """Every registered algorithm whose default protocol has a server (peer-to-peer ones, such as DADAO's
    `gradient`, are tested with their protocols)."""
    return [e.name for e in ALGORITHMS
            if not PROTOCOLS.get(e.meta.get("protocol", "synchronous")).meta.get("peer_to_peer")]


def rule_params(algorithm: str, hp: dict[str, Any]) -> dict[str, Any]:
    """Those of the hyperparameters `hp` that `algorithm`'s rule takes with these values (spiderboost takes no lr,
    its server's, and passes over its data once a job)."""
    params = ALGORITHMS.get(algorithm).params

    def takes(key: str, value: Any) -> bool:
        try:
            params(**{key: value})
        except ValueError:
            return False
        return True

    return {key: value for key, value in hp.items() if takes(key, value)}


def protocol_of(mapping: dict[str, Any]) -> Any:
    """The protocol object of a one-variant scenario, built as `fedsim.run` builds it (not started)."""
    [resolved], _ = load_scenarios(mapping)
    sim = build_simulation(resolved)
    component = resolved.components["protocol"]
    return component.entry.obj(component.params, sim, Recorder(resolved.variant, sim.evaluator))


def finished(mapping: dict[str, Any], before_start: Callable[[Any], None] | None = None) -> Any:
    """The protocol of a one-variant scenario after running its whole budget on a fresh clock (`before_start` may
    change it first), with torch's threads set to the runtime's as `fedsim.run` sets them."""
    protocol = protocol_of(mapping)
    if before_start is not None:
        before_start(protocol)
    clock = Clock()
    with torch_threads(protocol.sim.runtime.threads):
        protocol.start(clock)
        clock.run(protocol)
    assert clock.stopped
    return protocol


def spread(protocol: Any, seed: int = 0) -> None:
    """Give every node of a gossip protocol (its `nodes` store) its own random model, so there is disagreement to
    mix away."""
    g = torch.Generator().manual_seed(seed)
    protocol.nodes.scatter(range(protocol.nodes.num_nodes),
                           tree_map(lambda v: torch.randn(v.shape, generator=g, dtype=v.dtype), protocol.nodes.stacked))


def restarted_rows(source: dict[str, Any], stop_after: int | None) -> list[dict[str, Any]]:
    """The run's rows without wall-clock seconds; with `stop_after`, the run is stopped after that many events, its
    run state (`fedsim.run_state.RunState`, as a checkpoint stores it) goes through JSON and safetensors-ready
    tensors into a freshly built simulation, and the run goes on from there (what `fedsim run --resume` does)."""
    (resolved,), _ = load_scenarios(source)

    def fresh() -> RunState:
        sim = build_simulation(resolved)
        recorder = Recorder(resolved.variant, sim.evaluator)
        component = resolved.components["protocol"]
        return RunState(sim, component.entry.obj(component.params, sim, recorder), Clock(), recorder)

    run = fresh()
    with torch_threads(run.sim.runtime.threads):  # as `fedsim.run` does
        run.protocol.start(run.clock)
        if stop_after is not None:
            events = 0

            def stop(clock: Clock) -> None:
                nonlocal events
                events += 1
                if events == stop_after:
                    clock.stop()

            run.clock.run(run.protocol, stop)
            assert events == stop_after  # stopped midway, not at the end
            skeleton, tensors = flatten_state(run.state_dict())
            run = fresh()
            run.load_state_dict(unflatten_state(json.loads(json.dumps(skeleton)), tensors))
            run.clock.load_state_dict({**run.clock.state_dict(), "stopped": False})
        run.clock.run(run.protocol)
        assert run.clock.stopped
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in run.recorder.rows]
