"""The virtual clock: a discrete-event loop over simulated seconds.

Events are plain data (time, kind, payload) kept in a heap, ordered by time and then by the order they were
scheduled, so runs are deterministic. `RealTimeClock` runs the same protocols on real devices, where results
arrive when they arrive. A protocol (synchronous rounds now; buffered, fixed-period and Poisson-clock
protocols later) is an event handler: it reacts to each event and schedules the next ones.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol


@dataclass(order=True, frozen=True)
class Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    payload: dict[str, Any] = field(compare=False, default_factory=dict)


class EventHandler(Protocol):
    def handle(self, event: Event, clock: Clock) -> None: ...


class Clock:
    """A heap of pending events and the current simulated time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[Event] = []
        self._seq = 0
        self._stopped = False

    def schedule(self, delay: float, kind: str, **payload: Any) -> Event:
        """Schedule an event `delay` simulated seconds from now."""
        if delay < 0:
            raise ValueError(f"cannot schedule an event in the past (delay {delay})")
        event = Event(self.now + delay, self._seq, kind, payload)
        self._seq += 1
        heapq.heappush(self._queue, event)
        return event

    def stop(self) -> None:
        """End the run after the event being handled."""
        self._stopped = True

    @property
    def stopped(self) -> bool:
        """Whether the handler stopped the clock (false when the queue simply emptied)."""
        return self._stopped

    def run(self, handler: EventHandler, after: Callable[[Clock], None] | None = None) -> None:
        """Deliver events in time order until the queue is empty or the handler stops the clock; `after` is called
        after each event (where a run may checkpoint: between events the whole state is at rest)."""
        while self._queue and not self._stopped:
            event = heapq.heappop(self._queue)
            self.now = event.time
            handler.handle(event, self)
            if after is not None:
                after(self)

    def pending(self) -> list[Event]:
        """The events not delivered yet, in delivery order."""
        return sorted(self._queue)

    def state_dict(self) -> dict[str, Any]:
        """The time, the pending events (in delivery order) and the event counter."""
        return {"now": self.now, "seq": self._seq, "queue": sorted(self._queue), "stopped": self._stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.now, self._seq, self._stopped = state["now"], state["seq"], state["stopped"]
        self._queue = list(state["queue"])
        heapq.heapify(self._queue)


class Arrivals(Protocol):
    """Where a real-time clock learns that jobs finished: a runtime whose jobs run on real devices."""

    def wait_arrival(self, timeout: float | None) -> int | None:
        """Block until some submitted job's result arrives (up to `timeout` seconds); its job id, or None."""
        ...


class RealTimeClock(Clock):
    """A clock for asynchronous protocols on real devices (Flower nodes): a job's arrival is delivered when its
    result actually arrives, whatever duration the protocol scheduled it with, and `now` is real seconds since
    the run began; other events (starts, ticks) fire at their times, waited for in real time."""

    def __init__(self, arrivals: Arrivals) -> None:
        super().__init__()
        self.arrivals = arrivals
        self.awaiting: dict[int, Event] = {}
        """Arrival events by job id, delivered when that job's result comes."""

    def schedule(self, delay: float, kind: str, **payload: Any) -> Event:
        if kind != "arrival" or "job" not in payload:
            return super().schedule(delay, kind, **payload)
        event = Event(math.inf, self._seq, kind, payload)
        self._seq += 1
        self.awaiting[payload["job"].id] = event
        return event

    def run(self, handler: EventHandler, after: Callable[[Clock], None] | None = None) -> None:
        began = time.monotonic()
        while (self._queue or self.awaiting) and not self._stopped:
            now = time.monotonic() - began
            if self._queue and (self._queue[0].time <= now or not self.awaiting):
                event = heapq.heappop(self._queue)
                time.sleep(max(0.0, event.time - now))
            else:
                job = self.arrivals.wait_arrival(self._queue[0].time - now if self._queue else None)
                if job is None:
                    continue
                event = replace(self.awaiting.pop(job), time=time.monotonic() - began)
            self.now = event.time
            handler.handle(event, self)
            if after is not None:
                after(self)
