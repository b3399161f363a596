"""Asynchronous throughput at scale: FedBuff over 100,000 generated clients with 1,000 in flight, against
synchronous FedAvg with 1,000 clients a round, on the same machine in one run.

What: each configuration runs in its own fresh process (`synthetic_population`, logistic regression, the
vectorized runtime, lognormal device speeds, evaluation only at the end on a fixed sample of 1,000 clients) and
reports its wall seconds, the client updates it applied and its peak RSS; events per second count the events its
clock handled (FedBuff: one start and one arrival per job, no job being refused here; synchronous: one arrival
per job and one start per round). Both do the same number of client
updates. Why: an asynchronous run handles its jobs one arrival at a time, but runs them batched
(`fedsim.async_jobs`), so its throughput should stay within a small factor of synchronous vectorized rounds
(target: at least half), and its memory should follow the clients in flight, not the population. The two run
alternately, twice each, and each reports its faster trial (a shared machine's load shifts between runs).
Nothing is asserted; the last line is one JSON object of figures, including `"async_over_sync_updates_per_s"`.
`--quick` runs 10,000 clients with 100 in flight.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = """
import json, pathlib, resource, sys, time
import fedsim
began = time.perf_counter()
result = fedsim.run(json.loads(sys.argv[1]), write=False)
seconds = time.perf_counter() - began
last = result.metrics.last()
report = {"seconds": seconds, "updates": last["client_updates"], "steps": last["round"], "loss": last["loss"],
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
pathlib.Path(sys.argv[2]).write_text(json.dumps(report))
"""


def scenario(num_clients: int, concurrency: int, updates: int, protocol: dict) -> dict:
    """FedAvg's local SGD on a generated population; `updates` client updates in all."""
    rounds = updates // concurrency if protocol["name"] == "synchronous" else updates // protocol["buffer_size"]
    return {"name": "asynchronous", "seed": 0, "rounds": rounds, "num_clients": num_clients,
            "clients_per_round": concurrency, "data": {"name": "synthetic_population"}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 10}, "protocol": protocol,
            "systems": {"name": "lognormal", "speed_sigma": 0.5}, "runtime": {"name": "vectorized"},
            "evaluation": {"every": rounds, "clients": 1000}}


def measure(config: dict) -> dict:
    """Run the worker in a fresh process; it writes its report to a file."""
    with tempfile.TemporaryDirectory() as directory:
        report = Path(directory) / "report.json"
        subprocess.run([sys.executable, "-c", WORKER, json.dumps(config), str(report)], check=True)
        return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 clients, 100 in flight")
    args = parser.parse_args()
    clients, concurrency = (10_000, 100) if args.quick else (100_000, 1000)
    updates = 10 * concurrency
    buffer = concurrency // 10
    configs = {"sync": scenario(clients, concurrency, updates, {"name": "synchronous"}),
               "fedbuff": scenario(clients, concurrency, updates, {"name": "fedbuff", "buffer_size": buffer})}
    trials = [{name: measure(config) for name, config in configs.items()} for _ in range(2)]
    runs = {name: min((t[name] for t in trials), key=lambda r: r["seconds"]) for name in configs}
    figures: dict[str, float] = {}
    runs["sync"]["events"] = runs["sync"]["updates"] + runs["sync"]["steps"] + 1
    runs["fedbuff"]["events"] = runs["fedbuff"]["updates"] + 1
    for name, r in runs.items():
        rate, events = r["updates"] / r["seconds"], r["events"] / r["seconds"]
        print(f"{name:8s} {clients:,} clients, {concurrency:,} in flight: {r['updates']:,} client updates in "
              f"{r['seconds']:.1f} s ({rate:,.0f}/s), {events:,.0f} events/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"final loss {r['loss']:.4f}")
        figures[f"{name}_updates_per_s"] = round(rate, 1)
        figures[f"{name}_events_per_s"] = round(events, 1)
        figures[f"{name}_peak_rss_mb"] = round(r["peak_rss_mb"], 1)
    figures["async_over_sync_updates_per_s"] = round(figures["fedbuff_updates_per_s"] / figures["sync_updates_per_s"],
                                                     3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
