"""The `fedsim` command: run, list, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from fedsim.cli import main


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
    for name in ["fedavg", "fedprox", "synthetic", "digits", "mnist1d", "cifar10", "dirichlet", "shards",
                 "logreg", "cnn", "star", "fedadam", "fedavgm", "sequential", "homogeneous"]:
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
