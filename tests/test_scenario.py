"""Scenario files: schema validation with one-line errors naming the field, overrides, variants, resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedsim.errors import ScenarioError
from fedsim.scenario import apply_overrides, load_scenarios, parse_override
from fedsim.strict_input import dump_yaml


def load_one(raw, **overrides):
    scenarios, _ = load_scenarios(raw, overrides)
    assert len(scenarios) == 1
    return scenarios[0]


def error_of(raw, **overrides) -> str:
    with pytest.raises(ScenarioError) as exc:
        load_scenarios(raw, overrides)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_defaults_are_filled_in_and_components_resolved(tiny):
    s = load_one(tiny)
    assert s.components["algorithm"].params.mu == 0.1
    assert s.components["server"].name == "fedavg"
    assert s.components["topology"].name == "star"
    assert s.components["runtime"].name == "vectorized"
    assert s.to_dict()["server"] == {"name": "fedavg", "lr": 1.0, "weighting": "samples"}


def test_unknown_top_level_key_names_it_and_lists_allowed_fields(tiny):
    msg = error_of({**tiny, "roundz": 3})
    assert msg.startswith("roundz: unknown field") and "rounds" in msg and "clients_per_round" in msg


def test_unknown_algorithm_parameter_lists_the_algorithms_parameters(tiny):
    msg = error_of(tiny, **{"algorithm.momentum": 0.9})
    assert msg.startswith("algorithm.momentum: unknown field for algorithm 'fedprox'")
    assert "mu" in msg and "lr" in msg


def test_wrong_type_names_the_field(tiny):
    assert error_of(tiny, rounds="many").startswith("rounds:")


def test_negative_mu_is_rejected(tiny):
    assert error_of(tiny, **{"algorithm.mu": -1}).startswith("algorithm.mu:")


def test_more_clients_per_round_than_clients_is_rejected(tiny):
    msg = error_of(tiny, clients_per_round=11)
    assert msg == "clients_per_round: 11 is more than num_clients (10)"


@pytest.mark.parametrize("name", ["labeldir", "hsu_dirichlet"])
def test_dirichlet_alpha_must_be_positive(tiny, name):
    msg = error_of(tiny, partition={"name": name, "alpha": 0})
    assert msg.startswith("partition.alpha:")


def test_unknown_algorithm_lists_the_registered_ones(tiny):
    msg = error_of(tiny, **{"algorithm.name": "fedfoo"})
    assert msg.startswith("algorithm.name: unknown algorithm 'fedfoo'; allowed:")
    assert "fedavg" in msg and "fedprox" in msg


def test_natural_partition_needs_a_data_set_with_clients(tiny):
    msg = error_of(tiny, partition={"name": "natural"})
    assert msg.startswith("partition.name:") and "synthetic" in msg


def test_peer_to_peer_topology_is_rejected_for_client_server_algorithms(tiny):
    assert error_of(tiny, topology={"name": "ring"}).startswith("topology.name:")


def test_dropping_every_client_is_rejected(tiny):
    msg = error_of(tiny, **{"algorithm.name": "fedavg", "algorithm.mu": None, "stragglers.fraction": 1.0})
    assert msg.startswith("stragglers.fraction:")


def test_partition_defaults_to_natural_for_natural_data_and_iid_otherwise(tiny):
    del tiny["partition"]
    assert load_one(tiny).components["partition"].name == "iid"
    synthetic = {**tiny, "data": {"name": "synthetic"}}
    assert load_one(synthetic).components["partition"].name == "natural"


def test_override_values_are_read_as_yaml():
    assert parse_override("algorithm.mu=0.5") == ("algorithm.mu", 0.5)
    assert parse_override("seed=3") == ("seed", 3)
    assert parse_override("model.hidden=[32, 16]") == ("model.hidden", [32, 16])
    assert parse_override("output.plot=false") == ("output.plot", False)
    with pytest.raises(ScenarioError, match="expected KEY=VALUE"):
        parse_override("algorithm.mu")


def test_overrides_create_nested_keys_and_null_removes_a_key():
    out = apply_overrides({"a": {"b": 1, "c": 2}}, {"a.b": 5, "a.c": None, "x.y": 1})
    assert out == {"a": {"b": 5}, "x": {"y": 1}}


def test_override_through_a_non_mapping_is_an_error():
    with pytest.raises(ScenarioError, match="a is not a mapping"):
        apply_overrides({"a": 3}, {"a.b": 1})


def test_variants_apply_on_top_of_the_base_and_win_over_set(tiny):
    tiny["variants"] = {"low": {"algorithm.mu": 0.0}, "high": {"algorithm.mu": 1.0}, "same": {}}
    scenarios, notices = load_scenarios(tiny, {"algorithm.mu": 0.5, "seed": 4})
    mus = {s.variant: s.components["algorithm"].params.mu for s in scenarios}
    assert mus == {"low": 0.0, "high": 1.0, "same": 0.5}
    assert all(s.spec.seed == 4 for s in scenarios)
    assert len(notices) == 2 and all("--set algorithm.mu does not apply" in n for n in notices)


def test_variant_selection_and_unknown_variant(tiny):
    tiny["variants"] = {"a": {"seed": 1}, "b": {"seed": 2}}
    scenarios, _ = load_scenarios(tiny, variants=["b"])
    assert [s.variant for s in scenarios] == ["b"]
    with pytest.raises(ScenarioError, match="--variant c: unknown; allowed: a, b"):
        load_scenarios(tiny, variants=["c"])


def test_errors_in_a_variant_name_the_variant(tiny):
    tiny["variants"] = {"bad": {"algorithm.mu": -2}}
    assert error_of(tiny).startswith("variants.bad: algorithm.mu:")


def test_yaml_object_construction_is_refused(tmp_path: Path):
    path = tmp_path / "evil.yaml"
    path.write_text("rounds: !!python/object/apply:os.system ['echo hacked']\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: line 1: the tag !!python/object/apply:os.system")
    assert "is not allowed in a scenario" in msg


def test_missing_file_and_non_mapping_file(tmp_path: Path):
    assert error_of(tmp_path / "nope.yaml") == f"scenario file not found: {tmp_path / 'nope.yaml'}"
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "a scenario must be a mapping" in error_of(path)


def test_resolved_scenario_loads_again_to_the_same_scenario(tiny, tmp_path: Path):
    first = load_one(tiny)
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(first.to_dict()))
    assert load_one(path).to_dict() == first.to_dict()


def test_values_users_write_are_read_as_meant(tiny):
    s = load_one({**tiny, "runtime": {"name": "vectorized", "memory_budget": 2e9, "state_memory": 1e6,
                                      "devices": "auto", "placement": {"policy": "map", "map": {"0": "cpu"}}}})
    runtime = s.components["runtime"].params
    assert runtime.memory_budget == 2 * 10**9 and runtime.state_memory == 10**6
    assert runtime.placement.map == {0: "cpu"}
    assert error_of(tiny, **{"runtime.threads": 10**8, "runtime.name": "sequential"}).startswith(
        "runtime.threads: Input should be less than or equal to 1024")


def test_resolved_scenarios_with_number_like_names_load_back(tiny, tmp_path: Path):
    tiny["variants"] = {"1e-3": {"algorithm.lr": 0.001}, "2020-01-01": {}}
    scenarios, _ = load_scenarios(tiny)
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml({"variants": {s.variant: s.to_dict() for s in scenarios}}))
    assert [s.variant for s in load_scenarios(path)[0]] == ["1e-3", "2020-01-01"]
