"""When clients can be reached: always; on/off windows (each client's own phase); available with probability p per
period (keyed by (seed, period, client)); and mid-job dropouts (keyed by (seed, job, client)). Systems profiles
(`fedsim.systems`) take these as their `availability` and `dropout` settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from fedsim.keyed_random import key_from_seed, philox4x32
from fedsim.registry import Params
from fedsim.seeding import Stream, numpy_rng


@dataclass(frozen=True)
class AlwaysAvailable:
    """Every client is available at every moment."""

    def mask(self, clients: np.ndarray, t: float) -> np.ndarray:
        return np.ones(len(clients), dtype=bool)

    def times(self, clients: np.ndarray, t: float) -> np.ndarray:
        return np.full(len(clients), float(t))

    def offline_within(self, client: int, start: float, end: float) -> float | None:
        return None


@dataclass(frozen=True)
class Windows:
    """Each client cycles through `on` seconds available then `off` seconds away; client c's cycles start at
    k (on + off) - phase[c] for every integer k. Times are compared with those exact expressions, so the moment
    `times` returns is one `mask` calls available."""

    on: float
    off: float
    phase: np.ndarray

    def _cycle(self, clients: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """The index k of each client's cycle holding t (start <= t < next start), and its phase."""
        cycle, phase = self.on + self.off, self.phase[clients]
        k = np.floor((t + phase) / cycle)
        k = np.where((k + 1) * cycle - phase <= t, k + 1, k)
        return np.where(k * cycle - phase > t, k - 1, k), phase

    def _window_end(self, clients: np.ndarray, t: float) -> np.ndarray:
        k, phase = self._cycle(clients, t)
        return k * (self.on + self.off) - phase + self.on

    def mask(self, clients: np.ndarray, t: float) -> np.ndarray:
        return t < self._window_end(clients, t)

    def times(self, clients: np.ndarray, t: float) -> np.ndarray:
        k, phase = self._cycle(clients, t)
        cycle = self.on + self.off
        return np.where(t < k * cycle - phase + self.on, float(t), (k + 1) * cycle - phase)

    def offline_within(self, client: int, start: float, end: float) -> float | None:
        window_end = float(self._window_end(np.asarray([client]), start)[0])
        if start >= window_end:
            return float(start)
        return window_end if window_end < end else None


MAX_SCAN_PERIODS = 1_000_000
"""Periods `PerPeriod.times` looks ahead for a client's next available one before answering math.inf (never): with
p >= 1e-4 the chance that a client is away that long is below e^-100."""
_SCAN_CELLS = 1 << 18
"""Most (period, client) draws made at once while looking ahead."""
_WORD = 0xFFFFFFFF


@dataclass(frozen=True)
class PerPeriod:
    """Time cut into periods [k period, (k + 1) period); in each, client c is available with probability p, from a
    counter-based draw keyed by (seed, k, c) (Philox), so any set of periods and clients is drawn at once."""

    p: float
    period: float
    key: torch.Tensor

    def _index(self, t: float) -> int:
        """The period k with k period <= t < (k + 1) period, in those exact expressions."""
        k = math.floor(t / self.period)
        if (k + 1) * self.period <= t:
            return k + 1
        return k - 1 if k * self.period > t else k

    def _on(self, periods: np.ndarray | int, clients: np.ndarray | int) -> np.ndarray:
        k, c = np.broadcast_arrays(np.asarray(periods, dtype=np.int64), np.asarray(clients, dtype=np.int64))
        counter = torch.from_numpy(np.stack([k & _WORD, k >> 32, c & _WORD, c >> 32], axis=-1))
        return philox4x32(counter, self.key)[..., 0].numpy() < self.p * 2.0**32

    def mask(self, clients: np.ndarray, t: float) -> np.ndarray:
        return self._on(self._index(t), clients)

    def times(self, clients: np.ndarray, t: float) -> np.ndarray:
        k = self._index(t)
        clients = np.asarray(clients, dtype=np.int64)
        out = np.full(len(clients), math.inf)
        now = self._on(k, clients)
        out[now] = t
        left, scanned, block = np.flatnonzero(~now), 0, 8
        while left.size and self.p > 0 and scanned < MAX_SCAN_PERIODS:
            block = max(1, min(2 * block, MAX_SCAN_PERIODS - scanned, _SCAN_CELLS // left.size))
            periods = k + 1 + scanned + np.arange(block)
            hits = self._on(periods[:, None], clients[left][None, :])
            found = hits.any(axis=0)
            out[left[found]] = periods[hits.argmax(axis=0)[found]] * self.period
            left, scanned = left[~found], scanned + block
        return out

    def offline_within(self, client: int, start: float, end: float) -> float | None:
        k = self._index(start)
        if not self._on(k, client):
            return float(start)
        last, block = self._index(end) if math.isfinite(end) else k + MAX_SCAN_PERIODS, 8
        while self.p < 1 and k < last:
            block = min(2 * block, last - k, _SCAN_CELLS)
            periods = k + 1 + np.arange(block)
            off = np.flatnonzero(~self._on(periods, client))
            if off.size:
                when = float(periods[off[0]] * self.period)
                return when if when < end else None
            k = int(periods[-1])
        return None


Availability = AlwaysAvailable | Windows | PerPeriod


@dataclass(frozen=True)
class Dropout:
    """A job is abandoned with probability p, at a moment uniform over its duration; keyed by (seed, job, client)."""

    p: float
    seed: int

    def time(self, job: int, client: int, duration: float) -> float | None:
        if self.p == 0:
            return None
        rng = numpy_rng(self.seed, Stream.SYSTEMS, job, client)
        return float(rng.uniform(0.0, duration)) if rng.random() < self.p else None


class AvailabilityParams(Params):
    """When clients can be reached (`online`/`offline`, not YAML's boolean words `on`/`off`)."""

    kind: Literal["always", "windows", "bernoulli"] = Field(
        "always", description="always; windows: each client online `online` s then offline `offline` s, in turn; "
                              "bernoulli: "
                              "in each `period` of seconds a client is available with probability `p`")
    online: float | None = Field(None, gt=0, description="windows: seconds available per cycle")
    offline: float | None = Field(None, ge=0, description="windows: seconds away per cycle")
    phase: Literal["random", "zero"] | None = Field(None, description="windows: each client's cycle offset, drawn "
                                                                      "once per client (random, the default) or 0")
    p: float | None = Field(None, ge=0, le=1, description="bernoulli: probability of being available in a period")
    period: float | None = Field(None, gt=0, description="bernoulli: seconds per period")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> AvailabilityParams:
        takes = {"always": (), "windows": ("online", "offline", "phase"), "bernoulli": ("p", "period")}[self.kind]
        missing = [f for f in takes if f != "phase" and getattr(self, f) is None]
        if missing:
            raise ValueError(f"kind {self.kind} needs {' and '.join(missing)}")
        stray = [f for f in ("online", "offline", "phase", "p", "period")
                 if f not in takes and getattr(self, f) is not None]
        if stray:
            raise ValueError(f"{stray[0]} does not apply to kind {self.kind}, which takes "
                             f"{', '.join(takes) or 'nothing else'}")
        return self

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dump the kind and the fields it takes (`{kind: always}`, not a row of nulls)."""
        return {k: v for k, v in handler(self).items() if v is not None}

    def build(self, num_clients: int, rng: np.random.Generator) -> Availability:
        """The availability model, with windows' phases (or the bernoulli key) drawn from the profile's stream."""
        if self.kind == "windows" and self.offline:
            assert self.online is not None
            cycle = self.online + self.offline
            phase = np.zeros(num_clients) if self.phase == "zero" else rng.uniform(0.0, cycle, num_clients)
            return Windows(self.online, self.offline, phase)
        if self.kind == "bernoulli" and self.p != 1:
            assert self.p is not None and self.period is not None
            return PerPeriod(self.p, self.period, key_from_seed(int(rng.integers(2**62))))
        return AlwaysAvailable()
