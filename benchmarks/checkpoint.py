"""What a checkpoint costs: one save of SCAFFOLD over 10,000 stateful clients with an MLP, and the overhead per round.

What: SCAFFOLD (every client keeps a control variate the size of the model) with the runtimes benchmark's MLP
(60-200-10, 14,210 parameters) on a generated population of 10,000 clients (`synthetic_population`, 60 features,
10 classes), 1,000 clients per round under the vectorized runtime, so that after R rounds most clients hold
state. Printed:
  - seconds per round with no checkpoints (`checkpoint.wall_seconds: 0`);
  - the seconds and bytes of one checkpoint of the final run state (client states, server state, clock, rows),
    and the seconds to read it back and verify its checksums;
  - the overhead of checkpoints at the default interval (one per `checkpoint.wall_seconds` = 300 real seconds),
    save seconds / 300, and at one every 10 rounds, measured side by side: the same run with
    `checkpoint.every: 10`, its seconds per round over the plain run's.
Target (reported, never asserted): under 5% of run time at the default interval. `--quick`: 2,000 clients.
The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import fedsim
from fedsim import checkpoint
from fedsim.api import build_all
from fedsim.clock import Clock
from fedsim.recording import Recorder
from fedsim.run_state import RunState
from fedsim.scenario import load_scenarios


def scenario(num_clients: int, rounds: int, saving: dict) -> dict:
    return {"name": "checkpoint-bench", "seed": 0, "rounds": rounds, "num_clients": num_clients,
            "clients_per_round": 1000, "data": {"name": "synthetic_population", "num_features": 60},
            "partition": {"name": "natural"}, "model": {"name": "mlp", "hidden": [200]},
            "algorithm": {"name": "scaffold", "lr": 0.05, "batch_size": 10},
            "runtime": {"name": "vectorized", "threads": 2}, "evaluation": {"every": rounds, "clients": 500},
            "checkpoint": saving, "output": {"plot": False}}


def seconds_per_round(mapping: dict, out: Path) -> float:
    rows = fedsim.run(mapping, out=out).metrics.rows
    return rows[-1]["wall_time"] / mapping["rounds"]


def one_save(mapping: dict, root: Path) -> tuple[float, int, float, int]:
    """Run the workload in-process, then save its final run state once: (save seconds, bytes, load seconds,
    clients with state)."""
    resolved, _ = load_scenarios(mapping)
    sim = build_all(resolved)[0]
    component = resolved[0].components["protocol"]
    recorder = Recorder("bench", sim.evaluator)
    protocol = component.entry.obj(component.params, sim, recorder)
    clock = Clock()
    protocol.start(clock)
    clock.run(protocol)
    state = RunState(sim, protocol, clock, recorder)
    ranks = checkpoint.Collective(None)
    start = time.perf_counter()
    path = checkpoint.save(root, state.state_dict(), {"variant": "bench", "server_steps": 0, "sim_time": 0.0},
                           ranks)
    saved = time.perf_counter() - start
    size = sum(p.stat().st_size for p in path.iterdir())
    start = time.perf_counter()
    checkpoint.read_rank(path, checkpoint.read_manifest(path), 0)
    return saved, size, time.perf_counter() - start, len(sim.states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 clients instead of 10,000")
    args = parser.parse_args()
    clients = 2000 if args.quick else 10_000
    rounds = 10 if args.quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        plain = seconds_per_round(scenario(clients, rounds, {"wall_seconds": 0}), tmp_path / "plain")
        every10 = seconds_per_round(scenario(clients, rounds, {"every": 10}), tmp_path / "every10")
        saved, size, loaded, stateful = one_save(scenario(clients, rounds, {"wall_seconds": 0}), tmp_path / "one")
    default_interval = 300.0
    figures = {
        "clients": clients, "stateful_clients": stateful, "seconds_per_round": round(plain, 4),
        "checkpoint_seconds": round(saved, 3), "checkpoint_mb": round(size / 2**20, 1),
        "load_seconds": round(loaded, 3),
        "overhead_default_interval": round(saved / default_interval, 5),
        "every10_over_plain": round(every10 / plain, 4),
    }
    print(f"SCAFFOLD, MLP 60-200-10, {clients} clients ({stateful} with state after {rounds} rounds of 1000)")
    print(f"  seconds per round, no checkpoints: {plain:.3f}")
    print(f"  one checkpoint: {saved:.2f} s, {size / 2**20:.1f} MB; read back and verified in {loaded:.2f} s")
    print(f"  overhead at the default interval (one per {default_interval:.0f} s): "
          f"{100 * saved / default_interval:.2f}% of run time (target < 5%)")
    print(f"  one checkpoint every 10 rounds: {every10:.3f} s per round, {every10 / plain:.3f}x the plain run")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
