"""Peak memory (RSS) of fedsim runs: a 1,000,000-client population, and MPI with 2 ranks against 1 process.

What: each configuration runs in its own fresh process (under `mpiexec -n 2` for the MPI cases), which reports
its own peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and final loss. Why: memory must be
bounded by the clients in flight, not the population, and an MPI rank should hold about its shard. Workloads,
FedAvg with logistic regression under the vectorized runtime:
  population  a generated population (`synthetic_population`, clients made on demand), evaluated on a fixed
              sample of 1,000 clients; 1,000,000 clients against a baseline of 1,000 (all in flight, same work),
              as most of every process's RSS is the torch runtime itself; then 10,000 clients, 1 process vs 2 ranks
  in-memory   `synthetic_iid` over 2,000 clients (about 190 MB of training features, held in memory), 1 process
              vs 2 ranks: rank 0 builds the set (its peak is the build's) and sends each rank only its shard
Nothing is asserted; the last line is one JSON object of figures, including `"mpi_rank_over_single"` (peak RSS of
the larger rank / that of the single process, population) and `"in_memory_rank1_over_single"` (peak RSS of rank 1,
which never holds the whole set / that of the single process). `--quick` runs smaller sets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = """
import json, pathlib, resource, sys
import fedsim
from fedsim.runtime import mpi
result = fedsim.run(json.loads(sys.argv[1]), write=False)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
report = {"rank": mpi.rank(), "peak_rss_mb": peak_mb, "loss": result.metrics.last()["loss"]}
pathlib.Path(sys.argv[2], f"rank{mpi.rank()}.json").write_text(json.dumps(report))
"""


def scenario(num_clients: int, per_round: int, rounds: int) -> dict:
    return {"name": "memory", "seed": 0, "rounds": rounds, "num_clients": num_clients,
            "clients_per_round": per_round, "data": {"name": "synthetic_population"}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 10}, "runtime": {"name": "vectorized"},
            "evaluation": {"every": rounds, "clients": 1000}}


def in_memory_scenario(num_clients: int) -> dict:
    return {**scenario(num_clients, 100, 2), "data": {"name": "synthetic_iid"}, "partition": {"name": "iid"},
            "evaluation": {"every": 2}}


def measure(config: dict, ranks: int) -> list[dict]:
    """Run the worker (under mpiexec when ranks > 1); each process writes its report to its own file."""
    with tempfile.TemporaryDirectory() as reports:
        command = [sys.executable, "-c", WORKER, json.dumps(config), reports]
        if ranks > 1:
            mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
            command = [mpiexec, "-n", str(ranks), *command]
        subprocess.run(command, capture_output=True, text=True, check=True)
        return [json.loads((Path(reports) / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 100,000-client population and 500 in-memory clients")
    args = parser.parse_args()
    population = 100_000 if args.quick else 1_000_000
    big = scenario(population, 1000, 3)
    small = scenario(10_000, 1000, 3)
    figures: dict[str, float] = {}
    (baseline,) = measure(scenario(1000, 1000, 3), 1)
    figures["baseline_peak_rss_mb"] = round(baseline["peak_rss_mb"], 1)
    print(f"baseline (1,000 clients, all in flight, same work): peak RSS {baseline['peak_rss_mb']:.0f} MB")
    (million,) = measure(big, 1)
    figures[f"population_{population}_peak_rss_mb"] = round(million["peak_rss_mb"], 1)
    print(f"{population:,} clients, 1,000 per round, 3 rounds: peak RSS {million['peak_rss_mb']:.0f} MB "
          f"({million['peak_rss_mb'] - baseline['peak_rss_mb']:+.0f} MB over the baseline)")
    (single,) = measure(small, 1)
    print(f"10,000 clients, 1 process:  peak RSS {single['peak_rss_mb']:.0f} MB, final loss {single['loss']:.6f}")
    figures["single_peak_rss_mb"] = round(single["peak_rss_mb"], 1)
    try:
        ranks = measure(small, 2)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"MPI skipped: {exc}")
        print(json.dumps(figures))
        return
    for r in ranks:
        print(f"10,000 clients, rank {r['rank']} of 2: peak RSS {r['peak_rss_mb']:.0f} MB, final loss {r['loss']:.6f}")
    figures["mpi_rank_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in ranks), 1)
    figures["mpi_rank_over_single"] = round(figures["mpi_rank_peak_rss_mb"] / figures["single_peak_rss_mb"], 3)
    clients = 500 if args.quick else 2000
    (whole,) = measure(in_memory_scenario(clients), 1)
    print(f"in-memory synthetic_iid, {clients:,} clients, 1 process: peak RSS {whole['peak_rss_mb']:.0f} MB, "
          f"final loss {whole['loss']:.6f}")
    for r in measure(in_memory_scenario(clients), 2):
        print(f"in-memory synthetic_iid, {clients:,} clients, rank {r['rank']} of 2: "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, final loss {r['loss']:.6f}")
        figures[f"in_memory_rank{r['rank']}_peak_rss_mb"] = round(r["peak_rss_mb"], 1)
    figures["in_memory_single_peak_rss_mb"] = round(whole["peak_rss_mb"], 1)
    figures["in_memory_rank1_over_single"] = round(figures["in_memory_rank1_peak_rss_mb"] / whole["peak_rss_mb"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
