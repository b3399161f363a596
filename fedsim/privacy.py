"""Privacy mechanisms as wrappers, and a run's privacy spend.

A scenario's `privacy:` section names a mechanism (DP-SGD: per-sample clipping and Gaussian noise around any client
rule's gradients) with its accounting settings (`AccountingParams`: delta, the accountants to report, a target
epsilon to calibrate the noise to, a budget that stops the run). `PrivacySpend` counts what the run released and
asks `fedsim.accounting` (Google's dp-accounting, never a hand-written accountant) what that costs; every metrics
row carries epsilon per accountant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from fedsim.accounting import PrivacyLedger, SubsampledGaussian, calibrate_noise_multiplier, calibrate_releases
from fedsim.errors import ScenarioError
from fedsim.registry import Params, Registry

PRIVACY: Registry = Registry("privacy mechanism")
"""Entries: `fn(params, rule, server, population) -> (rule, server)`, wrapping the client rule, the server rule or
both (meta `wraps`: "client", "server", "both"); meta `unit` says what one release protects and when it happens:
"sample" (a record of a client's data, released at each of the client's local steps, DP-SGD) or "user" (a client's
whole data, released at each server step, DP-FedAvg) or "server" (a record of any client's data, released by the
server on a schedule it fixes in advance, private SpiderBoost: meta `schedule`, `fn(params, server_params,
population) -> Schedule`); meta `check` (`fn(params, spec, components)`) refuses settings of its own. Their params
extend `AccountingParams` and have `noise_multiplier`."""

Schedule = Callable[[float, int], tuple[SubsampledGaussian, ...]]
"""The releases of a mechanism's server steps 0 .. steps - 1 at noise multiplier sigma: `schedule(sigma, steps)`."""

Accountant = Literal["rdp", "pld"]


class AccountingParams(Params):
    """How a private run is accounted: (epsilon, delta) by each accountant in `accountants` (the first one also
    calibrates and enforces the budget), the noise calibrated to `target_epsilon` when given, and the run stopped
    before a step that would take epsilon past `epsilon_budget`."""

    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of (epsilon, delta)-DP every row reports")
    accountants: list[Accountant] = Field(
        ["rdp"], min_length=1, description="rdp: Renyi DP with the improved conversion (Balle et al. 2020); pld: "
                                           "privacy loss distributions (tighter, slower); each gives a metrics column "
                                           "epsilon_<accountant>")
    target_epsilon: float | None = Field(None, gt=0, description="calibrate noise_multiplier so the planned run "
                                                                 "spends this epsilon (replaces noise_multiplier)")
    epsilon_budget: float | None = Field(None, gt=0, description="stop the run before the step that would spend "
                                                                 "more than this epsilon")

    @field_validator("accountants")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("name each accountant once")
        return value


def client_rate(protocol: Any, clients_per_round: int | None, num_clients: int) -> float | None:
    """The probability a protocol draws each client with per round when it draws them independently (its
    `client_rate` meta), else None."""
    rate = protocol.entry.meta.get("client_rate")
    return None if rate is None else rate(protocol.params, clients_per_round, num_clients)


def check_privacy(components: dict[str, Any], spec: Any) -> None:
    """What a private scenario cannot honour, found before any data is built (so `fedsim check` reports it): both
    noise_multiplier and target_epsilon, a target without rounds to plan for, and a sampler the accountant does not
    assume (a sample-level mechanism needs Poisson batches, a user-level one Poisson client sampling)."""
    privacy, protocol = components["privacy"], components["protocol"]
    params, unit = privacy.params, privacy.entry.meta["unit"]
    refused = protocol.entry.meta.get("no_privacy") or (
        "its nodes' spends are counted apart on every process" if protocol.entry.meta.get("peer_to_peer") else None)
    if refused:
        raise ScenarioError(f"privacy: protocol {protocol.name!r} cannot account a private run: {refused}")
    if unit == "sample" and components["algorithm"].entry.meta.get("no_dpsgd"):
        algorithm = components["algorithm"]
        raise ScenarioError(f"privacy.name: {privacy.name} accounts one private gradient of a Poisson batch per local "
                            f"step, which algorithm {algorithm.name!r} is not: {algorithm.entry.meta['no_dpsgd']}")
    if unit == "sample" and getattr(components["task"].params, "ridge", 0.0):
        raise ScenarioError(f"task.ridge: privacy {privacy.name} would clip the penalty's gradient with each "
                            f"sample's, so one sample could move a step by more than the clip; set ridge: 0")
    check = privacy.entry.meta.get("check")
    if check is not None:
        check(params, spec, components)
    if unit in ("user", "server") and spec.compression.uplink is not None:
        raise ScenarioError(f"compression.uplink: privacy {privacy.name} clips each client's message before the "
                            f"uplink codec, which can enlarge it again (random-k's d/k scaling, error feedback); "
                            f"remove the uplink codec")
    if params.target_epsilon is not None and "noise_multiplier" in params.model_fields_set:
        raise ScenarioError("privacy.target_epsilon: give either noise_multiplier or target_epsilon, not both "
                            "(target_epsilon calibrates the noise multiplier)")
    if params.target_epsilon is not None and spec.rounds is None:
        raise ScenarioError("privacy.target_epsilon: calibrating the noise needs the run's length in rounds "
                            "(rounds); with time_budget alone, give noise_multiplier")
    sampling = components["algorithm"].params.sampling
    if unit == "sample" and sampling != "poisson":
        raise ScenarioError(f"algorithm.sampling: privacy {privacy.name} needs Poisson-sampled batches (sampling: "
                            f"poisson), which its accountant assumes; {sampling!r} batches are refused")
    if unit == "user" and client_rate(components["protocol"], spec.clients_per_round, spec.num_clients) is None:
        raise ScenarioError(f"protocol.client_sampling: privacy {privacy.name} protects whole clients, and its "
                            f"accountant assumes each is sampled independently each round: use protocol: {{name: "
                            f"synchronous, client_sampling: poisson}}")


@dataclass(frozen=True)
class Population:
    """What a mechanism may know of the clients: their training sizes, and the rate q at which the protocol samples
    each of them independently per round (None when it samples otherwise)."""

    train_sizes: np.ndarray
    client_rate: float | None


@dataclass
class SampleLevelSpend:
    """What a sample-level mechanism (DP-SGD) released: each client's local steps so far, every step a Poisson
    sample of rate batch_size / n_i of that client's data under noise multiplier sigma. Its epsilon is the worst
    client's, bounded by composing the most steps any client took at the largest rate any client has (exact when
    every client holds the same number of samples). Units: local steps."""

    noise_multiplier: float
    sampling_rate: float
    steps: np.ndarray

    def commit(self, client: int, steps: int) -> None:
        self.steps[client] += steps

    def server_step(self) -> None:
        """Server steps release nothing of a client's samples."""

    def events(self, extra: int = 0) -> tuple[SubsampledGaussian, ...]:
        most = int(self.steps.max(initial=0)) + extra
        return (SubsampledGaussian(self.noise_multiplier, self.sampling_rate, most),) if most else ()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = np.asarray(state["steps"], dtype=np.int64).copy()


@dataclass
class ServerStepSpend:
    """What a mechanism released at server steps: `schedule(sigma, steps)` for the steps taken, each release a
    Poisson sample (of clients for DP-FedAvg, one (z, q) release a round for every user alike; of every client's
    records for private SpiderBoost, whose schedule mixes checkpoints and differences). Releases are composed in any
    order (composition does not depend on it), so equal (sigma, q) pairs are merged into one record.
    `sampling_rate` is the largest rate of the planned schedule (for reports). Units: server steps."""

    noise_multiplier: float
    sampling_rate: float
    schedule: Schedule
    rounds: int = 0

    def commit(self, client: int, steps: int) -> None:
        """A client's job releases nothing by itself: the server's noisy step does."""

    def server_step(self) -> None:
        self.rounds += 1

    def events(self, extra: int = 0) -> tuple[SubsampledGaussian, ...]:
        return merged_releases(self.schedule(self.noise_multiplier, self.rounds + extra))

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])


def every_round(rate: float) -> Schedule:
    """One release at (sigma, `rate`) per server step: a user-level mechanism's schedule."""
    return lambda sigma, steps: (SubsampledGaussian(sigma, rate, steps),) if steps else ()


def merged_releases(releases: tuple[SubsampledGaussian, ...]) -> tuple[SubsampledGaussian, ...]:
    """The releases with equal (sigma, q) merged into one record each, in order of first appearance."""
    counts: Counter[tuple[float, float]] = Counter()
    for release in releases:
        counts[(release.noise_multiplier, release.sampling_rate)] += release.count
    return tuple(SubsampledGaussian(sigma, q, count) for (sigma, q), count in counts.items() if count)


Spend = SampleLevelSpend | ServerStepSpend


class PrivacySpend:
    """A run's privacy spend under one mechanism: counted as results are committed and server steps taken, reported
    per metrics row, checked against the budget before each server step."""

    def __init__(self, params: AccountingParams, spend: Spend, step_bound: int,
                 planned: int = 0) -> None:
        self.params, self.spend = params, spend
        self.step_bound = step_bound
        """What one more server step can add to the spend's units at most (a full job's local steps; one round)."""
        self.planned = planned
        """The spend's units over the whole run at most (every round a full job for the worst client; the rounds)."""

    def commit(self, client: int, steps: int) -> None:
        """A client's job of `steps` local steps has run and its result arrived."""
        self.spend.commit(client, steps)

    def server_step(self) -> None:
        """The server has taken a step (a round)."""
        self.spend.server_step()

    def epsilon(self, accountant: str, extra: int = 0) -> float:
        """Epsilon spent so far (and `extra` more units) by `accountant`."""
        return _epsilon_of(self.spend.events(extra), self.params.delta, accountant)

    def metrics(self) -> dict[str, float]:
        """`epsilon_<accountant>` for each accountant, and the delta they are at."""
        return {**{f"epsilon_{a}": self.epsilon(a) for a in self.params.accountants}, "delta": self.params.delta}

    def next_step_exceeds_budget(self) -> bool:
        """Whether one more server step could spend more than the budget."""
        budget = self.params.epsilon_budget
        return budget is not None and self.epsilon(self.params.accountants[0], self.step_bound) > budget

    def plan(self) -> dict[str, float]:
        """What the whole run spends at most, without running it: the noise multiplier, the sampling rate, the
        planned releases and epsilon per accountant."""
        return {"noise_multiplier": self.spend.noise_multiplier, "sampling_rate": self.spend.sampling_rate,
                "releases": self.planned, "delta": self.params.delta,
                **{f"epsilon_{a}": self.epsilon(a, self.planned) for a in self.params.accountants}}

    def state_dict(self) -> dict[str, Any]:
        return self.spend.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spend.load_state_dict(state)


def _epsilon_of(events: tuple[SubsampledGaussian, ...], delta: float, accountant: str) -> float:
    """The library's epsilon for the records (0 for none)."""
    ledger = PrivacyLedger()
    for event in events:
        ledger.record(event.noise_multiplier, event.sampling_rate, event.count)
    return ledger.epsilon(delta, accountant)


def build_spend(params: Params, unit: str, rate: float, step_bound: int, planned: int, num_clients: int,
                schedule: Schedule | None = None) -> tuple[PrivacySpend, float, str | None]:
    """A run's spend for a mechanism releasing per local step of a client (`unit` "sample", units local steps), per
    server step (`unit` "user", units rounds) at sampling rate `rate`, or on the server's `schedule` (`unit`
    "server", units server steps); its noise multiplier (calibrated to `target_epsilon` over `planned` units when
    asked) and a notice saying what was calibrated."""
    sigma, notice = params.noise_multiplier, None
    what = {"sample": "local steps of a client", "user": "rounds", "server": "server steps"}[unit]
    if params.target_epsilon is not None:
        accountant = params.accountants[0]
        if unit != "server":
            sigma = calibrate_noise_multiplier(params.target_epsilon, params.delta, rate, max(1, planned), accountant,
                                               field="privacy")
        else:
            sigma = calibrate_releases(params.target_epsilon, params.delta,
                                       lambda s: merged_releases(schedule(s, max(1, planned))), accountant,
                                       "privacy", f"{planned} {what}")
        rates = "sampling rates up to" if unit == "server" else "sampling rate"
        notice = (f"privacy: noise_multiplier {sigma:.4g} spends epsilon {params.target_epsilon:g} at delta "
                  f"{params.delta:g} ({accountant}) over {planned} {what} at {rates} {rate:.4g}")
    if unit == "sample":
        spend: Spend = SampleLevelSpend(sigma, rate, np.zeros(num_clients, dtype=np.int64))
    else:
        spend = ServerStepSpend(sigma, rate, every_round(rate) if unit == "user" else schedule)
    return PrivacySpend(params, spend, step_bound, planned), sigma, notice
