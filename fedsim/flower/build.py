"""The scenario a Flower app runs, and what a process builds from it once: both the ServerApp and every ClientApp
build the same simulation from the same resolved scenario (data, model, rules, codec), each keyed by the seed."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsim.errors import ScenarioError
from fedsim.scenario import ResolvedScenario, load_scenarios
from fedsim.simulation import Simulation, build_simulation

ScenarioSource = str | Path | Mapping[str, Any]


def resolve_one(source: ScenarioSource, overrides: Mapping[str, Any] | None = None,
                variant: str | None = None) -> ResolvedScenario:
    """The one variant a Flower app runs: the scenario's only one, or the one `variant` names."""
    scenarios, _ = load_scenarios(source, overrides, [variant] if variant else None)
    if len(scenarios) != 1:
        names = ", ".join(s.variant for s in scenarios)
        raise ScenarioError(f"--variant: a Flower app runs one variant; choose one of {names}")
    return scenarios[0]


CACHED = 4
"""Simulations a process keeps built (a node serves one scenario; tests run several in one process)."""

_built: dict[str, Simulation] = {}
_lock = threading.Lock()


def built(source: ScenarioSource, overrides: Mapping[str, Any] | None = None) -> Simulation:
    """The simulation a scenario (with `overrides`, e.g. a node's own data directory) builds, built once per
    process and scenario (a ClientApp serves many messages)."""
    key = str(Path(source).resolve()) if isinstance(source, (str, Path)) else json.dumps(source, sort_keys=True)
    key += json.dumps(dict(overrides or {}), sort_keys=True)
    with _lock:
        if key not in _built:
            if len(_built) >= CACHED:
                del _built[next(iter(_built))]
            _built[key] = build_simulation(resolve_one(source, overrides))
        return _built[key]
