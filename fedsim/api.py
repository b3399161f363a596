"""`fedsim.run`: a scenario file (or mapping) in, a federated run out, from Python or the command line."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.checkpoint import Collective, load_latest
from fedsim.clock import Clock
from fedsim.errors import FedsimError, ScenarioError, UsageError
from fedsim.metrics_table import MetricsTable
from fedsim.outputs import RunDirectory, choose_run_dir, read_arrays, read_metrics, scenario_document, timeline_file
from fedsim.preflight import check_scenario
from fedsim.progress import make_progress
from fedsim.recording import OUTCOMES, Recorder, run_variant
from fedsim.report import final_rows, format_table, targets_of, write_pictures
from fedsim.run_state import Checkpointing, RunState, SignalFlag
from fedsim.runtime import mpi
from fedsim.runtime.base import torch_threads
from fedsim.scenario import ResolvedScenario, load_scenarios, naming_variant
from fedsim.simulation import Simulation, build_simulation
from fedsim.timeline import target_of, variant_report


@dataclass
class RunResult:
    """What a run produced: the metrics table (a `variant` column tells variants apart), the resolved scenarios,
    the run directory (None when nothing was written), notices for the user, and each variant's job timeline
    (`JobLog.arrays()`; None for a variant finished before a resume whose run directory holds none)."""

    metrics: MetricsTable
    scenarios: list[ResolvedScenario]
    out_dir: Path | None
    notices: list[str]
    timelines: dict[str, dict[str, np.ndarray] | None] = field(default_factory=dict)

    def summary(self) -> str:
        """The result table, with each variant's simulated seconds to its target when one is set."""
        return format_table(self.metrics.rows, targets_of(self.scenarios))


def run(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
        variants: Sequence[str] | None = None, out: str | Path | None = None, overwrite: bool = False,
        write: bool = True, progress: bool = False, echo: Callable[[str], None] | None = None) -> RunResult:
    """Run every variant of a scenario. Everything is validated (`check`) and built before training starts, and the
    run directory is created only then, so bad input leaves nothing behind. Under `mpiexec` every rank runs this and
    returns the same metrics; only rank 0 writes files and shows progress (every rank saves its checkpoints)."""
    lead = mpi.rank() == 0
    scenarios, notices, out_path = check(source, overrides, variants, out, overwrite, write and lead)
    root = _shared(out_path) if write else None
    sims = build_all(scenarios)
    note = noter(echo, lead)
    notices += [n for sim in sims for n in sim.notices]
    for notice in notices:
        note(notice)
    run_dir = open_run_dir(out_path, scenarios, source, overrides, variants) if out_path is not None else None
    return run_variants(sims, run_dir, root, progress and lead, note, {}, resume=False, notices=notices)


def open_run_dir(out_path: Path, scenarios: Sequence[ResolvedScenario], source: str | Path | Mapping[str, Any],
                 overrides: Mapping[str, Any] | None, variants: Sequence[str] | None) -> RunDirectory:
    """Create the run directory with the resolved scenario and run.json (what `resume` reads back)."""
    first = scenarios[0].spec
    run_dir = RunDirectory(out_path)
    run_dir.write_scenario([s.to_dict() for s in scenarios], [s.variant for s in scenarios])
    run_dir.write_json("run.json", {
        "seed": first.seed, "variants": [s.variant for s in scenarios], "fedsim": _version(),
        "torch": torch.__version__, "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(Path(source).resolve()) if isinstance(source, (str, Path)) else None,
        "overrides": dict(overrides or {}), "selected": list(variants) if variants else None,
    })
    return run_dir


def resume(run_dir: str | Path, progress: bool = False, echo: Callable[[str], None] | None = None) -> RunResult:
    """Continue a stopped run to its end from its last good checkpoint: finished variants are kept, the variant
    that was running resumes where its checkpoint left it (starting over when it has none), metrics.jsonl keeps
    no row twice, and the summary and plot are written at the end. The numbers are those of an uninterrupted run.
    A finished run is left as it is; a scenario file changed since the run started is refused."""
    lead = mpi.rank() == 0
    root = Path(run_dir)
    note = noter(echo, lead)
    meta = _read_json(root / "run.json", root)
    status = _read_json(root / "progress.json", root) if (root / "progress.json").exists() else {"finished": []}
    stored, _ = load_scenarios(root / "scenario.yaml")
    rows = read_metrics(root)
    if status.get("complete"):
        note(f"run {root} is finished; nothing to resume")
        return RunResult(MetricsTable(rows), stored, None, [])
    _check_unchanged(meta, stored, note)
    for scenario in stored:
        check_scenario(scenario)
    sims = build_all(stored)
    notices = [n for sim in sims for n in sim.notices]
    for notice in notices:
        note(notice)
    finished = {v: [r for r in rows if run_variant(r["variant"]) == v] for v in status["finished"]}
    run_dir = RunDirectory(root, keep=[r for r in rows if run_variant(r["variant"]) in finished]) if lead else None
    return run_variants(sims, run_dir, root, progress and lead, note, finished, resume=True, notices=notices)


def run_variants(sims: Sequence[Simulation], run_dir: RunDirectory | None, root: Path | None, progress: bool,
                 note: Callable[[str], None], finished: dict[str, list[dict[str, Any]]], resume: bool,
                 notices: list[str]) -> RunResult:
    """Run the variants not `finished` in order (the first of them from its checkpoint when `resume`), writing
    each finished one's job timeline and recording it in progress.json, then write the summary and pictures (from
    the timelines in the run directory for variants finished before a resume)."""
    rows: list[dict[str, Any]] = []
    timelines: dict[str, dict[str, np.ndarray] | None] = {}
    done = list(finished)
    for sim in sims:
        variant = sim.scenario.variant
        if variant in finished:
            rows += finished[variant]
            timelines[variant] = _read_timeline(run_dir.path / timeline_file(variant)) if run_dir else None
            continue
        variant_rows, timelines[variant] = _run_one(sim, run_dir, root, progress, note, resume)
        rows += variant_rows
        resume = False
        done.append(variant)
        if run_dir:
            run_dir.write_arrays(timeline_file(variant), {**timelines[variant], "outcome_names": np.array(OUTCOMES)})
            run_dir.write_json("progress.json", {"finished": done, "complete": False})
    scenarios = [sim.scenario for sim in sims]
    if run_dir:
        run_dir.write_json("summary.json", summary_document(rows, scenarios, timelines))
        write_pictures(run_dir.path, rows, scenarios, timelines)
        run_dir.write_json("progress.json", {"finished": done, "complete": True})
    return RunResult(MetricsTable(rows), scenarios, run_dir.path if run_dir else None, notices, timelines)


def summary_document(rows: list[dict[str, Any]], scenarios: Sequence[ResolvedScenario],
                     timelines: dict[str, dict[str, np.ndarray] | None]) -> list[dict[str, Any]]:
    """summary.json: each variant's last row with its best accuracy, the simulated seconds, server steps and client
    updates to its target (`time_to_target`, when `evaluation` sets one) and its job figures (`timeline`)."""
    spec = {s.variant: s.spec for s in scenarios}
    def report(last: dict[str, Any]) -> dict[str, Any]:
        variant = run_variant(last["variant"])
        return variant_report([r for r in rows if r["variant"] == last["variant"]], target_of(spec[variant].evaluation),
                              timelines.get(variant), spec[variant].num_clients)

    return [{**last, **report(last)} for last in final_rows(rows)]


def _read_timeline(path: Path) -> dict[str, np.ndarray] | None:
    """A finished variant's job timeline from its .npz file, without the outcome names stored beside it."""
    arrays = read_arrays(path)
    return None if arrays is None else {k: v for k, v in arrays.items() if k != "outcome_names"}


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


def privacy_plan(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                 variants: Sequence[str] | None = None) -> list[tuple[str, str, dict[str, float]]]:
    """What each private variant's whole run would spend, without running it: (variant, mechanism, the noise
    multiplier (calibrated when the scenario gives a target epsilon), sampling rate, planned steps, delta and
    epsilon per accountant). A scenario with no private variant is an error naming the `privacy` field."""
    scenarios, _ = load_scenarios(source, overrides, variants)
    private = [s for s in scenarios if "privacy" in s.components]
    if not private:
        raise ScenarioError("privacy: no variant of this scenario has a privacy section, so there is nothing to "
                            "account")
    plans = []
    for s in private:
        if s.spec.rounds is None:
            raise ScenarioError(f"rounds: fedsim privacy plans a run by its rounds, and variant {s.variant} has only a "
                                f"time budget")
        with naming_variant(s.declared_name):
            spend = build_simulation(s).privacy
        plans.append((s.variant, s.components["privacy"].name, spend.plan()))
    return plans


def build_all(scenarios: Sequence[ResolvedScenario]) -> list[Simulation]:
    """Build every variant's simulation up front (so a bad data directory fails before any training); variants
    with the same data and partition share one copy of the data (under MPI, only those that share clients out to
    ranks alike: striped for client/server protocols, in blocks for gossip)."""
    sims: list[Simulation] = []
    cache: dict[str, Simulation] = {}
    for s in scenarios:
        key = json.dumps([s.spec.seed, s.spec.num_clients, s.components["data"].as_dict(),
                          s.components["partition"].as_dict(),
                          bool(s.components["protocol"].entry.meta.get("peer_to_peer"))], sort_keys=True)
        with naming_variant(s.declared_name):
            sims.append(build_simulation(s, data=cache[key].data if key in cache else None))
        cache.setdefault(key, sims[-1])
    return sims


def _run_one(sim: Simulation, run_dir: RunDirectory | None, root: Path | None, progress: bool,
             note: Callable[[str], None], resume: bool) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """One variant on the virtual clock, returning its metrics rows and job timeline (`JobLog.arrays()`); with a
    run directory (`root`), checkpointed, and restored from its last good checkpoint (rows and timeline so far
    included) when `resume`."""
    spec, variant = sim.scenario.spec, sim.scenario.variant
    recorder = Recorder(variant, sim.evaluator,
                        sink=(lambda row: run_dir.append_metrics([row])) if run_dir else (lambda row: None),
                        progress=make_progress(progress, variant, spec.rounds))
    component = sim.scenario.components["protocol"]
    clock = Clock()
    try:
        with torch_threads(sim.runtime.threads), SignalFlag() as signals:
            protocol = component.entry.obj(component.params, sim, recorder)
            state = RunState(sim, protocol, clock, recorder)
            saving = Checkpointing(root, spec.checkpoint, variant, state, signals, Collective(mpi.world())) \
                if root is not None else None
            if not (resume and saving and _restore(saving, run_dir, note)):
                protocol.start(clock)
            clock.run(protocol, saving.after_event if saving else None)
    finally:
        recorder.progress.close()
    if not clock.stopped:
        raise FedsimError(f"variant {variant}: protocol {component.name!r} ran out of events at "
                          f"simulated time {clock.now:.6g} s before its budget was spent; its metrics so far are kept")
    recorder.timeline.finish(clock.now, clock.pending())
    return recorder.rows, recorder.timeline.arrays()


def _restore(saving: Checkpointing, run_dir: RunDirectory | None, note: Callable[[str], None]) -> bool:
    """Put the variant back where its newest good checkpoint left it (and its rows back in metrics.jsonl);
    False, after saying so, when it has none and must start over."""
    found = load_latest(saving.root, lambda m: m.get("variant") == saving.variant, saving.ranks, note)
    if found is None:
        note(f"variant {saving.variant}: no usable checkpoint; it starts over from the beginning")
        return False
    manifest, state = found
    saving.state.load_state_dict(state)
    saving.restored()
    if run_dir:
        run_dir.append_metrics(saving.state.recorder.rows)
    note(f"variant {saving.variant}: resumed at server step {manifest['server_steps']} (simulated "
         f"{manifest['sim_time']:.6g} s)")
    return True


def _check_unchanged(meta: dict[str, Any], stored: list[ResolvedScenario], note: Callable[[str], None]) -> None:
    """Refuse to resume when the scenario file the run came from now resolves differently (naming the first
    differing field); a file that is gone is replaced by the run directory's copy."""
    source = meta.get("source")
    if source is None:
        return
    if not Path(source).is_file():
        note(f"scenario file {source} is gone; resuming from the run directory's copy")
        return
    current, _ = load_scenarios(source, meta.get("overrides") or None, meta.get("selected"))
    differing = first_difference(scenario_document([s.to_dict() for s in stored], [s.variant for s in stored]),
                                 scenario_document([s.to_dict() for s in current], [s.variant for s in current]))
    if differing is not None:
        raise ScenarioError(f"{differing}: {source} changed since the run started; resuming would not give the "
                            f"uninterrupted run's numbers (start a new run, or restore the file)")


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The dotted path of the first field (in the old document's order, then the new one's) where two plain-data
    documents differ; None when they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return where
            found = first_difference(old[key], new[key], where)
            if found is not None:
                return found
        return None
    return None if old == new else (path or "scenario")


def _shared(out_path: Path | None) -> Path | None:
    """Rank 0's run directory, on every rank (where each rank saves its checkpoint files)."""
    comm = mpi.world()
    return comm.bcast(out_path, root=0) if comm is not None else out_path


def noter(echo: Callable[[str], None] | None, lead: bool) -> Callable[[str], None]:
    """`echo` of "note: ..." lines, on the lead process only."""

    def note(line: str) -> None:
        if echo and lead:
            echo(f"note: {line}")
    return note


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--resume: {root} is not a run directory (no {path.name})") from None
    except (OSError, ValueError) as e:
        raise FedsimError(f"{path}: unreadable ({type(e).__name__})") from None


def _version() -> str:
    from fedsim import __version__

    return __version__
