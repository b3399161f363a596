"""Work is sized before anything is allocated: clients, data sets and models that cannot fit are refused with one
line naming the field, and the sizing itself allocates nothing."""

from __future__ import annotations

import tracemalloc

import pytest

from fedsim.data.base import DATASETS
from fedsim.errors import DataError, ScenarioError
from fedsim.preflight import check_scenario, data_footprint, model_parameters
from fedsim.resources import available_memory, check_fits, format_bytes
from fedsim.scenario import load_scenarios


def one(raw) -> object:
    scenarios, _ = load_scenarios(raw)
    return scenarios[0]


def refusal(raw) -> str:
    tracemalloc.start()
    with pytest.raises(ScenarioError) as exc:
        check_scenario(one(raw))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20, f"sizing allocated {format_bytes(peak)}"
    message = str(exc.value)
    assert "\n" not in message and len(message) < 500
    return message


def test_every_data_set_declares_its_footprint():
    missing = [e.name for e in DATASETS if "footprint" not in e.meta]
    assert missing == []


def test_a_scenario_that_fits_passes(tiny):
    check_scenario(one(tiny))
    assert data_footprint(one(tiny)).feature_shape == (1, 8, 8)


def test_too_many_clients_names_num_clients(tiny):
    message = refusal({**tiny, "num_clients": 10**15, "clients_per_round": 4})
    assert message.startswith("num_clients: too large: keeping track of 1000000000000000 clients needs about")


@pytest.mark.parametrize("data, field", [
    ({"name": "synthetic", "num_features": 10**9}, "num_features=1000000000"),
    ({"name": "synthetic_iid", "sample_scale": 10**9}, "sample_scale=1000000000"),
    ({"name": "mnist1d", "num_samples": 10**9}, "num_samples=1000000000"),
    ({"name": "synthetic_population", "cache_clients": 10**8, "max_samples": 10**6, "size_mean": 30.0},
     "cache_clients=100000000"),
])
def test_data_too_large_to_build_names_its_parameters(tiny, data, field):
    partition = {"name": "natural"} if data["name"].startswith("synthetic") else {"name": "iid"}
    message = refusal({**tiny, "data": data, "partition": partition})
    assert message.startswith(f"data: too large: building {data['name']} (") and field in message


def test_model_too_large_names_the_model_without_allocating_it(tiny):
    message = refusal({**tiny, "model": {"name": "mlp", "hidden": [10**12]}})
    assert message.startswith("model: too large: mlp (hidden=[1000000000000], activation='relu') on inputs (1, 8, 8)")
    message = refusal({**tiny, "model": {"name": "mlp", "hidden": [10**12, 10**12]}})
    assert message.startswith("model: too large: mlp") and "more parameters than can be counted" in message


def test_model_parameters_are_counted_on_the_meta_device(tiny):
    model = one({**tiny, "model": {"name": "mlp", "hidden": [32]}}).components["model"]
    assert model_parameters(model, (1, 8, 8), 10) == 64 * 32 + 32 + 32 * 10 + 10


def test_errors_inside_a_variant_name_the_variant(tiny):
    tiny["variants"] = {"small": {}, "huge": {"model": {"name": "mlp", "hidden": [10**12]}}}
    scenarios, _ = load_scenarios(tiny)
    check_scenario(scenarios[0])
    with pytest.raises(ScenarioError, match=r"^variants\.huge: model: too large"):
        check_scenario(scenarios[1])


def test_check_fits_respects_the_process_limits():
    assert available_memory() > 0
    check_fits("x", 1, "one byte")
    with pytest.raises(ScenarioError, match=r"^x: too large: everything needs about .* more than the"):
        check_fits("x", 2**62, "everything")


def test_devices_are_checked_before_any_work_naming_the_variant(tiny):
    tiny["variants"] = {"gpu": {"runtime": {"name": "vectorized", "devices": ["cuda:9"]}}}
    with pytest.raises(ScenarioError, match=r"^variants\.gpu: runtime\.devices: cuda:9 does not exist here"):
        check_scenario(one(tiny))


@pytest.mark.parametrize("root, reason", [("x" * 300, "File name too long"), ("~nosuchuser-fedsim/x", "")])
def test_data_roots_that_cannot_be_looked_up_are_one_line(tiny, root, reason):
    with pytest.raises(DataError, match=rf"^data\.root: cannot look for MNIST files in .*{reason}"):
        check_scenario(one({**tiny, "data": {"name": "mnist", "root": root}}))
