"""The privacy ledger: epsilons from dp-accounting matching reference values and Opacus, run-length records that
compose like the step-by-step history, noise calibration, a checkpointable state, and one-line errors."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedsim import accounting
from fedsim.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    SubsampledGaussian,
    calibrate_noise_multiplier,
    check_clip,
    check_delta,
    check_noise_multiplier,
    check_sampling_rate,
)
from fedsim.errors import ScenarioError

# (q, sigma, T, delta, rdp epsilon, pld epsilon), computed independently with dp-accounting 0.6.
REFERENCES = [
    (256 / 60000, 1.1, 14062, 1e-5, 2.597, 2.382),
    (1.0, 1.0, 1, 1e-5, 4.729, 4.377),
    (0.01, 8.0, 10000, 1e-5, 0.481, 0.437),
    (0.01, 4.0, 10000, 1e-5, 1.035, 0.947),
    (0.01, 2.0, 70000, 1e-5, 7.081, 6.571),
    (0.00655, 1.0, 5000, 1e-9, 4.183, 3.899),
    (0.1, 1.0, 1000, 1e-3, 22.56, 19.71),
    (0.01, 1.1, 10000, 1e-5, 5.632, 5.193),
]

MIXED = [(1.0, 0.01, 300), (2.0, 0.02, 200), (1.0, 0.01, 300)]


def ledger_of(history: list[tuple[float, float, int]]) -> PrivacyLedger:
    """A ledger with each (sigma, q, count) recorded run-length."""
    ledger = PrivacyLedger()
    for sigma, q, count in history:
        ledger.record(sigma, q, count)
    return ledger


@pytest.mark.parametrize("q, sigma, steps, delta, rdp_eps, pld_eps", REFERENCES)
def test_epsilon_matches_reference_values_to_one_percent(q, sigma, steps, delta, rdp_eps, pld_eps):
    ledger = ledger_of([(sigma, q, steps)])
    assert ledger.epsilon(delta, "rdp") == pytest.approx(rdp_eps, rel=0.01)
    assert ledger.epsilon(delta, "pld") == pytest.approx(pld_eps, rel=0.01)


def test_pld_of_one_gaussian_matches_the_exact_gaussian_epsilon():
    exact = dp_accounting.get_epsilon_gaussian(1.0, 1e-5)
    assert exact == pytest.approx(4.3772, rel=1e-4)
    assert ledger_of([(1.0, 1.0, 1)]).epsilon(1e-5, "pld") == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("q, sigma, steps, delta, rdp_eps, pld_eps",
                         [case for case in REFERENCES if case[0] != 0.1])
def test_rdp_epsilon_matches_opacus_rdp_accountant(q, sigma, steps, delta, rdp_eps, pld_eps):
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    assert ledger_of([(sigma, q, steps)]).epsilon(delta, "rdp") == pytest.approx(opacus.get_epsilon(delta), rel=0.01)


def test_rdp_epsilon_of_a_mixed_history_matches_opacus():
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = list(MIXED)
    assert ledger_of(MIXED).epsilon(1e-5) == pytest.approx(opacus.get_epsilon(1e-5), rel=0.01)


def test_pld_epsilon_matches_opacus_prv_accountant_to_two_percent():
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.history = [(1.1, 0.01, 10000)]
    expected = prv.get_epsilon(1e-5, eps_error=0.01)
    assert ledger_of([(1.1, 0.01, 10000)]).epsilon(1e-5, "pld") == pytest.approx(expected, rel=0.02)


def test_records_with_equal_sigma_and_rate_merge_into_one():
    ledger = PrivacyLedger()
    for _ in range(1000):
        ledger.record(1.1, 0.01)
    assert ledger.events == (SubsampledGaussian(1.1, 0.01, 1000),)
    assert ledger.steps == 1000


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_step_by_step_history_costs_what_its_run_length_form_and_direct_composition_cost(accountant):
    stepwise = PrivacyLedger()
    for sigma, q, count in MIXED:
        for _ in range(count):
            stepwise.record(sigma, q)
    run_length = ledger_of(MIXED)
    assert stepwise == run_length and len(stepwise.events) == 3 and stepwise.steps == 800
    direct = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for s, q, n in MIXED])
    library = {"rdp": rdp.RdpAccountant, "pld": pld.PLDAccountant}[accountant]()
    expected = library.compose(direct).get_epsilon(1e-5)
    assert stepwise.epsilon(1e-5, accountant) == pytest.approx(expected, rel=1e-9)
    assert run_length.epsilon(1e-5, accountant) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_heterogeneous_history_costs_between_its_all_low_and_all_high_noise_versions(accountant):
    mixed = ledger_of([(1.0, 0.01, 300), (2.0, 0.01, 200), (1.0, 0.01, 300)]).epsilon(1e-5, accountant)
    all_low_noise = ledger_of([(1.0, 0.01, 800)]).epsilon(1e-5, accountant)
    all_high_noise = ledger_of([(2.0, 0.01, 800)]).epsilon(1e-5, accountant)
    assert all_high_noise < mixed < all_low_noise


def test_empty_ledger_costs_nothing_and_zero_noise_costs_infinity():
    ledger = PrivacyLedger()
    assert ledger.epsilon(1e-5) == 0.0 and ledger.steps == 0
    ledger.record(1.0, 0.01, 10)
    ledger.record(0.0, 0.01)
    for accountant in ACCOUNTANTS:
        assert ledger.epsilon(1e-5, accountant) == math.inf


def test_asking_twice_for_epsilon_builds_no_second_accountant(monkeypatch):
    built = []

    def counting_accountant():
        built.append(1)
        return rdp.RdpAccountant()

    monkeypatch.setitem(accounting._NEW_ACCOUNTANT, "rdp", counting_accountant)
    ledger = ledger_of([(1.2345, 0.0321, 77)])
    first = ledger.epsilon(1e-5)
    assert ledger.epsilon(1e-5) == first and len(built) == 1


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_epsilon_with_equals_epsilon_after_recording_and_leaves_the_ledger_unchanged(accountant):
    ledger = ledger_of(MIXED)
    before = ledger_of(MIXED)
    for extra in (SubsampledGaussian(1.0, 0.01, 1), SubsampledGaussian(3.0, 0.05, 10)):
        predicted = ledger.epsilon_with(extra, 1e-5, accountant)
        assert ledger == before
        after = ledger_of([*MIXED, (extra.noise_multiplier, extra.sampling_rate, extra.count)])
        assert predicted == after.epsilon(1e-5, accountant)


def test_state_dict_round_trip_gives_an_equal_ledger_and_the_same_epsilon():
    ledger = ledger_of(MIXED)
    state = ledger.state_dict()
    assert json.loads(json.dumps(state)) == state
    restored = PrivacyLedger()
    restored.load_state_dict(state)
    assert restored == ledger
    assert restored.epsilon(1e-5) == ledger.epsilon(1e-5)


def test_state_dict_holds_only_plain_python_data():
    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (int, float)

    assert plain(ledger_of(MIXED).state_dict())


def test_calibrated_rdp_sigma_matches_reference():
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 0.01, 10000)
    assert sigma == pytest.approx(2.2781, rel=0.005)


CALIBRATIONS = [(2.0, 0.01, 10000), (1.0, 1.0, 1), (0.05, 1.0, 100), (10.0, 0.1, 1000), (50.0, 0.01, 100)]


@pytest.mark.parametrize("accountant, target, q, steps", [
    *[("rdp", *case) for case in CALIBRATIONS],
    *[("pld", *case) for case in CALIBRATIONS[:-1]],
    # PLD at sigma near 0.2 costs seconds per evaluation: about a minute in all.
    pytest.param("pld", *CALIBRATIONS[-1], marks=pytest.mark.slow),
])
def test_calibrated_sigma_meets_the_target_within_half_a_percent(accountant, target, q, steps):
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, accountant)
    reached = ledger_of([(sigma, q, steps)]).epsilon(1e-5, accountant)
    assert target * 0.995 <= reached <= target


def test_unreachable_target_is_a_one_line_error_naming_the_field():
    with pytest.raises(ScenarioError, match=r"^privacy\.target_epsilon: 1e-06 is unreachable") as err:
        calibrate_noise_multiplier(1e-6, 1e-5, 1.0, 10**6)
    assert "\n" not in str(err.value) and "1000000" in str(err.value)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, math.nan])
def test_a_target_that_is_not_a_positive_number_is_refused_as_such(target):
    with pytest.raises(ScenarioError, match=r"^privacy\.target_epsilon: must be a finite number > 0"):
        calibrate_noise_multiplier(target, 1e-5, 1.0, 100)


def test_a_target_any_noise_meets_asks_for_the_noise_multiplier_instead():
    with pytest.raises(ScenarioError, match=r"^privacy\.target_epsilon: 1000000\.0 is met by any noise multiplier"):
        calibrate_noise_multiplier(1e6, 1e-5, 0.001, 10)


@pytest.mark.parametrize("check, value", [
    (check_noise_multiplier, -0.1), (check_noise_multiplier, math.inf), (check_noise_multiplier, math.nan),
    (check_sampling_rate, 0.0), (check_sampling_rate, -0.5), (check_sampling_rate, 1.01),
    (check_delta, 0.0), (check_delta, 1.0), (check_delta, 2.0),
    (check_clip, 0.0), (check_clip, -1.0), (check_clip, math.inf), (check_clip, "1"),
])
def test_bad_value_is_a_one_line_error_naming_the_field(check, value):
    with pytest.raises(ScenarioError, match=r"^privacy\.x: ") as err:
        check(value, "privacy.x")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sigma, q, delta, field", [
    (-1.0, 0.01, 1e-5, "noise_multiplier"), (1.0, 0.0, 1e-5, "sampling_rate"), (1.0, 1.5, 1e-5, "sampling_rate"),
    (1.0, 0.01, 0.0, "delta"), (1.0, 0.01, 1.0, "delta"),
])
def test_ledger_refuses_bad_records_and_deltas_naming_the_field(sigma, q, delta, field):
    with pytest.raises(ScenarioError, match=rf"^{field}: ") as err:
        ledger = PrivacyLedger()
        ledger.record(sigma, q)
        ledger.epsilon(delta)
    assert "\n" not in str(err.value)


def test_valid_values_pass_their_checks_as_floats():
    assert check_noise_multiplier(0, "f") == 0.0 and check_sampling_rate(1, "f") == 1.0
    assert check_sampling_rate(np.float32(0.5), "f") == 0.5 and check_clip(np.int64(3), "f") == 3.0
    assert check_delta(1e-5, "f") == 1e-5 and check_clip(2, "f") == 2.0
