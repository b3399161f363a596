"""Uplink compression's cost per round and bytes saved, for every compressor, against the uncompressed run.

What: the MLP workload of benchmarks/runtimes.py (FedAvg, 100 clients of exactly 100 training samples each,
`synthetic_iid` seed 1, mlp 60-200-10 = 14,210 parameters, 100 clients per round, 1 local epoch, batch 10, lr
0.01; the scenario of benchmarks/sequential.py) under the vectorized runtime with one torch thread, run once
uncompressed and once per uplink codec (`compression: {uplink: ...}`):
  topk                 `{name: topk, ratio: 0.01}`
  random_k             `{name: random_k, ratio: 0.01}` (unbiased: kept entries scaled by d/k)
  random_k_biased      `{name: random_k, ratio: 0.01, scaling: biased}`
  qsgd                 `{name: qsgd, levels: 4}`
  sign                 `{name: sign}`
  natural              `{name: natural}`
  powersgd             `{name: powersgd, rank: 2}`
  topk_ef14            top-k with `error_feedback: ef14`
  topk_econtrol        top-k with `error_feedback: econtrol` (the first message of each client goes uncompressed,
                       as the paper's method does, and its full bytes count)
The vectorized runtime encodes and decodes a round's 100 messages vmapped over the client axis, so the cost per
round is that of one batched encode and decode (1.42 million entries) next to 100 clients' local training.

Why: compression is meant to save bytes on the uplink without slowing the simulation down. Project target
(reported, never asserted): under the vectorized runtime no compressor makes a round cost more than 1.5x the
uncompressed round.

How time is measured: per run, the simulation is built as `fedsim.run` builds it (outside the timing) and its
protocol driven on fedsim's clock as `fedsim.run` drives it, with `evaluation.every = rounds`; the recorder's sink
stamps wall time (`time.perf_counter`) and this process's CPU time (`time.process_time`) as each metrics row comes
out, and the window is from the round-0 row to the round-R row: R rounds and the final evaluation. Seconds per
round = window / R, in wall time (the figure the target is about) and in CPU time (steadier when other work shares
the machine: it leaves out the time the process waits for a core, though not the slowdown of shared caches).
The data set is built once and shared by every run (as `fedsim.run` shares it between variants). Every
configuration first runs one untimed round (warm-up; with --quick only the uncompressed one), then `--repetitions`
timed runs, the configurations interleaved (the order rotates every repetition), so the uncompressed run shares each
repetition's machine load. Reported per codec: the median seconds per round, its ratio to the uncompressed median,
and the spread of the per-repetition ratios (each codec's run over the uncompressed run of the same repetition: min
to max). Bytes are fedsim's own count, the last row's `bytes_up` (every payload's exact size) over R: per round, and
as a fraction of the uncompressed run's.

Usage: `python benchmarks/compression.py` (10 rounds x 5 repetitions: about two minutes on 2 CPU cores, more
when other work shares the machine; the load average is printed at the start and the end) or `--quick` (2 rounds,
1 repetition: a smoke test of about 10 seconds). The last line printed is one JSON object: per codec
`"<codec>_over_uncompressed"` (wall-time ratio of the medians), `"<codec>_cpu_over_uncompressed"` (CPU-time ratio)
and `"<codec>_bytes_over_uncompressed"`, the uncompressed seconds per round (wall and CPU) and bytes per round, and
`"worst_over_uncompressed"` and `"worst_cpu_over_uncompressed"`, the largest ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from sequential import SEED, Config, keep_fraction_test, scenario

from fedsim.clock import Clock
from fedsim.data import ClientDataSource
from fedsim.recording import Recorder
from fedsim.runtime.base import torch_threads
from fedsim.scenario import ResolvedScenario, load_scenarios
from fedsim.simulation import Simulation, build_simulation

BASELINE = "uncompressed"
CODECS: dict[str, dict[str, Any] | None] = {
    BASELINE: None,
    "topk": {"name": "topk", "ratio": 0.01},
    "random_k": {"name": "random_k", "ratio": 0.01},
    "random_k_biased": {"name": "random_k", "ratio": 0.01, "scaling": "biased"},
    "qsgd": {"name": "qsgd", "levels": 4},
    "sign": {"name": "sign"},
    "natural": {"name": "natural"},
    "powersgd": {"name": "powersgd", "rank": 2},
    "topk_ef14": {"name": "topk", "ratio": 0.01, "error_feedback": "ef14"},
    "topk_econtrol": {"name": "topk", "ratio": 0.01, "error_feedback": "econtrol"},
}
TARGET = 1.5
"""Largest round-time ratio to the uncompressed run the project aims for (reported, never asserted)."""


@dataclass(frozen=True)
class Settings:
    rounds: int
    repetitions: int
    warm_every_codec: bool
    """Whether every configuration runs its warm-up round, or only the uncompressed one."""


FULL = Settings(rounds=10, repetitions=5, warm_every_codec=True)
QUICK = Settings(rounds=2, repetitions=1, warm_every_codec=False)


@dataclass
class Result:
    """One codec's timed runs: wall and CPU seconds per round per repetition, and bytes up per round."""

    bytes_up: float
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def mapping(codec: dict[str, Any] | None, rounds: int, test_fraction: float, threads: int) -> dict[str, Any]:
    """benchmarks/sequential.py's MLP scenario at 100 clients per round, vectorized, with `codec` on the uplink."""
    runtime = {"name": "vectorized", "threads": threads}
    base = {**scenario(Config("mlp", 100), rounds, test_fraction), "runtime": runtime}
    return base if codec is None else {**base, "compression": {"uplink": codec}}


@dataclass
class Runner:
    """Runs the configurations on one data set, built once: `fedsim.run` shares it between variants the same way."""

    test_fraction: float
    threads: int
    data: ClientDataSource | None = None

    def __call__(self, codec: dict[str, Any] | None, rounds: int) -> tuple[float, float, float]:
        """(wall seconds, CPU seconds, bytes up) per round of one run with `codec` on the uplink."""
        resolved, _ = load_scenarios(mapping(codec, rounds, self.test_fraction, self.threads))
        sim = build_simulation(resolved[0], data=self.data)
        self.data = sim.data
        return run_once(resolved[0], sim, rounds)


def run_once(resolved: ResolvedScenario, sim: Simulation, rounds: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, bytes up) per round of one run, driven as `fedsim.run` drives it (without a run
    directory), timed from the round-0 metrics row to the last."""
    stamps: list[tuple[float, float]] = []
    recorder = Recorder(resolved.variant, sim.evaluator,
                        sink=lambda row: stamps.append((time.perf_counter(), time.process_time())))
    component = resolved.components["protocol"]
    clock = Clock()
    with torch_threads(sim.runtime.threads):
        protocol = component.entry.obj(component.params, sim, recorder)
        protocol.start(clock)
        clock.run(protocol)
    (wall0, cpu0), (wall, cpu) = stamps[0], stamps[-1]
    return (wall - wall0) / rounds, (cpu - cpu0) / rounds, float(recorder.rows[-1]["bytes_up"]) / rounds


def measure(settings: Settings, run: Runner) -> dict[str, Result]:
    """Warm up with one round (every configuration, or the uncompressed one), then time the configurations
    interleaved, rotating the order each repetition."""
    for codec in CODECS.values() if settings.warm_every_codec else [None]:
        run(codec, 1)
    names = list(CODECS)
    results: dict[str, Result] = {}
    for rep in range(settings.repetitions):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, cpu, nbytes = run(CODECS[name], settings.rounds)
            result = results.setdefault(name, Result(nbytes))
            result.seconds.append(seconds)
            result.cpu.append(cpu)
    return results


def ratio(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """(median over the uncompressed median, smallest and largest per-repetition ratio)."""
    paired = [s / b for s, b in zip(times, base, strict=True)]
    return statistics.median(times) / statistics.median(base), min(paired), max(paired)


def format_table(results: dict[str, Result]) -> str:
    """Per codec: seconds per round, ratio and spread, in wall and CPU time, and bytes up per round."""
    base = results[BASELINE]
    lines = [f"{'codec':<16} {'s/round':>8} {'x uncompr.':>10} {'spread':>10} {'CPU s/round':>11} {'x uncompr.':>10} "
             f"{'spread':>10} {'bytes up/round':>15} {'x bytes':>8}"]
    for name, r in results.items():
        (wall, wlow, whigh), (cpu, clow, chigh) = ratio(r.seconds, base.seconds), ratio(r.cpu, base.cpu)
        lines.append(f"{name:<16} {statistics.median(r.seconds):>8.4f} {wall:>10.2f} {f'{wlow:.2f}-{whigh:.2f}':>10} "
                     f"{statistics.median(r.cpu):>11.4f} {cpu:>10.2f} {f'{clow:.2f}-{chigh:.2f}':>10} "
                     f"{r.bytes_up:>15,.0f} {r.bytes_up / base.bytes_up:>8.4f}")
    return "\n".join(lines)


def figures(results: dict[str, Result]) -> dict[str, float]:
    """The JSON line: the uncompressed round's seconds and bytes, each codec's ratios to them, the worst ratios."""
    base = results[BASELINE]
    out: dict[str, float] = {"uncompressed_s_per_round": round(statistics.median(base.seconds), 5),
                             "uncompressed_cpu_s_per_round": round(statistics.median(base.cpu), 5),
                             "uncompressed_bytes_up_per_round": base.bytes_up}
    codecs = [name for name in results if name != BASELINE]
    for name in codecs:
        out[f"{name}_over_uncompressed"] = round(ratio(results[name].seconds, base.seconds)[0], 4)
        out[f"{name}_cpu_over_uncompressed"] = round(ratio(results[name].cpu, base.cpu)[0], 4)
        out[f"{name}_bytes_over_uncompressed"] = round(results[name].bytes_up / base.bytes_up, 5)
    out["worst_over_uncompressed"] = max(out[f"{name}_over_uncompressed"] for name in codecs)
    out["worst_cpu_over_uncompressed"] = max(out[f"{name}_cpu_over_uncompressed"] for name in codecs)
    return out


def load() -> str:
    """The 1-minute load average: other work on the machine shows up in every run's times."""
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load average unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, one repetition: a smoke test")
    parser.add_argument("--repetitions", type=int, help="timed runs per codec (default 5, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the vectorized runtime")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.repetitions:
        settings = Settings(settings.rounds, args.repetitions, settings.warm_every_codec)
    print(f"FedAvg mlp 60-200-10, 100 clients x 100 samples, 100 per round, vectorized runtime ({args.threads} "
          f"thread); {settings.rounds} rounds x {settings.repetitions} repetitions; torch {torch.__version__}; "
          f"{load()}")
    results = measure(settings, Runner(keep_fraction_test(SEED), args.threads))
    print(format_table(results))
    out = figures(results)
    worst = max(CODECS.keys() - {BASELINE}, key=lambda n: out[f"{n}_over_uncompressed"])
    verdict = "meets" if out["worst_over_uncompressed"] <= TARGET else "misses"
    print(f"slowest: {worst} at {out['worst_over_uncompressed']:.2f}x the uncompressed round in wall time "
          f"({verdict} the {TARGET}x target), {out[f'{worst}_cpu_over_uncompressed']:.2f}x in CPU time; worst in "
          f"CPU time {out['worst_cpu_over_uncompressed']:.2f}x; {load()}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
