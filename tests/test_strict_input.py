"""Strict, bounded reading of untrusted scenario input: YAML limited to plain data, one-line errors."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedsim.errors import ScenarioError
from fedsim.strict_input import MAX_DEPTH, MAX_NODES, parse_yaml, plain_data, read_yaml_file, shorten


def error_of(text: str) -> str:
    with pytest.raises(ScenarioError) as exc:
        parse_yaml(text, "s.yaml")
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400
    return message


def billion_laughs(levels: int = 9) -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


def test_plain_yaml_loads_with_anchors_merges_and_yaml12_floats():
    data = parse_yaml("base: &b {lr: 1e-3, mu: 1.5e2}\nalgo: {<<: *b, mu: .5e1}\nwhen: 2020-01-01\nx: '='", "s")
    assert data == {"base": {"lr": 0.001, "mu": 150.0}, "algo": {"lr": 0.001, "mu": 5.0}, "when": "2020-01-01",
                    "x": "="}


def test_duplicate_keys_are_refused_with_their_line():
    assert error_of("rounds: 1\nseed: 0\nrounds: 2") == "s.yaml: line 3: duplicate key 'rounds'"
    assert "duplicate key 'lr'" in error_of("algorithm: {lr: 1, lr: 2}")


def test_non_string_keys_are_refused():
    assert error_of("variants:\n  1: {}").endswith("mapping keys must be strings, got 1 (quote it)")
    assert "keys must be strings" in error_of("null: 3")


@pytest.mark.parametrize("text", ["[" * 600 + "]" * 600, "{a: " * 1000 + "1" + "}" * 1000,
                                  "\n".join("  " * i + "a:" for i in range(200)) + " 1"])
def test_deep_nesting_is_refused_without_recursion_error(text):
    assert f"nested more than {MAX_DEPTH} levels deep" in error_of(text)


def test_alias_bombs_are_refused_quickly_in_bounded_memory():
    tracemalloc.start()
    started = time.perf_counter()
    message = error_of(billion_laughs())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert f"expands to more than {MAX_NODES} values once its aliases are expanded" in message
    assert time.perf_counter() - started < 5 and peak < 50 * 2**20


def test_merge_key_bombs_are_refused():
    lines = ["a: &m0 {k: 1}"] + [f"b{i}: &m{i + 1} {{<<: [{', '.join([f'*m{i}'] * 9)}]}}" for i in range(9)]
    assert "expands to more than" in error_of("\n".join(lines))


def test_recursive_alias_is_refused():
    assert "recursive document" in error_of("a: &a [*a]")


@pytest.mark.parametrize("text, what", [
    ("rounds: !!python/object/apply:os.system ['touch pwned']", "!!python/object/apply:os.system"),
    ("f: !!python/name:os.system", "!!python/name:os.system"),
    ("name: !!binary aGVsbG8=", "binary data"),
    ("s: !!set {a, b}", "a set"),
    ("t: !!timestamp 2020-01-01", "a date"),
    ("c: !foo 1", "!foo"),
])
def test_tags_beyond_the_core_types_are_refused(text, what, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_of(text)
    assert what in message and "is not allowed in a scenario" in message
    assert not (tmp_path / "pwned").exists()


def test_integers_must_fit_in_64_bits():
    assert error_of("num_clients: 1000000000000000000000000000000").startswith(
        "num_clients: 1000000000000000000000000000000 is too large (integers must fit in 64 bits)")
    assert parse_yaml("seed: 9223372036854775807", "s") == {"seed": 2**63 - 1}


def test_yaml_syntax_errors_are_one_line():
    assert error_of("a:\n\tb: 1").startswith("s.yaml: line 2: not valid YAML:")
    assert "not valid YAML" in error_of('a: "unclosed')
    assert "found another document" in error_of("a: 1\n---\nb: 2")
    assert error_of("a: \x00") == "s.yaml: character U+0000 at position 3 is not allowed in YAML"


def test_files_must_be_utf8_regular_and_small(tmp_path: Path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\u00e9".encode("latin-1"))
    with pytest.raises(ScenarioError, match=r"latin\.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)$"):
        read_yaml_file(latin)
    with pytest.raises(ScenarioError, match="is a directory; expected a scenario YAML file"):
        read_yaml_file(tmp_path)
    with pytest.raises(ScenarioError, match="not a regular file"):
        read_yaml_file("/dev/null")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (5 << 20))
    with pytest.raises(ScenarioError, match="larger than 4 MiB"):
        read_yaml_file(big)


def test_mappings_from_python_become_plain_data():
    data = plain_data({"seed": np.int64(3), "lr": np.float32(0.5), "hidden": (32, 16), "plot": np.bool_(True)}, "",
                      "scenario")
    assert data == {"seed": 3, "lr": 0.5, "hidden": [32, 16], "plot": True}
    assert type(data["seed"]) is int and type(data["lr"]) is float and type(data["plot"]) is bool


def test_plain_data_checks_apply_to_mappings_given_from_python():
    shared = [1] * 1000
    with pytest.raises(ScenarioError, match=r"^a\.b: more than 100000 values"):
        plain_data({"a": {"b": [shared] * 200}}, "", "scenario")
    loop: list = []
    loop.append(loop)
    with pytest.raises(ScenarioError, match="contains itself"):
        plain_data({"a": loop}, "", "scenario")
    with pytest.raises(ScenarioError, match=r"^a: bytes values are not allowed"):
        plain_data({"a": b"x"}, "", "scenario")
    with pytest.raises(ScenarioError, match=r"^scenario: keys must be strings, got 1"):
        plain_data({1: 2}, "", "scenario")


def test_echoed_values_are_shortened():
    assert len(shorten("x" * 10**6)) < 100
    assert len(shorten([list(range(1000))] * 1000)) < 200


@pytest.mark.parametrize("text, message", [
    ("rounds: !!int abc", "'abc' is not a valid !!int value"),
    ("lr: !!float abc", "'abc' is not a valid !!float value"),
    ("plot: !!bool maybe", "'maybe' is not a valid !!bool value"),
    ("a: !!map [1]", "the tag !!map does not fit this value"),
    ("a: !!int [1]", "the tag !!int does not fit this value"),
])
def test_core_tags_on_values_that_do_not_fit_are_one_line_errors(text, message):
    assert error_of(text) == f"s.yaml: line 1: {message}"


def test_errors_inside_a_variant_use_the_variant_prefix():
    message = error_of("variants: {mu_0.5: {data.sample_scale: 18446744073709551616}}")
    assert message.startswith("variants.mu_0.5: data.sample_scale: 18446744073709551616 is too large")


def test_numbers_too_long_to_convert_are_refused_before_conversion():
    assert error_of("seed: 0x" + "f" * 5000).endswith("a number written with more than 100 characters is too large")
    assert "more than 100 characters" in error_of("a: " + ":".join(["1"] * 80000))
    assert shorten(2**20000) == "an integer of 20001 bits"


def test_large_documents_are_refused_while_parsing():
    started = time.perf_counter()
    message = error_of("a: [" + "1," * 2_000_000 + "1]")
    assert message.endswith(f"the document holds more than {MAX_NODES} values")
    assert time.perf_counter() - started < 30


def test_override_values_are_named_by_their_key():
    with pytest.raises(ScenarioError, match=r"^model\.hidden\[0\]: .* is too large"):
        parse_yaml("[99999999999999999999]", "--set model.hidden", "model.hidden")
    with pytest.raises(ScenarioError, match=r"^variants\.a: rounds: .* is too large"):
        parse_yaml("{a: {rounds: 99999999999999999999}}", "--set variants", "variants")
