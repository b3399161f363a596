"""Collects one metrics row per evaluation (round, simulated and real seconds, accuracy, losses, bytes) and
passes each to a sink (the run directory's writer) and a progress display; and the timeline of client jobs and
server steps on the virtual clock, for the time-based reports (`fedsim.timeline`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim.errors import DivergenceError
from fedsim.evaluation import Evaluator
from fedsim.params import Pytree

Row = dict[str, Any]


def run_variant(row_variant: str) -> str:
    """The variant a metrics row belongs to: rows of a protocol training several models at once (FedAST) are named
    `<variant>:<task>` (variant names have no ':')."""
    return row_variant.split(":", 1)[0]


@dataclass
class Traffic:
    """Exact bytes sent so far: server to clients (models) and clients to server (messages)."""

    down: int = 0
    up: int = 0


OUTCOMES = ("used", "stale", "dropped", "unfinished")
"""What became of a job: its message went into a server step; it was refused as too stale; it was lost (the client
dropped out, or missed the round's deadline under a rule that drops late work); it was still running when the run
ended (logged up to the end)."""


class JobLog:
    """Every job that reached its end on the virtual clock (its id, client, the server version it started from,
    when it started, finished downloading, finished training and arrived, its staleness where it was used, and its
    outcome) and the simulated time of every server step: what the timeline, staleness, participation and idle
    reports are drawn from."""

    COLUMNS = ("job", "client", "version", "start", "downloaded", "trained", "end", "staleness", "outcome")

    def __init__(self) -> None:
        self.columns: dict[str, list[float]] = {name: [] for name in self.COLUMNS}
        self.server_steps: list[float] = []
        self.ended: float | None = None
        """When the run ended (simulated seconds), once it has."""
        self.node_map: dict[str, np.ndarray] = {}
        """A decentralized run's graph and per-node figures, for the topology picture (see `map_nodes`)."""

    def job(self, job: Any, start: float, phases: Any, outcome: str, staleness: int = 0) -> None:
        """Record job `job` (a `Job`), started at `start` with `phases` (`fedsim.systems.JobPhases`)."""
        downloaded = start + phases.download
        trained = downloaded + phases.compute
        values = (job.id, job.client, job.version, start, downloaded, trained, trained + phases.upload, staleness,
                  OUTCOMES.index(outcome))
        for name, value in zip(self.COLUMNS, values, strict=True):
            self.columns[name].append(value)

    def server_step(self, now: float) -> None:
        self.server_steps.append(now)

    def finish(self, now: float, pending: Iterable[Any]) -> None:
        """The run ended at `now`: log the jobs still under way (clock events carrying a job, its start and
        phases) as unfinished, cut at `now`."""
        self.ended = now
        for event in pending:
            payload = event.payload
            if "phases" in payload:
                job = payload["job"] if "job" in payload else payload["result"].job
                self.job(job, payload["start"], payload["phases"].until(now - payload["start"]), "unfinished")

    def map_nodes(self, edges: np.ndarray, **values: np.ndarray) -> None:
        """Keep the graph's edges (an (E, 2) array of node ids) and per-node figures (accuracy, visit frequency, one
        value per node) as the latest to draw; stored as `map_edges` and `map_<name>`."""
        self.node_map = {"map_edges": np.asarray(edges, dtype=np.int64).reshape(-1, 2),
                         **{f"map_{k}": np.asarray(v, dtype=np.float64) for k, v in values.items()}}

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns as arrays (float64), plus `server_steps`, once the run ended `ended` (one value), and the
        node map of decentralized runs."""
        out = {name: np.asarray(values, dtype=np.float64) for name, values in self.columns.items()}
        ended = {} if self.ended is None else {"ended": np.asarray([self.ended])}
        return {**out, "server_steps": np.asarray(self.server_steps, dtype=np.float64), **ended, **self.node_map}

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.arrays()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.columns = {name: state[name].tolist() for name in self.COLUMNS}
        self.server_steps = state["server_steps"].tolist()
        self.node_map = {k: v for k, v in state.items() if k.startswith("map_")}


class Progress:
    """Progress display hooks; the default shows nothing."""

    def advance(self, round_index: int, row: Row | None) -> None:
        """Called after each round with the latest metrics row, if one was recorded."""

    def close(self) -> None:
        """Called once when the run ends."""


@dataclass
class Recorder:
    variant: str
    evaluator: Evaluator
    sink: Callable[[Row], None] = lambda row: None
    progress: Progress = field(default_factory=Progress)
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    timeline: JobLog = field(default_factory=JobLog)

    def state_dict(self) -> dict[str, Any]:
        """The rows and timeline recorded so far and the real seconds the run has taken (resumed runs count on from
        there)."""
        return {"rows": self.rows, "wall_seconds": time.perf_counter() - self.started,
                "timeline": self.timeline.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])
        self.started = time.perf_counter() - state["wall_seconds"]
        self.timeline.load_state_dict(state["timeline"])

    def evaluate(self, round_index: int, sim_time: float, params: Pytree, traffic: Traffic,
                 extra: Mapping[str, Any] | None = None, evaluator: Evaluator | None = None,
                 variant: str | None = None) -> Row:
        """Evaluate the global model, record the row (with a protocol's own figures in `extra`: consensus error,
        staleness ...), and stop the run if the loss is not finite. A protocol training several models at once
        passes each one's `evaluator` and row `variant` (the recorder's own by default)."""
        metrics = (self.evaluator if evaluator is None else evaluator)(params)
        variant = variant or self.variant
        row = {"variant": variant, "round": round_index, "sim_time": sim_time,
               "wall_time": time.perf_counter() - self.started, **metrics, **(extra or {}),
               "bytes_up": traffic.up, "bytes_down": traffic.down}
        self.rows.append(row)
        self.sink(row)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise DivergenceError(
                f"variant {variant}, round {round_index}: the run diverged (training loss {metrics['loss']}); "
                f"its metrics up to this round are kept; a smaller algorithm.lr may help"
            )
        return row
