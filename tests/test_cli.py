"""The `fedsim` command: run, list, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsim.cli import MAX_ERROR_CHARS, main


def write(tmp_path: Path, scenario: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


def test_run_prints_the_table_and_writes_the_run_directory(tiny, tmp_path, capsys):
    path = write(tmp_path, tiny)
    assert main(["run", str(path), "--quiet", "--set", "rounds=2", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "sim time (s)" in out and "run directory:" in out
    resolved = yaml.safe_load((tmp_path / "r" / "scenario.yaml").read_text())
    assert resolved["rounds"] == 2 and resolved["server"]["name"] == "fedavg"


def test_run_with_variants_reports_each(tiny, tmp_path, capsys):
    tiny["variants"] = {"mu0": {"algorithm.mu": 0.0}, "mu1": {"algorithm.mu": 1.0}}
    path = write(tmp_path, {**tiny, "rounds": 1})
    assert main(["run", str(path), "--quiet", "--out", str(tmp_path / "r"), "--set", "algorithm.mu=0.5"]) == 0
    captured = capsys.readouterr()
    assert "mu0" in captured.out and "mu1" in captured.out
    assert "note: variant mu0 sets algorithm.mu" in captured.err


def test_user_mistake_is_one_line_and_exit_status_2(tiny, tmp_path, capsys):
    path = write(tmp_path, tiny)
    code = main(["run", str(path), "--set", "algorithm.mu=-1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fedsim: error: algorithm.mu:")
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ["fedavg", "fedprox", "synthetic", "digits", "mnist1d", "cifar10", "labeldir", "hsu_dirichlet",
                 "shards", "logreg", "cnn", "star", "fedadam", "fedavgm", "sequential", "homogeneous"]:
        assert f"  {name} " in out, name
    for kind in ["algorithm", "data set", "partitioner", "model", "topology", "server rule"]:
        assert f"({kind})" in out


def test_list_one_kind_and_unknown_kind(capsys):
    assert main(["list", "algorithm"]) == 0
    assert "fedprox" in capsys.readouterr().out
    assert main(["list", "widgets"]) == 2
    assert capsys.readouterr().err.startswith("fedsim: error: list widgets: unknown kind")


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fedsim", "list", "topology"], capture_output=True, text=True,
                         check=True).stdout
    assert "star" in out


@pytest.mark.parametrize("argv, start", [
    ([], "fedsim: error: the following arguments are required: {run,check,privacy,list,flower-app,peer}"),
    (["run"], "fedsim: error: run: give a scenario file, or --resume RUN_DIR"),
    (["run", "s.yaml", "--resume", "runs/x"], "fedsim: error: --resume takes the run directory only"),
    (["frobnicate"], "fedsim: error: argument {run,check,privacy,list,flower-app,peer}: invalid choice: 'frobnicate'"),
    (["run", "s.yaml", "--bogus"], "fedsim: error: unrecognized arguments: --bogus"),
    (["list", "a", "b"], "fedsim: error: unrecognized arguments: b"),
])
def test_usage_mistakes_are_one_line_with_status_2(argv, start, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(start) and captured.err.count("\n") == 1 and "--help" in captured.err
    assert captured.out == ""


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0 and "--set KEY=VALUE" in capsys.readouterr().out


def test_check_prints_the_resolved_scenario_and_writes_nothing(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny["variants"] = {"a": {"algorithm.mu": 0.0}, "b": {}}
    write(tmp_path, tiny)
    assert main(["check", "s.yaml", "--set", "rounds=5"]) == 0
    captured = capsys.readouterr()
    document = yaml.safe_load(captured.out)
    assert set(document["variants"]) == {"a", "b"}
    assert document["variants"]["a"]["algorithm"]["mu"] == 0.0 and document["variants"]["b"]["rounds"] == 5
    assert document["variants"]["a"]["server"] == {"name": "fedavg", "lr": 1.0, "weighting": "samples"}
    assert "2 variant(s) valid; a run would write runs/tiny" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_check_rejects_what_run_rejects_naming_the_variant(tiny, tmp_path, capsys):
    tiny["variants"] = {"ok": {}, "huge": {"model": {"name": "mlp", "hidden": [10**12]}}}
    path = write(tmp_path, tiny)
    for command in ("check", "run"):
        assert main([command, str(path), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedsim: error: variants.huge: model: too large") and err.count("\n") == 1
    assert main(["check", str(tmp_path / "nowhere.yaml")]) == 2
    assert "scenario file not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_an_override_given_twice_is_an_error(tiny, tmp_path, capsys):
    path = write(tmp_path, tiny)
    assert main(["check", str(path), "--set", "rounds=2", "--set", "rounds=3"]) == 2
    assert capsys.readouterr().err == "fedsim: error: --set rounds: given twice\n"


def test_long_error_lines_are_cut_to_one_bounded_line(tiny, tmp_path, capsys):
    path = write(tmp_path, tiny)
    assert main(["check", str(path), "--set", f"{'k' * 40}.{'x' * 2000}=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) <= MAX_ERROR_CHARS + 1


def test_out_of_memory_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("fedsim.api.build_all", exhausted)
    assert main(["run", str(write(tmp_path, tiny)), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("fedsim: error: out of memory")
