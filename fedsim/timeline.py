"""Time-based reports of a run: when a variant first reached its target (simulated seconds, server steps, client
updates), and what its job timeline (`fedsim.recording.JobLog`) says about staleness, participation and idle
clients; the figures summary.json holds per variant."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.recording import OUTCOMES

Row = dict[str, Any]
Log = Mapping[str, np.ndarray]
"""A JobLog's arrays (`JobLog.arrays()`): one entry per column, plus `server_steps`."""


@dataclass(frozen=True)
class Target:
    """A target on one evaluated metric: accuracy to reach or exceed, or test loss to reach or go below."""

    metric: str
    value: float

    def reached(self, row: Row) -> bool:
        value = row.get(self.metric)
        if value is None:
            return False
        return value >= self.value if self.metric == "accuracy" else value <= self.value


def target_of(evaluation: Any) -> Target | None:
    """The target an `evaluation` section sets (`target`: accuracy, `target_loss`: test loss), if any."""
    if evaluation.target is not None:
        return Target("accuracy", evaluation.target)
    if evaluation.target_loss is not None:
        return Target("test_loss", evaluation.target_loss)
    return None


def time_to_target(rows: Sequence[Row], target: Target) -> dict[str, Any]:
    """The simulated seconds, server steps and client updates at the first of `rows` (one variant's, in order)
    that reaches `target`; None for each when none does."""
    hit = next((r for r in rows if target.reached(r)), None)
    return {"metric": target.metric, "target": target.value,
            "sim_time": hit["sim_time"] if hit else None, "server_steps": hit["round"] if hit else None,
            "client_updates": hit.get("client_updates") if hit else None}


def staleness_histogram(log: Log) -> np.ndarray:
    """How many used jobs had staleness 0, 1, 2, ... (server versions between a job's start and its use)."""
    used = log["outcome"] == OUTCOMES.index("used")
    return np.bincount(log["staleness"][used].astype(np.int64))


def participation_counts(log: Log, num_clients: int) -> np.ndarray:
    """Used jobs per client (index = client id), zero for clients never used."""
    used = log["outcome"] == OUTCOMES.index("used")
    return np.bincount(log["client"][used].astype(np.int64), minlength=num_clients)


def idle_fractions(log: Log, end: float) -> tuple[np.ndarray, np.ndarray]:
    """For each client with at least one job (any outcome): 1 - (simulated seconds inside its jobs, overlapping
    jobs counted once, clipped at `end`) / (seconds from its first job's start to the run's `end`); returns the
    client ids and their idle fractions (0 where that span is empty). Jobs still in flight at the end are not in the
    log, so a client busy with one then counts as idle."""
    client = log["client"].astype(np.int64)
    if client.size == 0:
        return client, np.zeros(0)
    order = np.lexsort((log["start"], client))
    client, start, stop = client[order], log["start"][order], np.minimum(log["end"][order], end)
    clients, first, group = np.unique(client, return_index=True, return_inverse=True)
    # Shift each client's intervals past the previous client's, so one running maximum of job ends stays within a
    # client: an interval adds only the part after every earlier job of its client has ended.
    shift = group * (end + 1.0)
    reach = np.maximum.accumulate(stop + shift)
    earlier = np.concatenate([[-np.inf], reach[:-1]])
    busy = np.bincount(group, np.maximum(0.0, stop + shift - np.maximum(start + shift, earlier)))
    span = end - start[first]
    idle = np.where(span > 0, 1.0 - busy / np.where(span > 0, span, 1.0), 0.0)
    return clients, np.clip(idle, 0.0, 1.0)


def _spread(values: np.ndarray) -> dict[str, float] | None:
    """Mean, extremes and deciles 1, 5 and 9 of `values` (None when empty)."""
    if values.size == 0:
        return None
    p10, p50, p90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {"mean": float(values.mean()), "min": float(values.min()), "p10": float(p10), "median": float(p50),
            "p90": float(p90), "max": float(values.max())}


def timeline_summary(log: Log, num_clients: int, end: float) -> dict[str, Any]:
    """A variant's job figures for summary.json: jobs by outcome, the staleness histogram of used jobs, used jobs
    per client (spread over all `num_clients`) and client idle fraction (spread over clients with jobs)."""
    outcome = log["outcome"]
    counts = {name: int((outcome == i).sum()) for i, name in enumerate(OUTCOMES)}
    participation = participation_counts(log, num_clients)
    _, idle = idle_fractions(log, end)
    return {"jobs": int(outcome.size), "used": counts["used"], "refused": counts["stale"],
            "dropped": counts["dropped"], "unfinished": counts["unfinished"],
            "server_steps": int(log["server_steps"].size),
            "staleness_histogram": staleness_histogram(log).tolist(),
            "participation": {"clients_used": int((participation > 0).sum()), **(_spread(participation) or {})},
            "idle_fraction": _spread(idle)}


def run_end(rows: Sequence[Row], log: Log) -> float:
    """The simulated second a variant's run ended, as its timeline recorded it (else its last evaluation, or its
    last job's end if later)."""
    if "ended" in log:
        return float(log["ended"][0])
    return float(max(rows[-1]["sim_time"] if rows else 0.0, log["end"].max(initial=0.0)))


def timeline_window(log: Log, end: float, seconds: float | None) -> float:
    """The simulated seconds timeline.png shows: `seconds` when given, else the first 10% of the run, widened to
    three median job durations (so whole jobs show) but not past the run's end."""
    if seconds is not None:
        return seconds
    durations = log["end"] - log["start"]
    window = min(end, max(0.1 * end, 3 * float(np.median(durations)) if durations.size else 0.0))
    return window if window > 0 else 1.0


def variant_report(rows: Sequence[Row], target: Target | None, log: Log | None, num_clients: int) -> Row:
    """What summary.json adds to a variant's last row: `time_to_target` (with a target) and `timeline` (None when
    the run directory holds no timeline for it)."""
    report: Row = {"time_to_target": time_to_target(rows, target)} if target is not None else {}
    return {**report, "timeline": timeline_summary(log, num_clients, run_end(rows, log)) if log is not None else None}
