"""Collects one metrics row per evaluation (round, simulated and real seconds, accuracy, losses, bytes) and
passes each to a sink (the run directory's writer) and a progress display."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsim.errors import DivergenceError
from fedsim.evaluation import Evaluator
from fedsim.params import Pytree

Row = dict[str, Any]


@dataclass
class Traffic:
    """Exact bytes sent so far: server to clients (models) and clients to server (messages)."""

    down: int = 0
    up: int = 0


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

    def state_dict(self) -> dict[str, Any]:
        """The rows recorded so far and the real seconds the run has taken (resumed runs count on from there)."""
        return {"rows": self.rows, "wall_seconds": time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])
        self.started = time.perf_counter() - state["wall_seconds"]

    def evaluate(self, round_index: int, sim_time: float, params: Pytree, traffic: Traffic,
                 extra: Mapping[str, Any] | None = None) -> Row:
        """Evaluate the global model, record the row (with a protocol's own figures in `extra`: consensus error,
        staleness ...), and stop the run if the loss is not finite."""
        metrics = self.evaluator(params)
        row = {"variant": self.variant, "round": round_index, "sim_time": sim_time,
               "wall_time": time.perf_counter() - self.started, **metrics, **(extra or {}),
               "bytes_up": traffic.up, "bytes_down": traffic.down}
        self.rows.append(row)
        self.sink(row)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise DivergenceError(
                f"variant {self.variant}, round {round_index}: the run diverged (training loss {metrics['loss']}); "
                f"its metrics up to this round are kept; a smaller algorithm.lr may help"
            )
        return row
