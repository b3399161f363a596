"""Privacy accounting: a ledger of privacy events whose (epsilon, delta) cost comes from Google's `dp-accounting`.

fedsim never hand-writes an accountant. A private run records each release of the Poisson-subsampled Gaussian
mechanism here (run-length, so a million steps stay one record), and `PrivacyLedger.epsilon` builds one
`dp_accounting` event from the records and asks the library's RDP or PLD accountant what it costs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting import mechanism_calibration, pld, rdp

from fedsim.errors import ScenarioError

ACCOUNTANTS = ("rdp", "pld")
"""rdp: `dp_accounting.rdp.RdpAccountant`, Renyi DP at the library's default orders, converted to (epsilon, delta) with
the improved conversion of Balle et al. 2020 (arXiv:2001.05990, Eq. 20; Canonne et al. 2020, Prop. 12).
pld: `dp_accounting.pld.PLDAccountant`, privacy loss distributions at the library's default discretization, whose
epsilon for a given delta is read off the composed distribution (tighter than rdp, slower)."""

MAX_NOISE_MULTIPLIER = 1e4
"""The largest sigma `calibrate_noise_multiplier` tries; a target still unmet there is unreachable."""

MIN_NOISE_MULTIPLIER = 1e-2
"""The smallest sigma `calibrate_noise_multiplier` tries: a target met even there says nothing useful (and PLD takes
minutes per evaluation at such sigmas)."""

_CALIBRATION_RELATIVE_TOL = 5e-4
"""Brent's tolerance on sigma, relative to the bracket's lower end. The library may step the root by one tolerance
to stay under target, so sigma is within 0.1% of the optimum; epsilon falls at most about 2.5 times as fast as
sigma rises (eps ~ 1/sigma^2 at large epsilon), so the returned epsilon is within 0.5% of target."""


@dataclass(frozen=True)
class SubsampledGaussian:
    """`count` releases of the Gaussian mechanism with noise multiplier sigma, each on a Poisson subsample of rate q.

    q = 1 means no subsampling. The neighbouring relation is add-or-remove-one (the `dp_accounting` default).
    """

    noise_multiplier: float
    sampling_rate: float
    count: int = 1


def _real(value: Any, field: str) -> float:
    """`value` as a float, or a one-line ScenarioError naming `field` when it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ScenarioError(f"{field}: expected a number, got {value!r}")
    return float(value)


def check_noise_multiplier(value: Any, field: str) -> float:
    """A noise multiplier (sigma) as a float: finite and >= 0 (0 means no noise, so epsilon is infinite)."""
    sigma = _real(value, field)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ScenarioError(f"{field}: the noise multiplier must be a finite number >= 0, got {value!r}")
    return sigma


def check_sampling_rate(value: Any, field: str) -> float:
    """A Poisson sampling rate q as a float, in (0, 1] (1 means every example takes part)."""
    q = _real(value, field)
    if not 0 < q <= 1:
        raise ScenarioError(f"{field}: the sampling rate must be in (0, 1], got {value!r}")
    return q


def check_delta(value: Any, field: str) -> float:
    """A privacy delta as a float, in the open interval (0, 1)."""
    delta = _real(value, field)
    if not 0 < delta < 1:
        raise ScenarioError(f"{field}: delta must be in (0, 1), got {value!r}")
    return delta


def check_clip(value: Any, field: str) -> float:
    """A clipping norm as a float: finite and > 0."""
    clip = _real(value, field)
    if not (math.isfinite(clip) and clip > 0):
        raise ScenarioError(f"{field}: the clipping norm must be a finite number > 0, got {value!r}")
    return clip


def _check_count(value: Any, field: str) -> int:
    """A number of releases: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScenarioError(f"{field}: the count must be an integer >= 1, got {value!r}")
    return value


def _check_accountant(value: Any, field: str) -> str:
    """One of ACCOUNTANTS."""
    if value not in ACCOUNTANTS:
        raise ScenarioError(f"{field}: expected one of {', '.join(ACCOUNTANTS)}, got {value!r}")
    return value


def _append(events: tuple[SubsampledGaussian, ...], event: SubsampledGaussian) -> tuple[SubsampledGaussian, ...]:
    """`events` followed by `event`, merged into the last record when (sigma, q) are equal (run-length)."""
    if events:
        last = events[-1]
        if (last.noise_multiplier, last.sampling_rate) == (event.noise_multiplier, event.sampling_rate):
            return (*events[:-1], SubsampledGaussian(last.noise_multiplier, last.sampling_rate,
                                                     last.count + event.count))
    return (*events, event)


def _dp_event(events: tuple[SubsampledGaussian, ...]) -> dp_accounting.DpEvent:
    """One `dp_accounting` event composing every record (a plain Gaussian where q = 1)."""
    parts = []
    for event in events:
        mechanism: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(event.noise_multiplier)
        if event.sampling_rate < 1:
            mechanism = dp_accounting.PoissonSampledDpEvent(event.sampling_rate, mechanism)
        parts.append(dp_accounting.SelfComposedDpEvent(mechanism, event.count))
    return dp_accounting.ComposedDpEvent(parts)


_NEW_ACCOUNTANT: dict[str, Callable[[], dp_accounting.PrivacyAccountant]] = {
    "rdp": rdp.RdpAccountant,
    "pld": pld.PLDAccountant,
}


@functools.lru_cache(maxsize=64)
def _epsilon(events: tuple[SubsampledGaussian, ...], delta: float, accountant: str) -> float:
    """The library's epsilon at `delta` for the composed records; cached, since runs ask again each step."""
    if not events:
        return 0.0
    if any(event.noise_multiplier == 0 for event in events):
        return math.inf
    with _quiet_library():
        return float(_NEW_ACCOUNTANT[accountant]().compose(_dp_event(events)).get_epsilon(delta))


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """Silence dp-accounting's absl warnings while it runs: at large sampling rates its RDP accountant drops the
    orders where a series fails to converge (1.1 to 1.5 at q = 0.1, sigma = 1) and says so once per order, per
    call; dropping orders only loosens the bound, so the warning tells a user of fedsim nothing to act on."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _validated(noise_multiplier: Any, sampling_rate: Any, count: Any) -> SubsampledGaussian:
    """A record from checked fields (field names as `PrivacyLedger.record`'s arguments)."""
    return SubsampledGaussian(check_noise_multiplier(noise_multiplier, "noise_multiplier"),
                              check_sampling_rate(sampling_rate, "sampling_rate"), _check_count(count, "count"))


class PrivacyLedger:
    """The privacy events of one run, run-length encoded; their epsilon comes from `dp_accounting`."""

    def __init__(self) -> None:
        self._events: tuple[SubsampledGaussian, ...] = ()

    @property
    def events(self) -> tuple[SubsampledGaussian, ...]:
        """The records in order; adjacent records differ in (sigma, q)."""
        return self._events

    @property
    def steps(self) -> int:
        """How many releases were recorded in all."""
        return sum(event.count for event in self._events)

    def record(self, noise_multiplier: float, sampling_rate: float, count: int = 1) -> None:
        """Append `count` releases with (sigma, q), merged into the last record when (sigma, q) are equal."""
        self._events = _append(self._events, _validated(noise_multiplier, sampling_rate, count))

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon at `delta` for everything recorded: 0.0 when empty, inf when some record has sigma 0."""
        return _epsilon(self._events, check_delta(delta, "delta"), _check_accountant(accountant, "accountant"))

    def epsilon_with(self, extra: SubsampledGaussian, delta: float, accountant: str = "rdp") -> float:
        """Epsilon after also recording `extra`, without recording it: a budget stops a run before exceeding it."""
        event = _validated(extra.noise_multiplier, extra.sampling_rate, extra.count)
        return _epsilon(_append(self._events, event), check_delta(delta, "delta"),
                        _check_accountant(accountant, "accountant"))

    def state_dict(self) -> dict[str, list[dict[str, float | int]]]:
        """The records as plain data (for a checkpoint without pickle)."""
        return {"events": [{"noise_multiplier": event.noise_multiplier, "sampling_rate": event.sampling_rate,
                            "count": event.count} for event in self._events]}

    def load_state_dict(self, state: dict[str, list[dict[str, float | int]]]) -> None:
        """Replace the records by those of `state_dict()`'s output, checking each."""
        events: tuple[SubsampledGaussian, ...] = ()
        for item in state["events"]:
            events = _append(events, _validated(item["noise_multiplier"], item["sampling_rate"], item["count"]))
        self._events = events

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._events == other._events

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PrivacyLedger({list(self._events)!r})"


Releases = Callable[[float], tuple[SubsampledGaussian, ...]]
"""A run's releases as a function of its noise multiplier sigma (a schedule may scale several multipliers by it)."""


def _bracket(epsilon_at: Callable[[float], float], target: float, start: float,
             factor: float) -> tuple[float, float]:
    """Sigmas (low, high) with epsilon(low) > target >= epsilon(high), stepping from `start` by `factor` (> 1).

    Assumes epsilon(MAX_NOISE_MULTIPLIER) <= target, so growing stops there.
    """
    if epsilon_at(start) > target:
        low = start
        while epsilon_at(min(low * factor, MAX_NOISE_MULTIPLIER)) > target:
            low *= factor
        return low, min(low * factor, MAX_NOISE_MULTIPLIER)
    high = start
    while high / factor >= MIN_NOISE_MULTIPLIER and epsilon_at(high / factor) <= target:
        high /= factor
    return high / factor, high


def _calibrate(accountant: str, target: float, delta: float, releases: Releases, start: float,
               factor: float) -> float:
    """The library's Brent search for the smallest sigma meeting `target`, on a bracket grown from `start`."""
    low, high = _bracket(lambda s: _epsilon(releases(s), delta, accountant), target, start, factor)
    with _quiet_library():
        sigma = mechanism_calibration.calibrate_dp_mechanism(
            _NEW_ACCOUNTANT[accountant], lambda s: _dp_event(releases(s)), target, delta,
            mechanism_calibration.ExplicitBracketInterval(low, high), tol=_CALIBRATION_RELATIVE_TOL * low)
    return float(sigma)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                               accountant: str = "rdp", field: str = "privacy") -> float:
    """The smallest sigma whose `steps` releases at rate q cost at most `target_epsilon` at `delta`.

    Uses `dp_accounting.calibrate_dp_mechanism` (Brent's method) on a bracket grown from sigma 1 (from RDP's sigma
    for PLD, which needs a little less noise); the result's epsilon is <= target and within 0.5% of it. An
    unreachable target is a one-line ScenarioError naming `{field}.target_epsilon`.
    """
    q = check_sampling_rate(sampling_rate, f"{field}.sampling_rate")
    steps = _check_count(steps, f"{field}.steps")
    return calibrate_releases(target_epsilon, delta, lambda s: (SubsampledGaussian(s, q, steps),), accountant,
                              field, f"{steps} steps at sampling rate {q:g}")


def calibrate_releases(target_epsilon: float, delta: float, releases: Releases, accountant: str = "rdp",
                       field: str = "privacy", what: str = "the planned releases") -> float:
    """The smallest sigma for which `releases(sigma)` cost at most `target_epsilon` at `delta`, as
    `calibrate_noise_multiplier` finds it for one kind of release; `what` names the releases in errors. The
    schedule's epsilon must fall as sigma grows (every multiplier in it proportional to sigma)."""
    target = _real(target_epsilon, f"{field}.target_epsilon")
    delta = check_delta(delta, f"{field}.delta")
    accountant = _check_accountant(accountant, f"{field}.accountant")
    for sigma in (MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER):
        for event in releases(sigma):
            _validated(event.noise_multiplier, event.sampling_rate, event.count)

    if not (math.isfinite(target) and target > 0):
        raise ScenarioError(f"{field}.target_epsilon: must be a finite number > 0, got {target_epsilon!r}")
    if _epsilon(releases(MIN_NOISE_MULTIPLIER), delta, "rdp") <= target:
        raise ScenarioError(f"{field}.target_epsilon: {target_epsilon!r} is met by any noise multiplier from "
                            f"{MIN_NOISE_MULTIPLIER:g} for {what} (delta {delta:g}): give the noise multiplier itself")
    reached = _epsilon(releases(MAX_NOISE_MULTIPLIER), delta, accountant)
    if reached > target:
        raise ScenarioError(f"{field}.target_epsilon: {target_epsilon!r} is unreachable for {what} (delta "
                            f"{delta:g}, {accountant}): even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon "
                            f"{reached:.4g}")
    start, factor = 1.0, 2.0
    if accountant != "rdp" and _epsilon(releases(MAX_NOISE_MULTIPLIER), delta, "rdp") <= target:
        # PLD costs seconds per evaluation at large epsilon: start from RDP's sigma, a little above PLD's.
        start, factor = _calibrate("rdp", target, delta, releases, 1.0, 2.0), 1.1
    return _calibrate(accountant, target, delta, releases, start, factor)
