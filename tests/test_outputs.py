"""The run directory: atomic files, metrics.jsonl, plot, summary, divergence, progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedsim
from fedsim.errors import DivergenceError, FedsimError, ScenarioError
from fedsim.outputs import check_output_location, choose_run_dir, make_dirs, write_atomic
from fedsim.progress import RoundBar, make_progress
from fedsim.recording import Progress

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_directory_holds_scenario_metrics_plot_and_summary(tiny, tmp_path: Path):
    result = fedsim.run(tiny, out=tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files == {"scenario.yaml", "run.json", "metrics.jsonl", "summary.json", "plot.png", "progress.json",
                     "timeline-tiny.npz", "timeline.png", "async.png"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows == result.metrics.rows
    assert {"round", "sim_time", "wall_time", "accuracy", "loss", "test_loss", "bytes_up", "bytes_down"} <= set(rows[0])
    assert (tmp_path / "run" / "plot.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["seed"] == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())[0]["round"] == 3


def test_evaluation_cadence_is_configurable(tiny):
    result = fedsim.run({**tiny, "rounds": 7, "evaluation": {"every": 3}}, write=False)
    assert result.metrics["round"] == [0, 3, 6, 7]


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path, monkeypatch):
    target = tmp_path / "f.txt"
    write_atomic(target, "old")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("fedsim.outputs.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_diverging_run_names_the_variant_and_round_and_leaves_complete_metrics(tiny, tmp_path: Path):
    tiny["rounds"] = 20
    tiny["variants"] = {"calm": {}, "wild": {"algorithm.lr": 1e6}}
    with pytest.raises(DivergenceError, match=r"^variant wild, round \d+: .*diverged") as exc:
        fedsim.run(tiny, out=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["variant"] == "calm"] == list(range(21))
    wild = [r["round"] for r in rows if r["variant"] == "wild"]
    diverged_at = int(str(exc.value).split("round ")[1].split(":")[0])
    assert wild == list(range(len(wild))) and wild[-1] <= diverged_at


def test_existing_run_is_not_overwritten_unless_asked(tiny, tmp_path: Path):
    fedsim.run({**tiny, "rounds": 1}, out=tmp_path / "run")
    with pytest.raises(FedsimError, match="already holds a run; pass --overwrite"):
        fedsim.run({**tiny, "rounds": 1}, out=tmp_path / "run")
    fedsim.run({**tiny, "rounds": 2}, out=tmp_path / "run", overwrite=True)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_default_run_directories_never_collide(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = choose_run_dir(None, "exp", overwrite=False)
    first.mkdir(parents=True)
    assert first == Path("runs/exp") and choose_run_dir(None, "exp", overwrite=False) == Path("runs/exp-2")


def test_bad_input_leaves_no_run_directory(tiny, tmp_path: Path):
    with pytest.raises(FedsimError):
        fedsim.run({**tiny, "clients_per_round": 99}, out=tmp_path / "run")
    with pytest.raises(FedsimError):
        fedsim.run({**tiny, "data": {"name": "mnist", "root": str(tmp_path / "nowhere")}}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert type(make_progress(True, "x", 3)) is Progress
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    bar = make_progress(True, "x", 3)
    assert isinstance(bar, RoundBar)
    bar.close()
    assert type(make_progress(False, "x", 3)) is Progress


def _location_error(location, tmp_path: Path) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ScenarioError) as exc:
        check_output_location(location, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return str(exc.value)


def test_output_location_is_checked_before_any_work(tmp_path: Path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _location_error("", tmp_path) == "--out: empty; name a directory"
    assert _location_error(afile, tmp_path).endswith("exists and is not a directory")
    assert "is a file, so" in _location_error(afile / "sub" / "run", tmp_path)
    assert "contains a NUL byte" in _location_error(f"{tmp_path}/a\0b", tmp_path)
    assert "longer than the 255 bytes" in _location_error(tmp_path / ("x" * 300), tmp_path)
    assert "cannot create a directory in /proc" in _location_error("/proc/fedsim-run", tmp_path)
    check_output_location(tmp_path / "new" / "deeper", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_run_directory_that_cannot_be_created_leaves_no_parents_behind(tmp_path: Path, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir_fails_at_the_leaf(self, *args, **kwargs):
        if self.name == "leaf":
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_fails_at_the_leaf)
    with pytest.raises(FedsimError, match="^cannot create the run directory .*: Permission denied$"):
        make_dirs(tmp_path / "runs" / "mid" / "leaf")
    assert list(tmp_path.iterdir()) == []


def test_output_dir_setting_is_checked_like_out(tiny, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScenarioError, match=r"^output\.dir: String should have at least 1 character"):
        fedsim.run({**tiny, "output": {"dir": ""}})
    with pytest.raises(ScenarioError, match=r"^--out: empty"):
        fedsim.run(tiny, out="")
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ScenarioError, match=r"^output\.dir: taken exists and is not a directory"):
        fedsim.run({**tiny, "output": {"dir": "taken"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_errors_while_building_a_variant_name_the_variant(tiny, tmp_path: Path):
    tiny["variants"] = {"ok": {}, "crowded": {"num_clients": 5000, "clients_per_round": 4}}
    with pytest.raises(FedsimError, match=r"^variants\.crowded: num_clients: 5000 clients but only 1797 samples"):
        fedsim.run(tiny, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
