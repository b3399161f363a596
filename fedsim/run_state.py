"""One variant's run state in one place, and when it is saved.

`RunState` gathers every holder of run state (the protocol with its server state and jobs in flight, the clock
and its queue, the recorded rows, the client and codec state stores, the runtime's bookkeeping): its
`state_dict()` is plain data (`fedsim.state_tree`), and `load_state_dict` puts a run back exactly where it was.
Keyed seeding means no generator state exists to save.

`Checkpointing` is called by the clock between events: it saves every `checkpoint.every` server steps or
`checkpoint.sim_seconds` simulated seconds, else every `checkpoint.wall_seconds` real seconds (so short runs
write none), and at once when the process receives SIGINT or SIGTERM, after which the run stops with
`RunInterrupted`. Every MPI rank takes the same decision at the same event.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim import checkpoint
from fedsim.clock import Clock
from fedsim.errors import RunInterrupted
from fedsim.recording import Recorder

if TYPE_CHECKING:
    from fedsim.protocol import ProtocolBase
    from fedsim.scenario import CheckpointSpec
    from fedsim.simulation import Simulation


class RunState:
    """Every holder of one variant's run state."""

    def __init__(self, sim: Simulation, protocol: ProtocolBase, clock: Clock, recorder: Recorder) -> None:
        self.sim, self.protocol, self.clock, self.recorder = sim, protocol, clock, recorder

    def state_dict(self) -> dict[str, Any]:
        sim = self.sim
        return {"protocol": self.protocol.state_dict(), "clock": self.clock.state_dict(),
                "recorder": self.recorder.state_dict(), "client_states": sim.states.state_dict(),
                "codec_states": sim.codec_states.state_dict(), "runtime": sim.runtime.state_dict(),
                "privacy": {} if sim.privacy is None else sim.privacy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sim = self.sim
        self.protocol.load_state_dict(state["protocol"])
        self.clock.load_state_dict(state["clock"])
        self.recorder.load_state_dict(state["recorder"])
        sim.states.load_state_dict(state["client_states"])
        sim.codec_states.load_state_dict(state["codec_states"])
        sim.runtime.load_state_dict(state["runtime"])
        if sim.privacy is not None:
            sim.privacy.load_state_dict(state["privacy"])


class SignalFlag:
    """While active, SIGINT and SIGTERM are recorded instead of ending the process (main thread only; elsewhere
    the default handlers stay)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame: object) -> None:
        self.received = signum


class Checkpointing:
    """Saves a variant's `RunState` into the run directory when due (see the module docstring)."""

    def __init__(self, root: Path, spec: CheckpointSpec, variant: str, state: RunState, signals: SignalFlag,
                 ranks: checkpoint.Collective) -> None:
        self.root, self.spec, self.variant, self.state = root, spec, variant, state
        self.signals, self.ranks = signals, ranks
        self.last_steps, self.last_time, self.last_wall = 0, 0.0, time.monotonic()

    def restored(self) -> None:
        """Count intervals from the restored point."""
        self.last_steps, self.last_time = self.state.protocol.server_steps, self.state.clock.now

    def after_event(self, clock: Clock) -> None:
        if clock.stopped:
            return
        due, signum = self._due(clock), self.signals.received
        if self.ranks.comm is not None:
            votes = self.ranks.gather((due, signum))
            due, signum = any(d for d, _ in votes), next((s for _, s in votes if s is not None), None)
        if not (due or signum):
            return
        steps = self.state.protocol.server_steps
        path = self.save(clock)
        if signum:
            raise RunInterrupted(f"variant {self.variant}: interrupted by {signal.Signals(signum).name} at server step "
                                 f"{steps} (simulated {clock.now:.6g} s); saved {path}; continue with: fedsim run "
                                 f"--resume {self.root}", signum)

    def save(self, clock: Clock) -> Path:
        steps = self.state.protocol.server_steps
        info = {"variant": self.variant, "server_steps": steps, "sim_time": clock.now}
        path = checkpoint.save(self.root, self.state.state_dict(), info, self.ranks)
        self.last_steps, self.last_time, self.last_wall = steps, clock.now, time.monotonic()
        return path

    def _due(self, clock: Clock) -> bool:
        spec, steps = self.spec, self.state.protocol.server_steps
        if spec.every is None and spec.sim_seconds is None:
            return self.ranks.rank == 0 and spec.wall_seconds > 0 and \
                time.monotonic() - self.last_wall >= spec.wall_seconds
        by_steps = spec.every is not None and steps // spec.every > self.last_steps // spec.every
        by_time = spec.sim_seconds is not None and clock.now // spec.sim_seconds > self.last_time // spec.sim_seconds
        return by_steps or by_time
