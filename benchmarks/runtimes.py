"""FedAvg through fedsim's sequential, vectorized and compiled runtimes, two hand-written loops, Flower and pfl.

What: the project issue's workload, 20 rounds of FedAvg over 100 clients of exactly 100 training samples each
(logreg 60->10 and mlp 60-200-10; 10 and 100 clients per round; 1 local epoch, batch 10, lr 0.01), run in one
invocation on identical data by seven systems:
  sequential  `fedsim.run` with `runtime: {name: sequential, threads: 1}`
  vectorized  `fedsim.run` with `runtime: {name: vectorized, threads: T}`, T in {1, 2}; the faster is reported
  compiled    the same with `compile: true` (torch.compile'd steps); a one-round warm-up run compiles them first,
              and its seconds are printed as start-up, outside the window (as Flower's start-up is)
  handloop    the hand-written loop of benchmarks/sequential.py: per client `load_state_dict`, `torch.optim.SGD`,
              `zero_grad / backward / step`, float64 weighted mean of the client models
  handvmap    what a strong user writes with torch.func: the sampled clients' parameters stacked on an axis,
              `vmap(grad(loss))` over `functional_call` per local step, the same minibatches; T in {1, 2}
  flower      Flower 1.41's simulation engine (`flwr.simulation.run_simulation`, Ray backend): a ServerApp running
              `flwr.serverapp.strategy.FedAvg`, a ClientApp whose train function is the hand-written client loop
  pfl         Apple's pfl 0.6: `FederatedAveraging`, `PyTorchModel` (local torch.optim.SGD, central SGD lr 1),
              `SimulatedBackend` over a `FederatedDataset`
Flower and pfl are optional (`pip install -e ".[bench]"`, best in a virtualenv of its own: pfl pins an old attrs);
when one is missing the script says so in one line and leaves its ratios out.

Why: the vectorized runtime exists to make many-client simulations fast. Project targets (reported, never
asserted): at 100 clients per round vectorized is >= 5x faster than sequential and >= 10x faster than Flower and
pfl, and within 1.25x of the hand-written vmap loop.

Apples to apples: every system gets the data, initial weights and hyperparameters of benchmarks/sequential.py
(fedsim's `synthetic_iid`, seed 1, split `iid`, 100 training samples per client; fedsim's initial parameters).
fedsim, handloop and handvmap also share the clients of each round (`fedsim.sampling.plan_round`) and the
minibatches (one `torch.randperm` per client, round and epoch from `fedsim.seeding.torch_generator`, which
fedsim's vectorized runtime and handvmap derive for a round's clients at once with `torch_generators`); before
timing, each configuration checks that sequential, vectorized and handvmap end 3 rounds (2 with --quick) with the
hand-written loop's global model to float tolerance, and the script exits with status 1 if one does not. pfl is
given the same clients (a user sampler that yields `plan_round`'s clients) and the same minibatches (each user's
data set is handed over in that round's permuted order; pfl slices it in order), so its model is compared too. Flower
samples clients itself (uniformly, `random.sample`), so only with 100 of 100 clients does it see the same work;
its ClientApp draws the same minibatches. For both, the script prints the final accuracy next to the hand-written
loop's and the max |difference| of the global models (after all rounds, so float32 drift of ~1e-6 is expected;
sampling noise where Flower's clients differ), and warns if the accuracies differ by more than 0.02.

How time is measured: per run, a window holding evaluate (training loss, test loss, test accuracy of the global
model over all clients), R rounds, evaluate; seconds per round = window / R, and per system the median over
`--repetitions` runs (default 3), the systems interleaved (the order rotates every repetition). fedsim's window is
its own clock, the `wall_time` of the last metrics row of `fedsim.run(..., write=False)` with
`evaluation.every=rounds` (scenario validation and data/model building are outside it). handloop and handvmap time
the same work with `time.perf_counter`. pfl: evaluate, `FederatedAveraging().run(...)`, evaluate, timed around the
calls (building pfl's model, data set and backend is outside). Flower: the ServerApp first sends round 1's train
message to every node and discards the replies, which starts Ray, the actor pool, each actor's ClientApp (module
import, data load) and takes the train path once per actor; the window opens when `strategy.start` calls
`evaluate_fn` for round 0 and closes after its evaluation of round R. Excluded as one-off start-up, and printed
separately: everything before that (Ray start-up, actor creation, the warm-up) and Ray's shutdown after; also
printed: the peak RSS summed over the process tree (driver plus Ray's processes; shared pages counted per process;
needs psutil, which Ray installs) and the rounds' spread. Flower's in-memory grid polls for replies every 0.1 s
(`InMemoryGrid.pull_interval`, not settable through `run_simulation`), so no Flower round takes less than ~0.1 s.
pfl's default per-user evaluation before and after local training in its first round is switched off, as no other
system does it.

Threads (torch intra-op), set for every system: sequential, handloop and pfl 1 (pfl simulates users one after
another in one process; small models run fastest on one thread); vectorized, compiled and handvmap 1 and 2, the
faster reported; Flower 2 Ray actors (client_resources num_cpus 1 on this 2-core machine) of 1 thread each, and 1 for
the driver's evaluation.

Usage: `python benchmarks/runtimes.py` (8 to 12 minutes on 2 CPU cores with Flower and pfl installed, the longer when
other work shares the machine: 2-thread runs then slow down many times; the load average is printed at the start and
end) or `--quick` (fedsim uncompiled and the hand-written loops only, 2 rounds, 1 repetition: a smoke test of about 10
seconds); `--profile` prints only a cProfile of fedsim's vectorized runtime at 100 clients per round. Helpers shared
with benchmarks/sequential.py are imported from it. The last line printed is one JSON object of ratios `"A_over_B"`
= time of A / time of B, per configuration (suffix `_logreg_10`, ...) and their geometric mean (no suffix).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from sequential import (
    BATCH_SIZE,
    CLIENTS_PER_ROUND,
    LOCAL_EPOCHS,
    LR,
    MODELS,
    NUM_CLIENTS,
    SEED,
    TOLERANCE,
    TRAIN_PER_CLIENT,
    Config,
    HandWritten,
    fedsim_global_model,
    hand_written,
    keep_fraction_test,
    local_sgd,
    make_module,
    scenario,
)
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

import fedsim
from fedsim.sampling import plan_round
from fedsim.scenario import load_scenarios
from fedsim.seeding import Stream, torch_generator, torch_generators
from fedsim.simulation import Simulation, build_simulation

THREADS = (1, 2)
ACCURACY_GAP = 0.02
"""Largest final-accuracy difference from the hand-written loop that Flower and pfl pass without a warning."""


@dataclass(frozen=True)
class Settings:
    rounds: int
    repetitions: int
    check_rounds: int
    others: bool
    """Whether Flower and pfl run."""


FULL = Settings(rounds=20, repetitions=3, check_rounds=3, others=True)
QUICK = Settings(rounds=2, repetitions=1, check_rounds=2, others=False)


@dataclass
class Outcome:
    """One timed run: the window (evaluate, rounds, evaluate) in seconds, the final accuracy, and where the system
    hands it back, the final global model (parameters in `make_module` order) and its start-up costs."""

    seconds: float
    accuracy: float
    params: list[torch.Tensor] | None = None
    startup: float | None = None
    teardown: float | None = None
    peak_rss: float | None = None
    round_seconds: list[float] | None = None


Runner = Callable[[], Outcome]


# ---------------------------------------------------------------------------------------------------------------
# fedsim


def fedsim_scenario(config: Config, rounds: int, test_fraction: float, runtime: dict[str, Any]) -> dict[str, Any]:
    return {**scenario(config, rounds, test_fraction), "runtime": runtime}


def build(mapping: dict[str, Any]) -> Simulation:
    resolved, _ = load_scenarios(mapping)
    return build_simulation(resolved[0])


def fedsim_runner(mapping: dict[str, Any]) -> Runner:
    """`fedsim.run` as a user calls it; it sets torch's threads from the runtime's `threads` itself."""

    def run() -> Outcome:
        last = fedsim.run(mapping, write=False).metrics.rows[-1]
        return Outcome(float(last["wall_time"]), float(last["accuracy"]))

    return run


def compiled_runner(mapping: dict[str, Any]) -> Runner:
    """`fedsim.run` with `compile: true`, after a one-round warm-up run that compiles the steps; the warm-up's
    seconds are reported as start-up, outside the window (as Flower's)."""
    start = time.perf_counter()
    fedsim.run({**mapping, "rounds": 1}, write=False)
    startup = time.perf_counter() - start
    timed = fedsim_runner(mapping)

    def run() -> Outcome:
        return dataclasses.replace(timed(), startup=startup)

    return run


# ---------------------------------------------------------------------------------------------------------------
# The hand-written loops


def load_into(module: nn.Module, params: list[torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for p, v in zip(module.parameters(), params, strict=True):
            p.copy_(v)
    return module


def parameters_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def handloop_runner(loop: HandWritten, rounds: int) -> Runner:
    def run() -> Outcome:
        torch.set_num_threads(1)
        module, seconds = loop.run(rounds)
        return Outcome(seconds, loop.evaluate(module)["accuracy"], parameters_of(module))

    return run


@dataclass
class HandVmap:
    """A strong user's torch.func loop: the round's clients' parameters stacked on a leading axis, one
    `vmap(grad(loss))` call per local step over every client's minibatch, SGD on the stacked tensors, then the
    float64 sample-weighted mean. Every client has the same number of samples, so no padding or masks."""

    loop: HandWritten
    x: torch.Tensor
    """(clients, samples, features)"""
    y: torch.Tensor
    """(clients, samples)"""
    sizes: np.ndarray

    def __post_init__(self) -> None:
        template = make_module(self.loop.model)
        names = [name for name, _ in template.named_parameters()]

        def loss(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = functional_call(template, dict(zip(names, params, strict=True)), (x,), tie_weights=False)
            return F.cross_entropy(logits, y)

        self.grad = vmap(grad(loss))

    def run(self, rounds: int, evaluate: bool = True) -> tuple[list[torch.Tensor], float]:
        """Evaluate, train `rounds` rounds, evaluate; returns the global parameters and the seconds taken."""
        params = [v.clone() for v in self.loop.init]
        module = self.loop.fresh_model()
        start = time.perf_counter()
        if evaluate:
            self.loop.evaluate(load_into(module, params))
        for t in range(rounds):
            params = self.round(t, params)
        if evaluate:
            self.loop.evaluate(load_into(module, params))
        return params, time.perf_counter() - start

    def round(self, t: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        plan = plan_round(SEED, t, self.sizes, self.loop.clients_per_round, 0.0, LOCAL_EPOCHS, BATCH_SIZE)
        chosen = torch.as_tensor(plan.clients)
        k, n = len(chosen), self.x.shape[1]
        x, y = self.x[chosen], self.y[chosen]
        rows = torch.arange(k)[:, None]
        generators = torch_generators(SEED, Stream.LOCAL, t, last=plan.clients.tolist())
        stacked = [p.expand(k, *p.shape) for p in params]
        for _ in range(LOCAL_EPOCHS):
            perm = torch.stack([torch.randperm(n, generator=g) for g in generators])
            xs, ys = x[rows, perm], y[rows, perm]
            for s in range(0, n, BATCH_SIZE):
                grads = self.grad(stacked, xs[:, s : s + BATCH_SIZE], ys[:, s : s + BATCH_SIZE])
                stacked = [torch.add(w, g, alpha=-LR) for w, g in zip(stacked, grads, strict=True)]
        weights = torch.as_tensor(self.sizes[plan.clients], dtype=torch.float64)
        return [(w.double() * weights.view(-1, *[1] * (w.dim() - 1))).sum(0).div(weights.sum()).to(w.dtype)
                for w in stacked]


def hand_vmap(loop: HandWritten) -> HandVmap:
    sizes = np.array([len(y) for _, y in loop.clients])
    if not (sizes == sizes[0]).all():
        raise SystemExit("the hand-written vmap loop assumes clients of equal size")
    x = torch.stack([x for x, _ in loop.clients])
    y = torch.stack([y for _, y in loop.clients])
    return HandVmap(loop, x, y, sizes)


def handvmap_runner(vm: HandVmap, rounds: int, threads: int) -> Runner:
    def run() -> Outcome:
        torch.set_num_threads(threads)
        params, seconds = vm.run(rounds)
        accuracy = vm.loop.evaluate(load_into(vm.loop.fresh_model(), params))["accuracy"]
        return Outcome(seconds, accuracy, params)

    return run


# ---------------------------------------------------------------------------------------------------------------
# Flower. The ClientApp's functions are taken from this file imported as the module `runtimes` (not `__main__`):
# Ray then pickles them by reference, and each actor imports them once and keeps its data cache across messages.

FLOWER_INSTALL = 'pip install "flwr[simulation]>=1.41,<1.42"'
_flower_data: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def flower_client_data(path: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every client's training data, read once per actor process."""
    if path not in _flower_data:
        _flower_data[path] = torch.load(path)
    return _flower_data[path]


def flower_train(msg: Any, context: Any) -> Any:
    """FedAvg's client: the hand-written loop on this node's partition, from the message's global model."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    torch.set_num_threads(1)
    config = msg.content["config"]
    client = int(context.node_config["partition-id"])
    x, y = flower_client_data(str(config["data"]))[client]
    module = make_module(str(config["model"]))
    module.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    local_sgd(module, x, y, int(config["server-round"]) - 1, client)
    reply = RecordDict({"arrays": ArrayRecord(module.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(reply, reply_to=msg)


def flower_client_app() -> Any:
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(flower_train)
    return app


def importable_self() -> ModuleType:
    """This file as the module `runtimes` (Flower exports the driver's sys.path to Ray's workers)."""
    return sys.modules[__name__] if __name__ != "__main__" else importlib.import_module(Path(__file__).stem)


@dataclass
class FlowerMarks:
    """Timestamps and results the ServerApp leaves behind."""

    warm: float = math.nan
    start: float = math.nan
    end: float = math.nan
    accuracy: float = math.nan
    params: list[torch.Tensor] | None = None
    calls: list[float] = dataclasses.field(default_factory=list)
    """When `evaluate_fn` was called, once per round: the rounds' durations, for the note on round 1."""


def flower_warm_up(grid: Any, arrays: Any, config: Any) -> None:
    """Round 1's train message to every node, the replies discarded: starts Ray, the actors, their ClientApps and
    data, and takes the train path once in each actor (without it round 1 takes 5 to 20 times a later round)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    while len(nodes := list(grid.get_node_ids())) < NUM_CLIENTS:
        time.sleep(0.05)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "server-round": 1})})
    messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages))
    if len(replies) != len(nodes) or any(r.has_error() for r in replies):
        raise RuntimeError("Flower warm-up: not every node answered")


def flower_server_app(loop: HandWritten, rounds: int, data_path: str, marks: FlowerMarks) -> Any:
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()
    module = loop.fresh_model()

    def evaluate(server_round: int, arrays: Any) -> None:
        marks.calls.append(time.perf_counter())
        if server_round == 0:
            marks.start = time.perf_counter()
        if server_round in (0, rounds):
            module.load_state_dict(arrays.to_torch_state_dict())
            marks.accuracy = loop.evaluate(module)["accuracy"]
        if server_round == rounds:
            marks.end = time.perf_counter()
            marks.params = parameters_of(module)

    @app.main()
    def main(grid: Any, context: Any) -> None:
        initial = ArrayRecord(loop.fresh_model().state_dict())
        config = {"data": data_path, "model": loop.model}
        flower_warm_up(grid, initial, config)
        marks.warm = time.perf_counter()
        k = loop.clients_per_round
        strategy = FedAvg(fraction_train=k / NUM_CLIENTS, fraction_evaluate=0.0, min_train_nodes=k,
                          min_available_nodes=NUM_CLIENTS)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=ConfigRecord(config),
                       evaluate_fn=evaluate)

    return app


class PeakRss:
    """Samples the RSS summed over this process and its descendants (psutil) while in a `with` block."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak = interval, math.nan
        self.psutil: Any = importlib.import_module("psutil") if importlib.util.find_spec("psutil") else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            try:
                total = sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])
            except self.psutil.Error:  # a process ended while being read: sample again
                continue
            self.peak = total if math.isnan(self.peak) else max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        if self.psutil:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.psutil:
            self._thread.join()


def flower_runner(loop: HandWritten, rounds: int, data_path: str) -> Runner:
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    client_app = importable_self().flower_client_app()
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "logging_level": "ERROR", "log_to_driver": False}}

    def run() -> Outcome:
        torch.set_num_threads(1)
        marks = FlowerMarks()
        begin = time.perf_counter()
        with PeakRss() as rss:
            run_simulation(server_app=flower_server_app(loop, rounds, data_path, marks), client_app=client_app,
                           num_supernodes=NUM_CLIENTS, backend_config=backend)
        done = time.perf_counter()
        if math.isnan(marks.end):
            raise RuntimeError("Flower's simulation ended before its last round")
        return Outcome(marks.end - marks.start, marks.accuracy, marks.params, startup=marks.start - begin,
                       teardown=done - marks.end, peak_rss=rss.peak, round_seconds=list(np.diff(marks.calls)))

    return run


# ---------------------------------------------------------------------------------------------------------------
# pfl


def fedsim_users(loop: HandWritten, rounds: int) -> Iterator[tuple[int, int]]:
    """(round, client) in fedsim's draw order, round after round: pfl's user sampler."""
    sizes = np.array([len(y) for _, y in loop.clients])
    for t in range(rounds):
        plan = plan_round(SEED, t, sizes, loop.clients_per_round, 0.0, LOCAL_EPOCHS, BATCH_SIZE)
        for client in plan.clients.tolist():
            yield t, client


class PflModule(nn.Module):
    """pfl's PyTorchModel needs `loss` and `metrics` on the module."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:  # noqa: A002
        from pfl.metrics import Weighted

        return {"loss": Weighted(float(F.cross_entropy(self(x), y, reduction="sum")), len(y))}


def pfl_runner(loop: HandWritten, rounds: int) -> Runner:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    class FedAvgWithoutLocalEvaluation(FederatedAveraging):
        """pfl's FedAvg evaluates every user before and after local training in round 0; no other system does."""

        def get_next_central_contexts(self, *args: Any, **kwargs: Any) -> Any:
            contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, model, metrics

    def user_data(user: tuple[int, int]) -> Dataset:
        """The client's data in this round's minibatch order (one permutation per epoch; pfl slices in order)."""
        t, client = user
        x, y = loop.clients[client]
        perm = torch.randperm(len(y), generator=torch_generator(SEED, Stream.LOCAL, t, client))
        return Dataset((x[perm], y[perm]), user_id=f"{client}")

    algorithm_params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds,
                                         train_cohort_size=loop.clients_per_round, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=LOCAL_EPOCHS, local_learning_rate=LR,
                                      local_batch_size=BATCH_SIZE)

    def run() -> Outcome:
        torch.set_num_threads(1)
        module = PflModule(loop.fresh_model())
        model = PyTorchModel(module, local_optimizer_create=torch.optim.SGD,
                             central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
        users = fedsim_users(loop, rounds)
        backend = SimulatedBackend(training_data=FederatedDataset(user_data, lambda: next(users)), val_data=None)
        start = time.perf_counter()
        loop.evaluate(module.inner)
        FedAvgWithoutLocalEvaluation().run(algorithm_params, backend, model, train_params, None, callbacks=[],
                                           send_metrics_to_platform=False)
        accuracy = loop.evaluate(module.inner)["accuracy"]
        return Outcome(time.perf_counter() - start, accuracy, parameters_of(module.inner))

    return run


# ---------------------------------------------------------------------------------------------------------------
# Availability, checks, timing, report


def unavailable(settings: Settings) -> dict[str, str]:
    """Systems that cannot run here, with the reason."""
    if not settings.others:
        why = "--quick runs fedsim (uncompiled) and the hand-written loops only"
        return {"compiled": why, "flower": why, "pfl": why}
    out = {}
    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        out["flower"] = f"flwr[simulation] is not installed ({FLOWER_INSTALL})"
    if importlib.util.find_spec("pfl") is None:
        out["pfl"] = 'pfl is not installed (pip install "pfl>=0.6")'
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def check(config: Config, loop: HandWritten, vm: HandVmap, rounds: int, test_fraction: float,
          skipped: dict[str, str]) -> dict[str, float]:
    """Max |system - hand-written loop| over the global parameters after `rounds` rounds."""
    reference = parameters_of(loop.run(rounds, evaluate=False)[0])
    diffs = {}
    for name, runtime in (("sequential", {"name": "sequential"}), ("vectorized", {"name": "vectorized"}),
                          ("compiled", {"name": "vectorized", "compile": True})):
        if name in skipped:
            continue
        sim = build(fedsim_scenario(config, rounds, test_fraction, runtime))
        diffs[name] = max_diff(fedsim_global_model(sim), reference)
    diffs["handvmap"] = max_diff(vm.run(rounds, evaluate=False)[0], reference)
    return diffs


def time_systems(runners: dict[str, Runner], repetitions: int) -> dict[str, list[Outcome]]:
    """Run every system `repetitions` times, interleaved; the order rotates by one every repetition."""
    names = list(runners)
    outcomes: dict[str, list[Outcome]] = {name: [] for name in names}
    for rep in range(repetitions):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            outcomes[name].append(runners[name]())
    return outcomes


@dataclass
class Result:
    """One system in one configuration: median seconds per round, and what it was measured with."""

    system: str
    seconds: float
    threads: str
    accuracy: float
    diff: float | None
    """max |system - hand-written loop| over the final global model; None where not comparable."""
    last: Outcome
    variants: dict[str, float]
    """Median seconds per round of each thread count tried."""


THREAD_NOTES = {"flower": "2x1", "sequential": "1", "handloop": "1", "pfl": "1"}


def summarize(outcomes: dict[str, list[Outcome]], rounds: int, reference: list[torch.Tensor],
              comparable: set[str]) -> dict[str, Result]:
    """Per system, the median; of the thread variants `name@T`, the fastest becomes `name`."""
    results: dict[str, Result] = {}
    variants: dict[str, dict[str, float]] = {}
    for key, runs in outcomes.items():
        name, _, threads = key.partition("@")
        threads = threads or THREAD_NOTES.get(name, "1")
        seconds = statistics.median(o.seconds for o in runs) / rounds
        variants.setdefault(name, {})[threads] = seconds
        if name in results and results[name].seconds <= seconds:
            continue
        last = runs[-1]
        diff = max_diff(last.params, reference) if last.params is not None and name in comparable else None
        results[name] = Result(name, seconds, threads, last.accuracy, diff, last, variants[name])
    return results


def bench(config: Config, settings: Settings, test_fraction: float, skipped: dict[str, str],
          data_dir: Path) -> dict[str, Result] | None:
    """Check, then time every system on one configuration; None if a check fails."""
    loop = hand_written(build(fedsim_scenario(config, settings.rounds, test_fraction, {"name": "sequential"})),
                        config)
    vm = hand_vmap(loop)
    torch.set_num_threads(1)
    diffs = check(config, loop, vm, settings.check_rounds, test_fraction, skipped)
    print(f"check {config.key}: max |system - hand-written| after {settings.check_rounds} rounds: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()), flush=True)
    failed = [k for k, v in diffs.items() if not v <= TOLERANCE]
    if failed:
        print(f"FAIL: {', '.join(failed)} differ from the hand-written loop by more than {TOLERANCE:.0e}")
        return None
    runners = systems(config, settings, test_fraction, loop, vm, skipped, data_dir)
    outcomes = time_systems(runners, settings.repetitions)
    reference = outcomes["handloop"][-1].params
    assert reference is not None
    comparable = {"handvmap", "pfl"} | ({"flower"} if config.clients_per_round == NUM_CLIENTS else set())
    return summarize(outcomes, settings.rounds, reference, comparable)


def systems(config: Config, settings: Settings, test_fraction: float, loop: HandWritten, vm: HandVmap,
            skipped: dict[str, str], data_dir: Path) -> dict[str, Runner]:
    rounds = settings.rounds
    runners: dict[str, Runner] = {
        "sequential": fedsim_runner(fedsim_scenario(config, rounds, test_fraction,
                                                    {"name": "sequential", "threads": 1})),
        "handloop": handloop_runner(loop, rounds),
    }
    for threads in THREADS:
        runners[f"vectorized@{threads}"] = fedsim_runner(
            fedsim_scenario(config, rounds, test_fraction, {"name": "vectorized", "threads": threads}))
        if "compiled" not in skipped:
            runners[f"compiled@{threads}"] = compiled_runner(fedsim_scenario(
                config, rounds, test_fraction, {"name": "vectorized", "threads": threads, "compile": True}))
        runners[f"handvmap@{threads}"] = handvmap_runner(vm, rounds, threads)
    if "flower" not in skipped:
        path = data_dir / f"{config.key}.pt"
        torch.save(loop.clients, path)
        runners["flower"] = flower_runner(loop, rounds, str(path))
    if "pfl" not in skipped:
        runners["pfl"] = pfl_runner(loop, rounds)
    return runners


RATIOS = (("sequential", "vectorized"), ("vectorized", "handvmap"), ("flower", "vectorized"), ("pfl", "vectorized"),
          ("handloop", "vectorized"), ("sequential", "handloop"), ("handloop", "handvmap"), ("flower", "handvmap"),
          ("pfl", "handvmap"), ("sequential", "compiled"), ("flower", "compiled"), ("pfl", "compiled"),
          ("compiled", "handvmap"), ("vectorized", "compiled"))


def ratios(all_results: dict[str, dict[str, Result]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for a, b in RATIOS:
        per_config = {key: res[a].seconds / res[b].seconds for key, res in all_results.items() if a in res and b in res}
        out.update({f"{a}_over_{b}_{key}": r for key, r in per_config.items()})
        if per_config:
            out[f"{a}_over_{b}"] = math.exp(statistics.mean(math.log(r) for r in per_config.values()))
    return out


ORDER = ("sequential", "vectorized", "compiled", "handloop", "handvmap", "flower", "pfl")


def format_table(all_results: dict[str, dict[str, Result]]) -> str:
    lines = [f"{'config':<11} {'system':<11} {'threads':>7} {'s/round':>9} {'x vectorized':>12} {'accuracy':>8} "
             f"{'max|d| vs handloop':>18}"]
    for key, results in all_results.items():
        base = results["vectorized"].seconds
        for name in ORDER:
            if name in results:
                r = results[name]
                diff = "" if r.diff is None else f"{r.diff:.1e}"
                lines.append(f"{key:<11} {name:<11} {r.threads:>7} {r.seconds:>9.5f} {r.seconds / base:>12.2f} "
                             f"{r.accuracy:>8.4f} {diff:>18}")
    return "\n".join(lines)


def notes(all_results: dict[str, dict[str, Result]]) -> list[str]:
    """Flower's start-up and memory; accuracy gaps of Flower and pfl from the hand-written loop."""
    out = []
    for key, results in all_results.items():
        for r in results.values():
            if len(r.variants) > 1:
                out.append(f"{r.system} {key}: " + ", ".join(f"{t} thread(s) {s:.5f}" for t, s in r.variants.items())
                           + f" s/round; reported: {r.threads}")
        if "compiled" in results:
            out.append(f"compiled {key}: start-up {results['compiled'].last.startup:.1f} s (a one-round run that "
                       "compiles the steps), outside the window")
        if "flower" in results:
            last = results["flower"].last
            rss = "" if last.peak_rss is None or math.isnan(last.peak_rss) else \
                f", peak RSS of the process tree {last.peak_rss / 2**20:.0f} MiB"
            rounds = last.round_seconds or [math.nan, math.nan]
            out.append(f"flower {key}: start-up {last.startup:.1f} s (Ray, actors, warm-up), shutdown "
                       f"{last.teardown:.1f} s{rss}, outside the window; in it, round 1 {rounds[0]:.3f} s (with the "
                       f"first evaluation), later rounds median {statistics.median(rounds[1:]):.3f} s "
                       "(last repetition)")
        for name in ("flower", "pfl"):
            if name in results and abs(results[name].accuracy - results["handloop"].accuracy) > ACCURACY_GAP:
                out.append(f"WARNING {name} {key}: accuracy {results[name].accuracy:.4f} vs hand-written "
                           f"{results['handloop'].accuracy:.4f}")
    return out


def load() -> str:
    """The 1-minute load average: other work on the machine shows up in every system's times."""
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load average unknown"


def profile_vectorized(rounds: int, test_fraction: float, top: int = 25) -> None:
    """cProfile of `fedsim.run` with the vectorized runtime (1 thread) at 100 clients per round: fedsim's own
    functions (fedsim/, servers/, clients/) by cumulative time, after one unprofiled run."""
    for model in MODELS:
        mapping = fedsim_scenario(Config(model, NUM_CLIENTS), rounds, test_fraction, {"name": "vectorized"})
        fedsim.run(mapping, write=False)
        profiler = cProfile.Profile()
        profiler.enable()
        window = fedsim.run(mapping, write=False).metrics.rows[-1]["wall_time"]
        profiler.disable()
        print(f"== vectorized {model}_{NUM_CLIENTS}: {window / rounds:.4f} s/round under the profiler")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(r"(fedsim|servers|clients)/",
                                                                                        top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fedsim and hand-written loops, 2 rounds: a smoke test")
    parser.add_argument("--repetitions", type=int, help="timed runs per system (default 3; 1 with --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="only a cProfile of the vectorized runtime at 100 clients per round (no ratios)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.profile:
        profile_vectorized(settings.rounds, keep_fraction_test(SEED))
        return 0
    if args.repetitions:
        settings = dataclasses.replace(settings, repetitions=args.repetitions)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    skipped = unavailable(settings)
    for name, why in skipped.items():
        print(f"skipped: {name}: {why}")
    torch.set_num_threads(1)
    test_fraction = keep_fraction_test(SEED)
    print(f"FedAvg, {NUM_CLIENTS} clients x {TRAIN_PER_CLIENT} samples (synthetic_iid seed {SEED}, iid), "
          f"batch {BATCH_SIZE}, lr {LR}, {LOCAL_EPOCHS} epoch; {settings.rounds} rounds x {settings.repetitions} "
          f"repetitions, interleaved; torch {torch.__version__}, {os.cpu_count()} CPUs, {load()}", flush=True)
    all_results: dict[str, dict[str, Result]] = {}
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as tmp:
        for config in (Config(m, k) for m in MODELS for k in CLIENTS_PER_ROUND):
            results = bench(config, settings, test_fraction, skipped, Path(tmp))
            if results is None:
                return 1
            all_results[config.key] = results
            print(f"timed {config.key}: " + ", ".join(f"{r.system} {r.seconds:.4f}" for r in results.values())
                  + " s/round", flush=True)
    print(f"done, {load()}")
    print(format_table(all_results))
    for line in notes(all_results):
        print(line)
    print(json.dumps({k: round(v, 4) for k, v in ratios(all_results).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
