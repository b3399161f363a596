"""`mpiexec -n 2 fedsim run` gives the single-process metrics for every registered client rule, personal-model
figures included (each rank scores the clients whose states it holds; the ranks add up the sums)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rulekit import client_server_algorithms

import fedsim

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
pytestmark = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="needs mpiexec (pip install mpich)")

COVERED_BY_TEST_MPI = {"fedprox", "scaffold"}
"""Rules whose two-rank runs tests/test_mpi.py already pins (the tiny scenario's FedProx, and SCAFFOLD)."""


def same_figure(a: Any, b: Any) -> bool:
    """Numbers equal to rel 1e-6; anything else (variant names, histograms of counts) exactly equal."""
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def two_rank_rows(scenario: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    """The metrics rows of `mpiexec -n 2 fedsim run` on `scenario` (ranks talk through shared memory only)."""
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    out = tmp_path / "run"
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "fedsim", "run", str(path), "--quiet", "--out",
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "UCX_TLS": "self,sm"})
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_registered_rule_on_two_ranks_gives_the_single_process_metrics(tiny, tmp_path):
    """One mpiexec runs each client/server rule as a variant (peer-to-peer ones run in tests/test_mpi_gossip.py);
    every figure of every row but wall time matches one process. A fixed evaluation sample puts clients at positions
    other than their ids in the per-client vectors ranks add up."""
    names = [name for name in client_server_algorithms() if name not in COVERED_BY_TEST_MPI]
    assert {"feddyn", "fedsam", "fedspeed", "pfedme", "ditto", "perfedavg"} <= set(names)
    scenario = {**tiny, "partition": {"name": "quantity"}, "evaluation": {"clients": 7},
                "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
                "variants": {name: {"algorithm": {"name": name}} for name in names}}
    ranked = two_rank_rows(scenario, tmp_path)
    single = fedsim.run(scenario, write=False).metrics.rows
    assert [r["variant"] for r in ranked] == [r["variant"] for r in single]
    assert {r["variant"] for r in ranked} == set(names)
    assert {r["variant"] for r in single if r.get("personal_clients")} == {"pfedme", "ditto", "perfedavg"}
    for a, b in zip(ranked, single, strict=True):
        assert set(a) == set(b), (a["variant"], a["round"])
        for key in set(b) - {"wall_time"}:
            assert same_figure(a[key], b[key]), (key, a, b)


def test_private_runs_on_two_ranks_give_the_single_process_noise_and_epsilon(tiny, tmp_path):
    """DP-SGD's noise (keyed by job), DP-FedAvg's and private SpiderBoost's (keyed by the server step; the tree's
    leaf draws by phase, client and record) are the same on two ranks, and so is what every rank's accountant
    counts: one mpiexec runs them all as variants."""
    spider = {"clients_per_round": 10, "algorithm": {"name": "spiderboost", "batch_size": 16},
              "server": {"name": "spiderboost", "lr": 0.5, "phase_length": 3, "difference_rate": 0.4}}
    scenario = {**tiny, "partition": {"name": "quantity"},
                "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 5, "sampling": "poisson"},
                "variants": {"dpsgd": {"privacy": {"name": "dpsgd", "clip": 1.0, "noise_multiplier": 1.1}},
                             "dpfedavg": {"protocol": {"name": "synchronous", "client_sampling": "poisson"},
                                          "privacy": {"name": "dpfedavg", "clip": 0.5, "noise_multiplier": 0.8}},
                             "spider_naive": {**spider, "privacy": {"name": "private_spiderboost"}},
                             "spider_tree": {**spider, "privacy": {"name": "private_spiderboost",
                                                                   "aggregation": "tree"}}}}
    ranked = two_rank_rows(scenario, tmp_path)
    single = fedsim.run(scenario, write=False).metrics.rows
    assert len(ranked) == len(single) and all(r["epsilon_rdp"] >= 0 for r in ranked)
    for a, b in zip(ranked, single, strict=True):
        for key in set(b) - {"wall_time"}:
            assert same_figure(a[key], b[key]), (key, a, b)
