"""Per-round time of every registered algorithm relative to FedAvg, on one workload under the vectorized runtime.

What: each name in `fedsim.clients.ALGORITHMS` (its default server rule and hyperparameters, FedProx with mu 0.01
so that its prox term is computed, pFedMe with K = 5) trains the same workload: fedsim's `synthetic_iid` (seed 1,
split `iid`) over 100 clients of exactly 100 training samples, a 60-200-10 MLP, 20 clients per round, 2 local
epochs of batch 10 (20 local steps per client and round), lr 0.01, `runtime: {name: vectorized, threads: 1}`.

Why: a rule declares `step_cost`, the minibatch gradient evaluations one local step takes (SGD 1, SAM 2, pFedMe
K + 1), and the virtual clock charges its work by it. The table prints each algorithm's measured time over FedAvg's
next to its step_cost, so a reader sees whether wall time follows the cost model: per round, and per local step.
A round also holds work that step_cost does not count (the server's aggregation and update, the broadcast, client
state, gathering minibatches), which pulls the per-round ratios towards 1; so every algorithm also runs the same
rounds with `local_steps: 1`, and the seconds a local step adds are (round - one-step round) / (steps - 1), the rest
of a round ("other") the one-step round less one step. A step's wall time follows the number of gradient calls and
other tensor ops more than the gradients' arithmetic (at batch 10 a call is mostly fixed cost), so a step that
splits its minibatch (Per-FedAvg) or adds vector updates (pFedMe's K prox steps) can cost more than its step_cost
says. The script never asserts on times.

How time is measured: every simulation (per algorithm, with the workload's local steps and with one) is built as
`fedsim.run` builds it (the data built once and shared) and its protocol runs on the virtual clock as `fedsim.run`
runs it, in a thread of its own that pauses at the protocol's progress hook, each time a round's jobs have run. The
main thread hands out turns: per round, every simulation runs one round while the others wait, the order rotating
by one every round, so load from other work on the machine falls on all of them alike. A turn is timed with
`time.perf_counter` from its resumption to the pause: the previous round's aggregation and server update, the
broadcast, and the round's local training. Round 0 (first calls, the first evaluation) is not timed, nor is the
final aggregation and evaluation; with evaluation only before round 0 and after the last, no timed round holds an
evaluation (of the global model, nor of the personal models of pFedMe, Ditto, Per-FedAvg). Per algorithm and timed
round (rounds 1 to R - 1 of each of `--repetitions` runs, default 3), its seconds (per round, per step) over
FedAvg's in the same round: the table prints the medians of those ratios and their quartiles, and the median
seconds.

Usage: `python benchmarks/algorithms.py` (1 to 2 minutes on 2 CPU cores) or `--quick` (8 clients per round, 1
epoch, 3 rounds, 1 repetition: a smoke test of seconds). The last line printed is one JSON object of ratios
`"A_over_fedavg"` = per-round time of A / that of FedAvg.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from sequential import HIDDEN, NUM_CLASSES, NUM_CLIENTS, NUM_FEATURES, SEED, TRAIN_PER_CLIENT, keep_fraction_test

from fedsim.clients import ALGORITHMS
from fedsim.clock import Clock
from fedsim.data import ClientDataSource
from fedsim.errors import FedsimError
from fedsim.recording import Progress, Recorder, Row
from fedsim.scenario import load_scenarios
from fedsim.simulation import Simulation, build_simulation

BASELINE = "fedavg"
LR = 0.01
BATCH_SIZE = 10
HYPERPARAMETERS: dict[str, dict[str, Any]] = {"fedprox": {"mu": 0.01}, "pfedme": {"K": 5}}
"""Settings other than the defaults, per algorithm (FedProx's default mu 0 skips its prox term)."""


@dataclass(frozen=True)
class Settings:
    rounds: int
    repetitions: int
    clients_per_round: int
    local_epochs: int
    threads: int = 1


FULL = Settings(rounds=12, repetitions=3, clients_per_round=20, local_epochs=2)
QUICK = Settings(rounds=3, repetitions=1, clients_per_round=8, local_epochs=1)
"""8 clients per round: the vectorized runtime's default `min_batch`, below which clients step one at a time."""


def scenario(algorithm: str, settings: Settings, test_fraction: float,
             local_steps: int | None = None) -> dict[str, Any]:
    """The workload as a scenario (`local_steps` replaces the local epochs); the algorithm's registered server rule
    and protocol are its defaults."""
    return {
        "name": f"bench-{algorithm}", "seed": SEED, "rounds": settings.rounds, "num_clients": NUM_CLIENTS,
        "clients_per_round": settings.clients_per_round,
        "data": {"name": "synthetic_iid", "num_features": NUM_FEATURES, "num_classes": NUM_CLASSES,
                 "test_fraction": test_fraction},
        "partition": {"name": "iid"},
        "model": {"name": "mlp", "hidden": [HIDDEN]},
        "algorithm": {"name": algorithm, "lr": LR, "batch_size": BATCH_SIZE, "local_epochs": settings.local_epochs,
                      "local_steps": local_steps, **HYPERPARAMETERS.get(algorithm, {})},
        "runtime": {"name": "vectorized", "threads": settings.threads},
        "evaluation": {"every": settings.rounds},
        "output": {"plot": False},
    }


def build(mapping: dict[str, Any], data: ClientDataSource | None) -> Simulation:
    resolved, _ = load_scenarios(mapping)
    return build_simulation(resolved[0], data=data)


def run_protocol(sim: Simulation, progress: Progress) -> None:
    """Run the simulation's protocol on the virtual clock to its budget, as `fedsim.run` does."""
    component = sim.scenario.components["protocol"]
    protocol = component.entry.obj(component.params, sim, Recorder(sim.scenario.variant, sim.evaluator,
                                                                   progress=progress))
    clock = Clock()
    protocol.start(clock)
    clock.run(protocol)


class LockStep(Progress):
    """One simulation's protocol in a thread of its own that pauses each time a round's jobs have run (the
    protocol's progress hook), so that every algorithm's simulation advances one round per turn; it times the work
    of each turn: the previous round's aggregation, the broadcast and the round's local training."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.seconds: list[float] = []
        """Per turn that ended at a round's jobs: seconds of work. Turn 0 (round 0) includes the first evaluation."""
        self.finished = False
        self.error: BaseException | None = None
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self._resumed = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def turn(self) -> None:
        """Let the protocol run until its next round's jobs have run, or to its end; re-raise what it raised."""
        self._go.release()
        self._back.acquire()
        if self.error is not None:
            raise self.error

    def advance(self, round_index: int, row: Row | None) -> None:
        self.seconds.append(time.perf_counter() - self._resumed)
        self._back.release()
        self._go.acquire()
        self._resumed = time.perf_counter()

    def _run(self) -> None:
        self._go.acquire()
        self._resumed = time.perf_counter()
        try:
            run_protocol(self.sim, self)
        except BaseException as error:  # handed to the main thread by `turn`
            self.error = error
        finally:
            self.finished = True
            self._back.release()


def lock_step(drivers: list[LockStep]) -> None:
    """Give every driver a turn per round, the order rotating by one every round, until all have finished."""
    turn = 0
    while active := [d for d in drivers if not d.finished]:
        shift = turn % len(active)
        for driver in active[shift:] + active[:shift]:
            driver.turn()
        turn += 1


@dataclass
class Result:
    """One algorithm: per timed round (rounds 1 to R - 1 of every repetition, in order) its seconds with the
    workload's local steps and with one local step, what the clock charges one of its steps, its runtime."""

    name: str
    step_cost: int
    runtime: str
    seconds: list[float] = field(default_factory=list)
    one_step: list[float] = field(default_factory=list)

    def per_step(self, steps: int) -> list[float]:
        """Per timed round, the seconds one more local step adds: (full round - one-step round) / (steps - 1)."""
        return [(s - o) / (steps - 1) for s, o in zip(self.seconds, self.one_step, strict=True)]


def paired(values: list[float], base: list[float]) -> list[float]:
    """Per timed round, a value over the baseline's in the same round and repetition."""
    return [v / b for v, b in zip(values, base, strict=True)]


def runtime_name(sim: Simulation) -> str:
    return type(sim.runtime).__name__.removesuffix("Runtime").lower()


def runnable(names: list[str], settings: Settings, test_fraction: float) -> list[str]:
    """The algorithms whose scenario validates; one that needs another protocol or other data is left out, saying
    why in one line."""
    kept = []
    for name in names:
        try:
            load_scenarios(scenario(name, settings, test_fraction))
        except FedsimError as error:
            print(f"skipped: {name}: {error}")
        else:
            kept.append(name)
    return kept


def bench(names: list[str], settings: Settings, test_fraction: float) -> dict[str, Result]:
    """Every algorithm's simulation, with the workload's local steps and with one, all advancing round by round in
    turns; `settings.repetitions` times."""
    data = build(scenario(BASELINE, settings, test_fraction), None).data
    if not (data.train_sizes == TRAIN_PER_CLIENT).all():
        raise SystemExit(f"expected {TRAIN_PER_CLIENT} training samples per client, got {set(data.train_sizes)}")
    results: dict[str, Result] = {}
    for rep in range(settings.repetitions):
        sims = {(name, steps): build(scenario(name, settings, test_fraction, steps), data)
                for name in names for steps in (None, 1)}
        drivers = {key: LockStep(sim) for key, sim in sims.items()}
        lock_step(list(drivers.values()))
        for (name, steps), driver in drivers.items():
            sim = sims[name, steps]
            result = results.setdefault(name, Result(name, sim.rule.step_cost, runtime_name(sim)))
            (result.seconds if steps is None else result.one_step).extend(driver.seconds[1:])
        print(f"repetition {rep + 1}: median s/round " + ", ".join(
            f"{name} {statistics.median(d.seconds[1:]):.4f}" for (name, steps), d in drivers.items() if steps is None),
              flush=True)
    return results


def quartiles(values: list[float]) -> str:
    low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return f"{low:.2f}-{high:.2f}"


def format_table(results: dict[str, Result], steps: int) -> str:
    """Per algorithm: the clock's charge per step, seconds per round and per local step, both over FedAvg's
    (medians of the per-round ratios, with their quartiles), and the round's cost besides its local steps."""
    base = results[BASELINE]
    lines = [f"{'algorithm':<22} {'step_cost':>9} {'s/round':>8} {'x fedavg':>8} {'quartiles':>10} {'ms/step':>8} "
             f"{'x fedavg':>8} {'quartiles':>10} {'other ms/round':>14}  runtime"]
    rows = sorted(results.values(),
                  key=lambda r: (r.name != BASELINE, r.step_cost, statistics.median(paired(r.seconds, base.seconds))))
    for r in rows:
        rounds, per_step = paired(r.seconds, base.seconds), paired(r.per_step(steps), base.per_step(steps))
        step = statistics.median(r.per_step(steps))
        other = statistics.median(r.one_step) - step
        lines.append(f"{r.name:<22} {r.step_cost:>9} {statistics.median(r.seconds):>8.4f} "
                     f"{statistics.median(rounds):>8.2f} {quartiles(rounds):>10} {step * 1e3:>8.2f} "
                     f"{statistics.median(per_step):>8.2f} {quartiles(per_step):>10} {other * 1e3:>14.1f}  {r.runtime}")
    return "\n".join(lines)


def ratios(results: dict[str, Result], steps: int) -> dict[str, float]:
    """Per algorithm, `A_over_fedavg` (per round) and `A_step_over_fedavg_step` (per local step)."""
    base = results[BASELINE]
    out: dict[str, float] = {}
    for name, r in results.items():
        if name != BASELINE:
            out[f"{name}_over_{BASELINE}"] = statistics.median(paired(r.seconds, base.seconds))
            out[f"{name}_step_over_{BASELINE}_step"] = statistics.median(paired(r.per_step(steps),
                                                                                base.per_step(steps)))
    return {k: round(v, 4) for k, v in out.items()}


def load() -> str:
    """The 1-minute load average: other work on the machine shows up in every algorithm's times."""
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load average unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 clients per round, 1 epoch, 3 rounds: a smoke test")
    parser.add_argument("--repetitions", type=int, help="timed runs per algorithm (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the vectorized runtime")
    args = parser.parse_args(argv)
    settings = replace(QUICK if args.quick else FULL, threads=args.threads)
    if args.repetitions:
        settings = replace(settings, repetitions=args.repetitions)
    names = [BASELINE] + [n for n in ALGORITHMS.names() if n != BASELINE]
    print(f"{len(names)} algorithms, MLP {NUM_FEATURES}-{HIDDEN}-{NUM_CLASSES}, {NUM_CLIENTS} clients x "
          f"{TRAIN_PER_CLIENT} samples (synthetic_iid seed {SEED}, iid), {settings.clients_per_round} per round, "
          f"{settings.local_epochs} epoch(s) of batch {BATCH_SIZE}, lr {LR}; vectorized runtime, {settings.threads} "
          f"thread(s); {settings.rounds} rounds (timed: the last {settings.rounds - 1}, interleaved round by round) x "
          f"{settings.repetitions} repetition(s); torch {torch.__version__}, {os.cpu_count()} CPUs, {load()}",
          flush=True)
    torch.set_num_threads(settings.threads)
    test_fraction = keep_fraction_test(SEED)
    results = bench(runnable(names, settings, test_fraction), settings, test_fraction)
    print(f"done, {load()}")
    steps = settings.local_epochs * math.ceil(TRAIN_PER_CLIENT / BATCH_SIZE)
    print(format_table(results, steps))
    print(json.dumps(ratios(results, steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
