"""Device traces replayed from a CSV file: per-client compute durations or speeds, one row per observation.

The file's header is `client,duration` (seconds of a job's local training) or `client,samples_per_second` (the
client's speed; a job's compute time is its work over that speed). A client may have many rows: each job draws one
of them uniformly, keyed by (seed, job, client), so every runtime and protocol order replays the same values.
Every mistake in the file is one line naming the file and the line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from fedsim.errors import ScenarioError
from fedsim.seeding import Stream, numpy_rng
from fedsim.strict_input import shorten

TraceKind = Literal["duration", "samples_per_second"]
HEADERS: dict[str, TraceKind] = {"client,duration": "duration", "client,samples_per_second": "samples_per_second"}
MAX_LINE_CHARS = 200
"""Longest line read: a client id and a number never need more."""


class ComputeModel(Protocol):
    """How long a job's local training takes: `seconds` of one job, and `mean_seconds` expected over jobs."""

    def seconds(self, job: int, client: int, work: int) -> float: ...

    def mean_seconds(self, client: int, work: int) -> float: ...


@dataclass(frozen=True)
class Trace:
    """A trace's rows grouped by client: client c's values are `values[offsets[c]:offsets[c + 1]]`."""

    kind: TraceKind
    offsets: np.ndarray
    values: np.ndarray

    def rows(self, client: int) -> np.ndarray:
        return self.values[self.offsets[client]:self.offsets[client + 1]]


def _fail(setting: str, path: str, line: int, what: str) -> ScenarioError:
    return ScenarioError(f"{setting}: {path} line {line}: {what}")


def _parse_row(text: str, kind: TraceKind, num_clients: int, setting: str, path: str, line: int) -> tuple[int, float]:
    """One `client,value` row, checked: an existing client id and a finite value > 0."""
    fields = text.split(",")
    if len(fields) != 2:
        raise _fail(setting, path, line, f"expected 2 fields (client,{kind}), got {len(fields)}")
    client_text, value_text = (f.strip() for f in fields)
    try:
        client = int(client_text)
    except ValueError:
        raise _fail(setting, path, line, f"client {shorten(client_text)} is not an integer") from None
    if not 0 <= client < num_clients:
        raise _fail(setting, path, line, f"client {client} does not exist (num_clients is {num_clients}: clients 0 "
                                         f"to {num_clients - 1})")
    try:
        value = float(value_text)
    except ValueError:
        raise _fail(setting, path, line, f"{kind} {shorten(value_text)} is not a number") from None
    if not math.isfinite(value):
        raise _fail(setting, path, line, f"{kind} {value_text} is not finite")
    if value <= 0:
        raise _fail(setting, path, line, f"{kind} {value_text} must be > 0")
    return client, value


def _read_rows(path: str, num_clients: int, setting: str) -> tuple[TraceKind, list[int], list[float]]:
    clients: list[int] = []
    values: list[float] = []
    with open(Path(path).expanduser(), encoding="utf-8-sig") as f:
        header = f.readline(MAX_LINE_CHARS + 2)
        kind = HEADERS.get(",".join(h.strip() for h in header.strip().split(",")))
        if kind is None:
            raise _fail(setting, path, 1, f"unknown header {shorten(header.strip())}; expected "
                                          f"{' or '.join(HEADERS)}")
        for line, text in enumerate(iter(lambda: f.readline(MAX_LINE_CHARS + 2), ""), start=2):
            if len(text.rstrip("\r\n")) > MAX_LINE_CHARS:
                raise _fail(setting, path, line, f"longer than {MAX_LINE_CHARS} characters")
            if text.strip():
                client, value = _parse_row(text, kind, num_clients, setting, path, line)
                clients.append(client)
                values.append(value)
    return kind, clients, values


def read_trace(path: str, num_clients: int, allow_missing: bool, setting: str = "systems.path") -> Trace:
    """Read and check a trace for `num_clients` clients; unless `allow_missing`, every client needs a row."""
    try:
        kind, clients, values = _read_rows(path, num_clients, setting)
    except OSError as e:
        raise ScenarioError(f"{setting}: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{setting}: cannot read {path}: not UTF-8 text") from None
    counts = np.bincount(np.asarray(clients, dtype=np.int64), minlength=num_clients)
    if not allow_missing and (counts == 0).any():
        empty = np.flatnonzero(counts == 0)
        raise ScenarioError(f"{setting}: {path}: client {empty[0]} has no row ({len(empty)} of {num_clients} clients "
                            f"have none); give every client a row, or set systems.missing: speed")
    order = np.argsort(np.asarray(clients, dtype=np.int64), kind="stable")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return Trace(kind, offsets, np.asarray(values, dtype=np.float64)[order])


@dataclass(frozen=True)
class TraceCompute:
    """Compute times replayed from a trace: a job draws one of its client's rows uniformly, keyed by (seed, job,
    client); a duration is the job's compute time, a speed gives work / speed. Clients without rows use
    `fallback` (the profile's `speed`)."""

    trace: Trace
    seed: int
    fallback: ComputeModel

    def seconds(self, job: int, client: int, work: int) -> float:
        rows = self.trace.rows(client)
        if len(rows) == 0:
            return self.fallback.seconds(job, client, work)
        value = rows[0] if len(rows) == 1 else rows[numpy_rng(self.seed, Stream.SYSTEMS, job, client).integers(
            len(rows))]
        return float(value) if self.trace.kind == "duration" else float(work / value)

    def mean_seconds(self, client: int, work: int) -> float:
        """The mean over the client's rows of its compute time (of work / speed for a speed trace)."""
        rows = self.trace.rows(client)
        if len(rows) == 0:
            return self.fallback.mean_seconds(client, work)
        return float(rows.mean()) if self.trace.kind == "duration" else float(work * (1.0 / rows).mean())
