"""The ServerApp side of the bridge: fedsim's own protocol for the scenario (synchronous rounds, sampling,
server rule, aggregate, evaluation on the virtual clock), unchanged, with its jobs run on Flower nodes by a
`FlowerRuntime`. Asynchronous protocols (registered `asynchronous=True`: FedAsync, FedBuff) run on a
`RealTimeClock` instead: each job is pushed to its node when dispatched and its arrival handled when its reply
comes, so staleness and buffers follow the devices' real speeds, and simulated seconds are real ones.

The metrics rows are those of an in-process run (for asynchronous protocols: of the arrivals as they came); they
go to `context.state` (record `fedsim.metrics`, one JSON line per row) and, when the run config names an `out`
directory, to its metrics.jsonl. A row after jobs were lost (nodes that did not answer in time) lists them under
`lost`."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsim.clock import Clock, RealTimeClock
from fedsim.codecs import build_codec
from fedsim.errors import FedsimError, ScenarioError
from fedsim.flower.build import ScenarioSource, resolve_one
from fedsim.flower.relay import RelayTransport
from fedsim.flower.runtime import FlowerRuntime
from fedsim.outputs import RunDirectory
from fedsim.params import tree_leaves
from fedsim.recording import Recorder, Row
from fedsim.runtime.base import torch_threads
from fedsim.simulation import Simulation, build_simulation

METRICS = "fedsim.metrics"
DEFAULT_TIMEOUT = 600.0
"""Seconds the server waits for a round's replies (run config `timeout`), and by default for nodes to connect."""


def check_downlink(sim: Simulation) -> None:
    """Refuse a downlink codec whose receivers mirror the server's state (EF21-style error feedback): Flower nodes
    hear only the broadcasts of the rounds they are sampled in, so their mirrors would drift from the server's."""
    downlink = sim.downlink
    template = sim.server.broadcast(sim.server.init(sim.model.init_params))
    if any(True for _ in tree_leaves(downlink.shared(downlink.init(template)))):
        raise ScenarioError("compression.downlink.error_feedback: on Flower nodes the downlink codec cannot keep "
                            "state on the receiving side (ef21, ef21_sgdm, econtrol): a node hears only the rounds it "
                            "is sampled in; use ef14 or none")


def run_on_grid(scenario: ScenarioSource, grid: Grid, timeout: float = DEFAULT_TIMEOUT,
                out: str | Path | None = None, connect_timeout: float | None = None) -> list[Row]:
    """Run the scenario's protocol with its jobs on the grid's nodes; returns the metrics rows."""
    resolved = resolve_one(scenario)
    spec = resolved.spec
    relay = RelayTransport(spec.num_clients) if resolved.components["protocol"].entry.meta.get("peer_to_peer") \
        else None
    sim = build_simulation(resolved, transport=relay)
    check_downlink(sim)
    runtime = FlowerRuntime(grid, sim.rule, build_codec(spec.compression.uplink, "compression.uplink"),
                            spec.num_clients, timeout, starts_on_nodes=relay is not None,
                            connect_timeout=connect_timeout)
    if relay is not None:
        relay.runtime = runtime
    personal = sim.personal.with_scorer(runtime.personal_scores) if sim.personal else None
    sim = replace(sim, runtime=runtime, personal=personal)
    run_dir = RunDirectory(Path(out)) if out else None

    def sink(row: Row) -> None:
        lost = runtime.take_lost()
        if lost:
            row["lost"] = lost
        log(logging.INFO, "fedsim metrics %s", json.dumps(row))
        if run_dir:
            run_dir.append_metrics([row])

    recorder = Recorder(resolved.variant, sim.evaluator, sink=sink)
    component = resolved.components["protocol"]
    clock = Clock()
    if component.entry.meta.get("asynchronous"):
        runtime.nodes = runtime.discover()  # real seconds count from when every node is there
        clock = RealTimeClock(runtime)
    with torch_threads(resolved.components["runtime"].params.threads):
        protocol = component.entry.obj(component.params, sim, recorder)
        protocol.start(clock)
        clock.run(protocol)
    if not clock.stopped:
        raise FedsimError(f"variant {resolved.variant}: protocol {component.name!r} ran out of events at simulated "
                          f"time {clock.now:.6g} s before its budget was spent")
    return recorder.rows


def server_app(scenario: ScenarioSource) -> ServerApp:
    """The ServerApp of a scenario; run config `timeout` (seconds for a round's replies), `connect_timeout`
    (seconds for every client's node to connect; `timeout` by default) and `out` (a directory for metrics.jsonl)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config: dict[str, Any] = dict(context.run_config)
        connect = config.get("connect_timeout")
        rows = run_on_grid(scenario, grid, float(config.get("timeout", DEFAULT_TIMEOUT)), config.get("out") or None,
                           None if connect is None else float(connect))
        context.state[METRICS] = ConfigRecord({"rows": [json.dumps(row) for row in rows]})

    return app


def metrics_rows(context: Context) -> list[Row]:
    """The rows a ServerApp run left in its context."""
    return [json.loads(line) for line in context.state.config_records[METRICS]["rows"]]
