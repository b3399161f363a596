"""Systems profiles: per-client speeds (tiers, FedFix's F-X linear speeds) and per-job compute factors drawn from the
scenario seed, keyed by job and client."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fedsim
from fedsim.errors import ScenarioError
from fedsim.registry import Params
from fedsim.systems import SYSTEMS, ClientSystems


def profile(name: str, num_clients: int = 20, seed: int = 0, **params) -> ClientSystems:
    entry, validated = SYSTEMS.resolve({"name": name, **params}, "systems")
    return entry.obj(validated, num_clients, np.random.default_rng(seed))


def test_linear_speeds_are_fedfix_f_x_job_times_from_one_down_to_one_minus_x():
    systems = profile("linear", num_clients=5, spread=80.0, speed=100.0, latency=0.0)
    seconds = [systems.job_seconds(0, i, 100, 0, 0) for i in range(5)]
    assert seconds == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert [profile("linear", num_clients=3, spread=0.0, speed=1.0).speed[i] for i in range(3)] == [1.0, 1.0, 1.0]


def test_tiers_give_each_speed_group_its_share_of_clients_with_fedasts_job_times_by_default():
    """FedAST's code multiplies the slow quarter's delays by 1.3 and the fast quarter's by 0.7."""
    systems = profile("tiers", num_clients=20, speed=10.0, latency=0.0)
    values, counts = np.unique(systems.speed, return_counts=True)
    assert values.tolist() == pytest.approx([10 / 1.3, 10.0, 10 / 0.7]) and counts.tolist() == [5, 10, 5]
    seconds = sorted({round(systems.job_seconds(0, c, 10, 0, 0), 9) for c in range(20)})
    assert seconds == pytest.approx([0.7, 1.0, 1.3])


@pytest.mark.parametrize(("change", "field"), [({"fractions": [0.5, 0.5]}, "systems.fractions"),
                                               ({"fractions": [0.5, 0.2, 0.2]}, "systems.fractions"),
                                               ({"multipliers": [1.0, 0.0, 1.0]}, "systems.fractions")])
def test_inconsistent_tiers_are_one_line_naming_the_field(change, field):
    with pytest.raises(ScenarioError, match=rf"^{field}: "):
        profile("tiers", **change)


@pytest.mark.parametrize("distribution", ["exponential", "shifted_exponential", "half_normal", "lognormal", "uniform"])
def test_compute_factors_are_drawn_per_job_with_mean_one_and_the_same_for_the_same_job(distribution):
    systems = profile("homogeneous", speed=1.0, latency=0.0, compute=distribution, compute_spread=0.5)
    draws = np.array([systems.job_seconds(job, 3, 1, 0, 0) for job in range(20_000)])
    assert draws.mean() == pytest.approx(1.0, abs=0.03)
    assert draws.std() > 0.05 and (draws > 0).all()
    assert systems.job_seconds(7, 3, 1, 0, 0) == systems.job_seconds(7, 3, 1, 0, 0)
    assert systems.job_seconds(7, 3, 1, 0, 0) != systems.job_seconds(7, 4, 1, 0, 0)
    if distribution == "shifted_exponential":
        assert draws.min() >= 0.5
    if distribution == "uniform":
        assert 0.5 <= draws.min() and draws.max() <= 1.5


def test_constant_compute_keeps_every_job_at_work_over_speed():
    systems = profile("lognormal", speed=50.0, latency=0.0)
    assert systems.job_seconds(0, 2, 100, 0, 0) == systems.job_seconds(99, 2, 100, 0, 0) == \
        pytest.approx(100 / systems.speed[2])


def test_random_compute_times_change_simulated_time_but_not_the_model(tiny):
    base = fedsim.run({**tiny, "runtime": {"name": "sequential"}}, write=False).metrics.rows
    drawn = {**tiny, "runtime": {"name": "sequential"}, "systems": {"name": "tiers", "compute": "exponential"}}
    rows = fedsim.run(drawn, write=False).metrics.rows
    again = fedsim.run(drawn, write=False).metrics.rows
    assert [r["loss"] for r in rows] == [r["loss"] for r in base]
    assert [r["sim_time"] for r in rows] == [r["sim_time"] for r in again]
    assert not math.isclose(rows[-1]["sim_time"], base[-1]["sim_time"])


def test_every_profile_takes_the_compute_distribution():
    for entry in SYSTEMS:
        assert issubclass(entry.params, Params) and "compute" in entry.params.model_fields, entry.name
