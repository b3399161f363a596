"""`fedsim.run`: a scenario file (or mapping) in, a federated run out, from Python or the command line."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsim.clock import Clock
from fedsim.errors import FedsimError
from fedsim.metrics_table import MetricsTable
from fedsim.outputs import RunDirectory, choose_run_dir
from fedsim.preflight import check_scenario
from fedsim.progress import make_progress
from fedsim.recording import Recorder
from fedsim.report import final_rows, format_table, write_plot
from fedsim.runtime import mpi
from fedsim.scenario import ResolvedScenario, load_scenarios, naming_variant
from fedsim.simulation import Simulation, build_simulation


@dataclass
class RunResult:
    """What a run produced: the metrics table (a `variant` column tells variants apart), the resolved scenarios,
    the run directory (None when nothing was written) and notices for the user."""

    metrics: MetricsTable
    scenarios: list[ResolvedScenario]
    out_dir: Path | None
    notices: list[str]

    def summary(self) -> str:
        return format_table(self.metrics.rows)


def run(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
        variants: Sequence[str] | None = None, out: str | Path | None = None, overwrite: bool = False,
        write: bool = True, progress: bool = False, echo: Callable[[str], None] | None = None) -> RunResult:
    """Run every variant of a scenario. Everything is validated (`check`) and built before training starts, and the
    run directory is created only then, so bad input leaves nothing behind. Under `mpiexec` every rank runs this and
    returns the same metrics; only rank 0 writes and shows progress."""
    lead = mpi.rank() == 0
    write, progress = write and lead, progress and lead
    scenarios, notices, out_path = check(source, overrides, variants, out, overwrite, write)
    sims = build_all(scenarios)
    notices += [n for sim in sims for n in sim.notices]
    if echo and lead:
        for notice in notices:
            echo(f"note: {notice}")
    first = scenarios[0].spec
    run_dir = RunDirectory(out_path) if out_path is not None else None
    if run_dir:
        run_dir.write_scenario([s.to_dict() for s in scenarios], [s.variant for s in scenarios])
        run_dir.write_json("run.json", {
            "seed": first.seed, "variants": [s.variant for s in scenarios], "fedsim": _version(),
            "torch": torch.__version__, "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    rows = []
    for sim in sims:
        rows += _run_one(sim, run_dir, progress)
    if run_dir:
        run_dir.write_json("summary.json", final_rows(rows))
        if any(s.spec.output.plot for s in scenarios):
            write_plot(rows, run_dir.path / "plot.png", first.name)
    return RunResult(MetricsTable(rows), scenarios, run_dir.path if run_dir else None, notices)


def check(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
          variants: Sequence[str] | None = None, out: str | Path | None = None, overwrite: bool = False,
          write: bool = True) -> tuple[list[ResolvedScenario], list[str], Path | None]:
    """Validate a scenario without running it: every variant's fields, memory and data files, and the run
    directory (when `write`). Returns the resolved variants, notices, and the run directory a run would use."""
    scenarios, notices = load_scenarios(source, overrides, variants)
    for scenario in scenarios:
        check_scenario(scenario)
    first = scenarios[0].spec
    setting = "--out" if out is not None else "output.dir"
    out_path = choose_run_dir(first.output.dir if out is None else out, first.name, overwrite, setting) \
        if write else None
    return scenarios, notices, out_path


def build_all(scenarios: Sequence[ResolvedScenario]) -> list[Simulation]:
    """Build every variant's simulation up front (so a bad data directory fails before any training); variants
    with the same data and partition share one copy of the data."""
    sims: list[Simulation] = []
    cache: dict[str, Simulation] = {}
    for s in scenarios:
        key = json.dumps([s.spec.seed, s.spec.num_clients, s.components["data"].as_dict(),
                          s.components["partition"].as_dict()], sort_keys=True)
        with naming_variant(s.declared_name):
            sims.append(build_simulation(s, data=cache[key].data if key in cache else None))
        cache.setdefault(key, sims[-1])
    return sims


def _run_one(sim: Simulation, run_dir: RunDirectory | None, progress: bool) -> list[dict[str, Any]]:
    spec = sim.scenario.spec
    recorder = Recorder(sim.scenario.variant, sim.evaluator,
                        sink=(lambda row: run_dir.append_metrics([row])) if run_dir else (lambda row: None),
                        progress=make_progress(progress, sim.scenario.variant, spec.rounds))
    component = sim.scenario.components["protocol"]
    clock = Clock()
    threads = torch.get_num_threads()
    torch.set_num_threads(sim.runtime.threads)
    try:
        protocol = component.entry.obj(component.params, sim, recorder)
        protocol.start(clock)
        clock.run(protocol)
    finally:
        torch.set_num_threads(threads)
        recorder.progress.close()
    if not clock.stopped:
        raise FedsimError(f"variant {sim.scenario.variant}: protocol {component.name!r} ran out of events at "
                          f"simulated time {clock.now:.6g} s before its budget was spent; its metrics so far are kept")
    return recorder.rows


def _version() -> str:
    from fedsim import __version__

    return __version__
