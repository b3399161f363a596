"""`mpiexec -n 2 fedsim run`: clients sharded over ranks give the single-process metrics; only rank 0 writes;
bad rank counts and dying ranks end the run with a clear message instead of a hang."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fedsim

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
pytestmark = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="needs mpiexec (pip install mpich)")


def mpirun(ranks: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Ranks that talk through shared memory only."""
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "UCX_TLS": "self,sm"})


@pytest.fixture
def sharded(tiny, tmp_path):
    scenario = {**tiny, "partition": {"name": "quantity"}, "stragglers": {"fraction": 0.5},
                "model": {"name": "mlp", "hidden": [16]}, "evaluation": {"dissimilarity": True}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return scenario, path


POPULATION = {"data": {"name": "synthetic_population"}, "partition": {"name": "natural"}}


@pytest.mark.parametrize(("runtime", "data"), [("sequential", {}), ("vectorized", {}), ("vectorized", POPULATION)],
                         ids=["sequential", "vectorized", "vectorized-population"])
def test_two_ranks_give_the_single_process_metrics(sharded, tmp_path, runtime, data):
    scenario, path = sharded
    scenario = {**scenario, **data, "runtime": {"name": runtime}}
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "run"
    done = mpirun(2, "-m", "fedsim", "run", str(path), "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "running on 2 MPI ranks" in done.stderr and done.stdout.count("run directory:") == 1
    ranked = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single = fedsim.run(scenario, write=False).metrics.rows
    assert len(ranked) == len(single)
    for a, b in zip(ranked, single, strict=True):
        for key in ("loss", "test_loss", "accuracy", "dissimilarity", "sim_time", "bytes_up", "bytes_down"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), (key, a, b)


V2_VARIANTS = {
    "scaffold": {"algorithm": {"name": "scaffold", "lr": 0.05, "batch_size": 20}},
    "fedasync": {"protocol": {"name": "fedasync"}, "rounds": 8, "runtime": {"name": "vectorized"}},
    "dsgd": {"protocol": {"name": "dsgd"}, "topology": {"name": "ring"}, "clients_per_round": None,
             "runtime": {"name": "vectorized"}},
    # Each client's first upload goes whole: every rank must time it so, owner of the client or not.
    "fedasync_econtrol": {"protocol": {"name": "fedasync"}, "rounds": 8, "systems": {"name": "linear"},
                          "compression": {"uplink": {"name": "topk", "ratio": 0.1, "error_feedback": "econtrol"}}},
}


def test_scaffold_fedasync_and_dsgd_on_two_ranks_give_the_single_process_metrics(tiny, tmp_path):
    """Per-key weighting and client control variates, jobs from several model versions, per-node starts with
    gathered node models, and first uploads of an error-feedback codec, each across ranks (one mpiexec for all)."""
    scenario = {**tiny, "partition": {"name": "quantity"}, "variants": V2_VARIANTS}
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    out = tmp_path / "run"
    done = mpirun(2, "-m", "fedsim", "run", str(path), "--quiet", "--out", str(out), timeout=240)
    assert done.returncode == 0, done.stderr
    ranked = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single = fedsim.run(scenario, write=False).metrics.rows
    assert [r["variant"] for r in ranked] == [r["variant"] for r in single]
    assert {r["variant"] for r in ranked} == set(V2_VARIANTS)
    for a, b in zip(ranked, single, strict=True):
        for key in ("loss", "test_loss", "accuracy", "sim_time", "bytes_up", "bytes_down"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), (key, a, b)
        if a["variant"] == "dsgd":
            assert math.isclose(a["consensus_error"], b["consensus_error"], rel_tol=1e-5, abs_tol=1e-9)


def test_more_ranks_than_clients_is_a_clear_error(sharded, tmp_path):
    _, path = sharded
    done = mpirun(3, "-m", "fedsim", "run", str(path), "--quiet", "--set", "num_clients=2", "--set",
                  "clients_per_round=2", "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "fedsim: error: mpiexec -n 3: more ranks than clients (num_clients: 2)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


FAILING_RANK = """
import os, signal, sys
from fedsim.cli import main
from fedsim.runtime import mpi
from fedsim.runtime.sequential import SequentialRuntime

original = SequentialRuntime.run_jobs
calls = []

def run_jobs(self, jobs, params):
    calls.append(1)
    if mpi.rank() == 1 and len(calls) == 2:
        if sys.argv[1] == "raise":
            raise RuntimeError("injected failure")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, jobs, params)

SequentialRuntime.run_jobs = run_jobs
sys.exit(main(["run", sys.argv[2], "--quiet", "--set", "runtime.name=sequential", "--out", sys.argv[3]]))
"""


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_rank_that_dies_ends_the_whole_run(sharded, tmp_path, how):
    _, path = sharded
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK)
    done = mpirun(2, str(script), how, str(path), str(tmp_path / "run"), timeout=120)
    assert done.returncode != 0
    if how == "raise":
        assert "[rank 1] fedsim: RuntimeError: injected failure" in done.stderr


HELD_ROWS = """
import json, sys
from fedsim.api import build_all
from fedsim.runtime import mpi
from fedsim.scenario import load_scenarios

(sim,) = build_all(load_scenarios(sys.argv[1])[0])
data = sim.data
held = [k for k in range(data.num_clients) if data.train_starts[k] >= 0]
print(json.dumps({"rank": mpi.rank(), "held": held, "rows": len(data.x_train), "test_rows": len(data.x_test),
                  "sizes": data.train_sizes.tolist()}))
"""


def test_each_rank_holds_only_its_own_clients_data(sharded, tmp_path):
    scenario, path = sharded
    script = tmp_path / "held.py"
    script.write_text(HELD_ROWS)
    done = mpirun(2, str(script), str(path))
    assert done.returncode == 0, done.stderr
    reports = sorted((json.loads(line) for line in done.stdout.splitlines()), key=lambda r: r["rank"])
    whole = fedsim.api.build_all(fedsim.scenario.load_scenarios(str(path))[0])[0].data
    for r in reports:
        mine = list(range(r["rank"], scenario["num_clients"], 2))
        assert r["held"] == mine
        assert r["rows"] == sum(int(whole.train_sizes[k]) for k in mine) < len(whole.x_train)
        assert r["test_rows"] == sum(int(whole.test_sizes[k]) for k in mine)
        assert r["sizes"] == whole.train_sizes.tolist()


def test_a_data_error_on_rank_0_ends_every_rank_with_one_line(sharded, tmp_path):
    _, path = sharded
    missing = tmp_path / "no-mnist"
    done = mpirun(2, "-m", "fedsim", "run", str(path), "--quiet", "--set", "data.name=mnist", "--set",
                  f"data.root={missing}", "--out", str(tmp_path / "run"), timeout=60)
    assert done.returncode != 0
    assert f"fedsim: error: data.root: no MNIST files in {missing}" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
