"""FedAvg through fedsim's sequential runtime vs. a hand-written PyTorch loop doing the same arithmetic.

What: four configurations (logreg 60->10 and mlp 60-200-10; 10 and 100 of 100 clients per round; 1 local epoch,
batch 10, lr 0.01, no stragglers) are run through `fedsim.run(scenario, write=False)` exactly as a user would, and
through the loop a researcher would write by hand: one `nn.Module` per side (global and local), and for each sampled
client `load_state_dict` of the global weights, `torch.optim.SGD`, `zero_grad / loss.backward() / step` over the
client's minibatches, then the sample-weighted mean of the client models accumulated in float64.

Why: fedsim's sequential runtime is the reference every other runtime is measured against, so its overhead over
plain PyTorch (functional rules, pytrees, the event clock, messages, recording) should stay small; the target is
fedsim / hand-written <= 1.05. The script never asserts on times.

Apples to apples: both sides use the same data (fedsim's own `synthetic_iid`, seed 1, pooled and split `iid` over
100 clients with `test_fraction` chosen so that every client keeps exactly 100 training samples; the other ~174
samples per client form the test split), the same initial weights (fedsim's `build_model` parameters copied into
the module), the same clients per round (`fedsim.sampling.plan_round`) and the same minibatches (per client and
round, a `torch.Generator` from `fedsim.seeding.torch_generator(seed, Stream.LOCAL, round, client)` and one
`torch.randperm` per epoch cut into consecutive batches, as `fedsim.runtime.context.local_batches` does). Once per
configuration the script runs a few rounds of both and checks that the global models agree to float tolerance
(both take the SGD step `w + (-lr) g` in one op, but averaging models rather than deltas rounds differently from
fedsim's `w + mean(delta)`, so bitwise equality is not expected); it exits with status 1 if they do not.

How time is measured: per run, fedsim's own clock of the run, the `wall_time` of its last metrics row (seconds from
the start of training to the end of the final evaluation; evaluation runs only before round 0 and after the last
round, `evaluation.every = rounds`). That window holds both evaluations, so the hand-written loop is timed over the
same work: evaluate (training loss, test loss, test accuracy over all clients), R rounds, evaluate. Scenario
validation and data/model building happen before fedsim's clock starts and are outside both windows. Nothing is
subtracted. Seconds per round = window / R. fedsim and hand-written runs alternate (the order flips every
repetition) and each side's median over the repetitions is reported. Both run with `torch.set_num_threads(1)`
(fedsim's sequential runtime default; tiny models get slower with more threads on a small machine).

Usage: `python benchmarks/sequential.py` (full, about a minute on 2 CPU cores) or `--quick` (a smoke test).
The last line printed is one JSON object of ratios `"A_over_B"` = time of A / time of B.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import fedsim
from fedsim.clock import Clock
from fedsim.data import FederatedData, build_federated_data
from fedsim.recording import Recorder
from fedsim.sampling import plan_round
from fedsim.scenario import load_scenarios
from fedsim.seeding import Stream, torch_generator
from fedsim.servers.synchronous import SynchronousParams, SynchronousRounds
from fedsim.simulation import Simulation, build_simulation

SEED = 1
NUM_CLIENTS = 100
TRAIN_PER_CLIENT = 100
NUM_FEATURES = 60
NUM_CLASSES = 10
HIDDEN = 200
LR = 0.01
BATCH_SIZE = 10
LOCAL_EPOCHS = 1
MODELS = ("logreg", "mlp")
CLIENTS_PER_ROUND = (10, 100)
TOLERANCE = 5e-7
"""Largest acceptable |fedsim - hand-written| over the global model's parameters after the check's rounds. Matching
runs differ by ~3e-8 (float32 rounding); feeding the hand-written loop other minibatch orders (a generator keyed one
client off) gives 4e-6 to 4e-5 after 3 rounds at lr 0.01, so a looser bound would not catch that."""


@dataclass(frozen=True)
class Settings:
    rounds: int
    repetitions: int
    check_rounds: int


FULL = Settings(rounds=20, repetitions=5, check_rounds=3)
QUICK = Settings(rounds=2, repetitions=1, check_rounds=2)


@dataclass(frozen=True)
class Config:
    model: str
    clients_per_round: int

    @property
    def key(self) -> str:
        return f"{self.model}_{self.clients_per_round}"


# ---------------------------------------------------------------------------------------------------------------
# The workload, as a fedsim scenario


def keep_fraction_test(seed: int) -> float:
    """`data.test_fraction` that leaves every client exactly TRAIN_PER_CLIENT training samples.

    The pooled synthetic_iid set has T samples whatever the test fraction; `iid` gives each client floor(T / N) or
    one more, and a client of n samples trains on int((1 - f) n); aim half a sample above the target."""
    data = build_federated_data("synthetic_iid", {}, "iid", {}, NUM_CLIENTS, seed)
    total = len(data.y_train) + len(data.y_test)
    small, large = total // NUM_CLIENTS, -(-total // NUM_CLIENTS)
    keep = (TRAIN_PER_CLIENT + 0.5) / large
    if int(keep * small) != TRAIN_PER_CLIENT:
        raise SystemExit(f"cannot give every client {TRAIN_PER_CLIENT} training samples from {total} samples")
    return 1.0 - keep


def scenario(config: Config, rounds: int, test_fraction: float) -> dict[str, Any]:
    model: dict[str, Any] = {"name": "logreg"} if config.model == "logreg" else {"name": "mlp", "hidden": [HIDDEN]}
    return {
        "name": f"bench-{config.key}", "seed": SEED, "rounds": rounds, "num_clients": NUM_CLIENTS,
        "clients_per_round": config.clients_per_round,
        "data": {"name": "synthetic_iid", "num_features": NUM_FEATURES, "num_classes": NUM_CLASSES,
                 "test_fraction": test_fraction},
        "partition": {"name": "iid"},
        "model": model,
        "algorithm": {"name": "fedavg", "lr": LR, "batch_size": BATCH_SIZE, "local_epochs": LOCAL_EPOCHS},
        "runtime": {"name": "sequential", "threads": 1},
        "evaluation": {"every": rounds},
        "output": {"plot": False},
    }


def build(config: Config, rounds: int, test_fraction: float) -> Simulation:
    """fedsim's simulation for the scenario, built as `fedsim.run` builds it."""
    resolved, _ = load_scenarios(scenario(config, rounds, test_fraction))
    sim = build_simulation(resolved[0])
    if not (sim.data.train_sizes == TRAIN_PER_CLIENT).all():
        raise SystemExit(f"expected {TRAIN_PER_CLIENT} training samples per client, got {set(sim.data.train_sizes)}")
    return sim


def fedsim_global_model(sim: Simulation) -> list[torch.Tensor]:
    """Run the simulation's rounds through the protocol `fedsim.run` drives, and return the global parameters."""
    protocol = SynchronousRounds(SynchronousParams(), sim, Recorder("check", sim.evaluator))
    clock = Clock()
    protocol.start(clock)
    clock.run(protocol)
    return list(protocol.state["params"].values())


def fedsim_seconds(config: Config, rounds: int, test_fraction: float) -> float:
    """Training window of one `fedsim.run`: the wall_time of its final metrics row."""
    result = fedsim.run(scenario(config, rounds, test_fraction), write=False)
    return float(result.metrics.rows[-1]["wall_time"])


# ---------------------------------------------------------------------------------------------------------------
# The hand-written loop


def make_module(model: str) -> nn.Module:
    if model == "logreg":
        return nn.Linear(NUM_FEATURES, NUM_CLASSES)
    return nn.Sequential(nn.Linear(NUM_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, NUM_CLASSES))


def local_sgd(module: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int, client: int) -> None:
    """A researcher's client loop: torch.optim.SGD over the client's minibatches (one permutation per epoch from
    the client's generator, as fedsim draws them)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    generator = torch_generator(SEED, Stream.LOCAL, t, client)
    for _ in range(LOCAL_EPOCHS):
        perm = torch.randperm(len(y), generator=generator)
        for s in range(0, len(y), BATCH_SIZE):
            idx = perm[s : s + BATCH_SIZE]
            optimizer.zero_grad()
            F.cross_entropy(module(x[idx]), y[idx]).backward()
            optimizer.step()


@dataclass
class HandWritten:
    """What a researcher would write: per-client tensors, a global and a local module, torch.optim.SGD."""

    model: str
    clients_per_round: int
    init: list[torch.Tensor]
    clients: list[tuple[torch.Tensor, torch.Tensor]]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def fresh_model(self) -> nn.Module:
        module = make_module(self.model)
        with torch.no_grad():
            for p, v in zip(module.parameters(), self.init, strict=True):
                p.copy_(v)
        return module

    def run(self, rounds: int, evaluate: bool = True) -> tuple[nn.Module, float]:
        """Evaluate, train `rounds` rounds, evaluate; returns the global model and the seconds taken."""
        global_model, local_model = self.fresh_model(), self.fresh_model()
        sizes = np.array([len(y) for _, y in self.clients])
        start = time.perf_counter()
        if evaluate:
            self.evaluate(global_model)
        for t in range(rounds):
            self.round(t, global_model, local_model, sizes)
        if evaluate:
            self.evaluate(global_model)
        return global_model, time.perf_counter() - start

    def round(self, t: int, global_model: nn.Module, local_model: nn.Module, sizes: np.ndarray) -> None:
        plan = plan_round(SEED, t, sizes, self.clients_per_round, 0.0, LOCAL_EPOCHS, BATCH_SIZE)
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in global_model.parameters()]
        total = 0
        for client in plan.clients.tolist():
            local_model.load_state_dict(global_model.state_dict())
            x, y = self.clients[client]
            local_sgd(local_model, x, y, t, client)
            with torch.no_grad():
                for a, p in zip(acc, local_model.parameters(), strict=True):
                    a.add_(p.double(), alpha=len(y))
            total += len(y)
        with torch.no_grad():
            for p, a in zip(global_model.parameters(), acc, strict=True):
                p.copy_(a / total)

    @torch.no_grad()
    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Training loss, test loss and test accuracy over all clients, as fedsim's evaluator reports them."""
        (x_train, y_train), (x_test, y_test) = self.train, self.test
        logits = module(x_test)
        return {"loss": float(F.cross_entropy(module(x_train), y_train)),
                "test_loss": float(F.cross_entropy(logits, y_test)),
                "accuracy": float((logits.argmax(1) == y_test).float().mean())}


def hand_written(sim: Simulation, config: Config) -> HandWritten:
    data: FederatedData = sim.data
    clients = [(x.clone(), y.clone()) for x, y in map(data.client_train, range(data.num_clients))]
    init = [v.clone() for v in sim.model.init_params.values()]
    return HandWritten(config.model, config.clients_per_round, init, clients,
                       (data.x_train, data.y_train), (data.x_test, data.y_test))


# ---------------------------------------------------------------------------------------------------------------
# Check, time, report


def check(config: Config, rounds: int, test_fraction: float) -> float:
    """Max |fedsim - hand-written| over the global parameters after `rounds` rounds."""
    sim = build(config, rounds, test_fraction)
    ours = fedsim_global_model(sim)
    theirs, _ = hand_written(sim, config).run(rounds, evaluate=False)
    return max(float((a - b.detach()).abs().max()) for a, b in zip(ours, theirs.parameters(), strict=True))


def time_pair(
    fedsim_run: Callable[[], float], hand_run: Callable[[], float], repetitions: int
) -> tuple[list[float], list[float]]:
    """Alternate the two, flipping which goes first every repetition; returns each side's seconds."""
    ours: list[float] = []
    theirs: list[float] = []
    for rep in range(repetitions):
        order = [(fedsim_run, ours), (hand_run, theirs)]
        for fn, out in order if rep % 2 == 0 else order[::-1]:
            out.append(fn())
    return ours, theirs


def bench(config: Config, settings: Settings, test_fraction: float) -> tuple[float, float]:
    """Median seconds per round of fedsim and of the hand-written loop."""
    loop = hand_written(build(config, settings.rounds, test_fraction), config)
    ours, theirs = time_pair(lambda: fedsim_seconds(config, settings.rounds, test_fraction),
                             lambda: loop.run(settings.rounds)[1], settings.repetitions)
    return statistics.median(ours) / settings.rounds, statistics.median(theirs) / settings.rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds, one repetition: a smoke test")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    test_fraction = keep_fraction_test(SEED)
    configs = [Config(m, k) for m in MODELS for k in CLIENTS_PER_ROUND]
    print(f"FedAvg, {NUM_CLIENTS} clients x {TRAIN_PER_CLIENT} samples (synthetic_iid seed {SEED}, iid), "
          f"batch {BATCH_SIZE}, lr {LR}, {LOCAL_EPOCHS} epoch; {settings.rounds} rounds x "
          f"{settings.repetitions} repetitions; torch {torch.__version__}, 1 thread")
    ratios: dict[str, float] = {}
    rows = []
    for config in configs:
        diff = check(config, settings.check_rounds, test_fraction)
        print(f"check {config.key}: max |fedsim - hand-written| after {settings.check_rounds} rounds = {diff:.2e}")
        if not diff <= TOLERANCE:
            print(f"FAIL: {config.key} differs by {diff:.2e} > {TOLERANCE:.0e}; not an apples-to-apples comparison")
            return 1
        ours, theirs = bench(config, settings, test_fraction)
        ratios[f"sequential_over_handwritten_{config.key}"] = ours / theirs
        rows.append((config.key, ours, theirs, ours / theirs))
    ratios["sequential_over_handwritten"] = math.exp(statistics.mean(math.log(r) for r in ratios.values()))
    print(format_table(rows))
    print(json.dumps({k: round(v, 4) for k, v in ratios.items()}))
    return 0


def format_table(rows: list[tuple[str, float, float, float]]) -> str:
    lines = [f"{'config':<12} {'fedsim s/round':>15} {'hand-written s/round':>21} {'ratio':>7}"]
    lines += [f"{key:<12} {a:>15.5f} {b:>21.5f} {r:>7.3f}" for key, a, b, r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
