"""Client availability (on/off windows, available with probability p per period) and mid-job dropouts, options of
every systems profile, drawn from the seed so every runtime sees the same ones."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.errors import ScenarioError
from fedsim.systems import SYSTEMS, ClientSystems, JobPhases

WINDOWS = {"kind": "windows", "online": 3.0, "offline": 7.0}
BERNOULLI = {"kind": "bernoulli", "p": 0.3, "period": 10.0}


def profile(name: str = "homogeneous", num_clients: int = 50, seed: int = 0, **params) -> ClientSystems:
    entry, validated = SYSTEMS.resolve({"name": name, **params}, "systems")
    return entry.obj(validated, num_clients, np.random.default_rng(seed))


def test_every_profile_takes_availability_and_dropout():
    for entry in SYSTEMS:
        assert {"availability", "dropout"} <= set(entry.params.model_fields), entry.name


def test_always_available_by_default_and_jobs_complete():
    systems = profile()
    assert systems.available_mask(np.arange(50), 123.4).all()
    assert systems.available_from(7, 5.5) == 5.5
    assert systems.drop_time(0, 7, 5.5, JobPhases(1.0, 100.0, 1.0)) is None


def test_availability_and_dropout_leave_the_speeds_and_compute_draws_as_they_were():
    plain = profile("tiers", compute="exponential")
    extra = profile("tiers", compute="exponential", availability=BERNOULLI, dropout=0.3)
    assert (plain.speed == extra.speed).all()
    assert [plain.job_seconds(j, 3, 10, 0, 0) for j in range(20)] == [extra.job_seconds(j, 3, 10, 0, 0)
                                                                       for j in range(20)]


def test_availability_is_dumped_with_only_its_kinds_fields_and_reads_back_the_same():
    entry, params = SYSTEMS.resolve({"name": "tiers", "availability": WINDOWS}, "systems")
    dumped = params.model_dump(mode="json")
    assert dumped["availability"] == WINDOWS
    assert SYSTEMS.resolve({"name": "tiers", **dumped}, "systems")[1] == params
    assert SYSTEMS.resolve({"name": "tiers"}, "systems")[1].model_dump()["availability"] == {"kind": "always"}


def test_windows_keep_clients_available_for_on_over_on_plus_off_of_the_time():
    systems = profile(num_clients=200, availability=WINDOWS)
    fraction = np.mean([systems.available_mask(np.arange(200), t).mean() for t in np.linspace(0.0, 1000.0, 401)])
    assert fraction == pytest.approx(0.3, abs=0.02)


def test_zero_phase_windows_open_together_at_zero_and_available_from_jumps_to_the_next_one():
    systems = profile(num_clients=4, availability={**WINDOWS, "phase": "zero"})
    assert systems.available_mask([0, 1, 2, 3], 0.0).all() and systems.available_mask([0, 1, 2, 3], 2.99).all()
    assert not systems.available_mask([0, 1, 2, 3], 3.0).any() and not systems.available_mask([2], 9.99).any()
    assert systems.available_from(2, 1.0) == 1.0
    assert systems.available_from(2, 3.0) == systems.available_from(2, 9.0) == 10.0
    assert systems.available_from(2, 13.5) == 20.0


def test_available_from_is_the_first_available_moment_for_random_phases():
    systems = profile(num_clients=100, availability=WINDOWS)
    clients, t = np.arange(100), 41.3
    times = systems.available_times(clients, t)
    assert (times >= t).all() and (times - t <= 7.0).all()
    assert all(systems.available_mask([c], times[c])[0] for c in clients)
    waiting = np.flatnonzero(times > t)
    assert 40 < len(waiting) < 90
    for fraction in (0.01, 0.5, 0.99):
        probes = t + fraction * (times - t)
        assert not any(systems.available_mask([c], probes[c])[0] for c in waiting)
    assert [systems.available_from(c, t) for c in range(100)] == times.tolist()


def test_a_job_running_past_its_window_is_dropped_where_the_window_closes():
    systems = profile(num_clients=2, availability={**WINDOWS, "phase": "zero"})
    assert systems.drop_time(0, 1, 1.0, JobPhases(0.5, 4.0, 0.5)) == pytest.approx(2.0)
    assert systems.drop_time(0, 1, 1.0, JobPhases(0.5, 1.0, 0.5)) is None
    assert systems.drop_time(0, 1, 1.0, JobPhases(0.5, 1.0, 0.5 + 2 ** -20)) is not None
    assert systems.drop_time(0, 1, 12.0, JobPhases(0.0, 1.0, 0.0)) is None
    assert systems.drop_time(0, 1, 4.0, JobPhases(0.0, 1.0, 0.0)) == 0.0


def test_windows_without_off_time_are_always_available():
    systems = profile(num_clients=3, availability={"kind": "windows", "online": 1.0, "offline": 0.0})
    assert systems.available_mask([0, 1, 2], 17.3).all()
    assert systems.drop_time(0, 0, 0.0, JobPhases(0.0, 50.0, 0.0)) is None


def test_bernoulli_clients_are_available_a_fraction_p_of_periods_constant_within_each():
    systems = profile(num_clients=100, availability=BERNOULLI)
    masks = np.array([systems.available_mask(np.arange(100), 10.0 * k) for k in range(400)])
    assert masks.mean() == pytest.approx(0.3, abs=0.02)
    assert (masks[7] == systems.available_mask(np.arange(100), 79.99)).all()
    per_client = masks.mean(axis=0)
    assert per_client.min() > 0.1 and per_client.max() < 0.5


def test_bernoulli_draws_are_keyed_by_seed_period_and_client():
    first, again, other = (profile(num_clients=300, seed=s, availability=BERNOULLI) for s in (4, 4, 5))
    assert (first.available_mask(np.arange(300), 55.0) == again.available_mask(np.arange(300), 55.0)).all()
    assert (first.available_mask(np.arange(300), 55.0) != other.available_mask(np.arange(300), 55.0)).any()
    assert (first.available_mask(np.arange(300), 55.0) != first.available_mask(np.arange(300), 65.0)).any()
    subset = np.array([250, 3, 17])
    assert (first.available_mask(subset, 55.0) == first.available_mask(np.arange(300), 55.0)[subset]).all()


def test_bernoulli_available_from_is_the_start_of_the_next_available_period():
    systems = profile(num_clients=60, availability=BERNOULLI)
    t = 123.0
    times = systems.available_times(np.arange(60), t)
    for client, when in enumerate(times.tolist()):
        assert systems.available_from(client, t) == when
        assert systems.available_mask([client], when)[0]
        if when > t:
            assert when % 10.0 == 0.0
            assert not any(systems.available_mask([client], s)[0] for s in np.arange(t, when, 10.0))
    assert profile(availability={**BERNOULLI, "p": 0.0}).available_from(3, 1.0) == math.inf
    assert profile(availability={**BERNOULLI, "p": 1.0}).available_mask(np.arange(50), 1.0).all()


def test_a_bernoulli_client_drops_its_job_when_its_next_period_is_unavailable():
    systems = profile(num_clients=40, availability=BERNOULLI)
    for client in range(40):
        start = systems.available_from(client, 0.0)
        drop = systems.drop_time(0, client, start, JobPhases(0.0, 100.0, 0.0))
        ends = [s for s in np.arange(math.floor(start / 10.0) * 10.0 + 10.0, start + 100.0, 10.0)
                if not systems.available_mask([client], s)[0]]
        assert drop == (ends[0] - start if ends else None)


def test_dropouts_abandon_a_fraction_p_of_jobs_at_a_uniform_moment_the_same_for_the_same_job():
    systems = profile(dropout=0.2)
    phases = JobPhases(1.0, 2.0, 1.0)
    drops = [systems.drop_time(job, 3, 50.0, phases) for job in range(5000)]
    times = np.array([d for d in drops if d is not None])
    assert len(times) / 5000 == pytest.approx(0.2, abs=0.02)
    assert times.min() >= 0.0 and times.max() <= 4.0 and times.mean() == pytest.approx(2.0, abs=0.1)
    assert drops == [profile(dropout=0.2).drop_time(job, 3, 50.0, phases) for job in range(5000)]
    assert drops != [profile(dropout=0.2, seed=1).drop_time(job, 3, 50.0, phases) for job in range(5000)]


def test_a_job_drops_at_the_earlier_of_its_dropout_draw_and_its_window_closing():
    dropout_only = profile(num_clients=2, dropout=0.5)
    both = profile(num_clients=2, dropout=0.5, availability={**WINDOWS, "phase": "zero"})
    phases = JobPhases(0.0, 2.5, 0.0)
    for job in range(200):
        drawn = dropout_only.drop_time(job, 1, 0.0, phases)
        assert both.drop_time(job, 1, 0.0, phases) == drawn
        expected = 2.0 if drawn is None else min(drawn, 2.0)
        assert both.drop_time(job, 1, 1.0, phases) == pytest.approx(expected)


@pytest.mark.parametrize(("change", "message"), [
    ({"availability": {"kind": "windows"}}, r"^systems\.availability: kind windows needs online and offline"),
    ({"availability": {"kind": "bernoulli", "p": 0.5}}, r"^systems\.availability: kind bernoulli needs period"),
    ({"availability": {"kind": "always", "p": 0.5}}, r"^systems\.availability: p does not apply to kind always"),
    ({"availability": {"kind": "windows", "online": 0.0, "offline": 1.0}}, r"^systems\.availability\.online: "),
    ({"availability": {"kind": "windows", "online": 1.0, "offline": 1.0, "phase": "late"}},
     r"^systems\.availability\.phase"),
    ({"availability": {"kind": "bernoulli", "p": 1.5, "period": 1.0}}, r"^systems\.availability\.p: "),
    ({"availability": {"kind": "sometimes"}}, r"^systems\.availability\.kind: "),
    ({"availability": {"kind": "windows", "online": 1.0, "offline": 1.0, "of": 1.0}},
     r"^systems\.availability\.of: unknown field .*allowed: kind, online, offline, phase, p, period"),
    ({"dropout": 1.0}, r"^systems\.dropout: "),
    ({"dropout": -0.1}, r"^systems\.dropout: "),
])
def test_bad_availability_and_dropout_settings_are_one_line_naming_the_field(change, message):
    with pytest.raises(ScenarioError, match=message):
        profile("lognormal", **change)
