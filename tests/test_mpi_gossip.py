"""Gossip over MPI ranks (`fedsim.runtime.node_transport`, `fedsim.runtime.mpi.MPINodeTransport`): contiguous
blocks of nodes per rank, halo plans that agree between ranks, local mixing that equals the global product, and
`mpiexec -n 2` D-SGD runs that give the single-process metrics with each rank holding only its block's rows."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch
import yaml

import fedsim
from fedsim.checkpoint import completed, read_manifest, read_rank
from fedsim.runtime.node_transport import LocalTransport, block_partition, halo_plan, local_mixing
from fedsim.topologies import TOPOLOGIES
from fedsim.topologies.graphs import GridParams
from fedsim.topologies.mixing import mix, mixing_matrix


def torus(num_nodes: int) -> nx.Graph:
    """The zoo's 2-D torus of 4 columns, nodes numbered row by row."""
    return TOPOLOGIES.get("torus", "topology").obj(GridParams(cols=4), num_nodes, 0)


def test_blocks_are_contiguous_cover_every_node_once_and_differ_by_at_most_one():
    for n, parts in [(10, 3), (16, 4), (7, 7), (5, 1)]:
        blocks = block_partition(n, parts)
        assert [i for b in blocks for i in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert block_partition(10, 3) == [range(0, 3), range(3, 6), range(6, 10)]
    with pytest.raises(ValueError):
        block_partition(3, 4)


def test_halo_plans_of_neighbouring_blocks_agree_and_carry_exactly_the_cut_edges():
    graph, parts = torus(16), 4
    blocks = block_partition(16, parts)
    plans = [halo_plan(graph, blocks, p) for p in range(parts)]
    assert [p.peers for p in plans] == [(1, 3), (0, 2), (1, 3), (0, 2)]  # one torus row per rank: no diagonals
    for a, plan in enumerate(plans):
        assert plan.halo == sorted(plan.halo)
        for b, sends in zip(plan.peers, plan.sends, strict=True):
            assert plans[b].receives[plans[b].peers.index(a)] == sends
    cut = {(i, j) for i, j in graph.edges if i // 4 != j // 4} | {(j, i) for i, j in graph.edges if i // 4 != j // 4}
    carried = {(i, j) for p in plans for b, nodes in zip(p.peers, p.receives, strict=True) for j in nodes
               for i in p.owned if graph.has_edge(i, j)}
    assert carried == cut
    ring = halo_plan(nx.cycle_graph(10), block_partition(10, 2), 0)
    assert (ring.peers, ring.sends, ring.receives, ring.halo) == ((1,), ((0, 4),), ((5, 9),), [5, 9])


@pytest.mark.parametrize("graph", [nx.cycle_graph(10), torus(16)], ids=["ring", "torus"])
def test_mixing_a_block_with_its_halo_gives_the_global_products_rows_bit_for_bit(graph):
    n = graph.number_of_nodes()
    W = mixing_matrix("metropolis_hastings", {}, graph)
    x = {"w": torch.randn(n, 3, 2, generator=torch.Generator().manual_seed(0))}
    whole = mix(W, x)["w"]
    blocks = block_partition(n, 3)
    for p, block in enumerate(blocks):
        plan = halo_plan(graph, blocks, p)
        rows = sorted([*plan.halo, *block])
        below = sum(j < block.start for j in plan.halo)
        mixed = mix(local_mixing(W, plan), {"w": x["w"][rows]})["w"]
        assert torch.equal(mixed[below : below + len(block)], whole[block.start : block.stop])


def test_one_process_owns_every_node_has_no_halo_and_sums_its_own_share():
    transport = LocalTransport(6)
    neighbourhood = transport.connect(nx.cycle_graph(6))
    rows = {"a": torch.ones(6, 2)}
    assert transport.owned == range(6) and neighbourhood.plan.halo == []
    assert neighbourhood.exchange(rows)["a"].shape == (0, 2)
    assert torch.equal(local_mixing(mixing_matrix("metropolis_hastings", {}, nx.cycle_graph(6)),
                                    neighbourhood.plan).to_dense(),
                       mixing_matrix("metropolis_hastings", {}, nx.cycle_graph(6)).to_dense())
    assert transport.sum(rows)["a"].dtype == torch.float64


MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
needs_mpiexec = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or not Path(MPIEXEC).exists(),
                                   reason="needs mpi4py and mpiexec (pip install -e '.[mpi]')")


def mpirun(ranks: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Ranks that talk through shared memory only."""
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "UCX_TLS": "self,sm"})


def cli_script(script: Path, failing: str = "") -> Path:
    """A script running the fedsim command line (after `failing` code, if any)."""
    script.write_text("import sys\n" + failing + "from fedsim.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return script


def gossip_scenario(num_clients: int = 16, **variants: dict[str, Any]) -> dict[str, Any]:
    """D-SGD on digits nodes with uneven data (so uneven local steps), one variant per order and graph."""
    return {"name": "gossip", "seed": 0, "rounds": 3, "num_clients": num_clients, "data": {"name": "digits"},
            "partition": {"name": "quantity"}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
            "protocol": {"name": "dsgd"}, "topology": {"name": "ring"}, "checkpoint": {"every": 1},
            "output": {"plot": False}, "variants": variants}


VARIANTS = {
    "atc-ring": {"runtime": {"name": "sequential"}},
    "cta-ring": {"protocol": {"name": "dsgd", "order": "cta"}, "runtime": {"name": "sequential"}},
    "cta-torus": {"protocol": {"name": "dsgd", "order": "cta"}, "topology": {"name": "torus", "cols": 4},
                  "runtime": {"name": "vectorized"}},
    "atc-torus": {"topology": {"name": "torus", "cols": 4}, "runtime": {"name": "vectorized"}},
    "mgs-one-peer": {"algorithm": {"name": "fedsam", "rho": 0.05, "lr": 0.05, "batch_size": 20},
                     "protocol": {"name": "dsgd", "gossip_steps": 2, "mixing": {"name": "uniform_neighbour"}},
                     "topology": {"name": "one_peer_exponential"}, "runtime": {"name": "vectorized"}},
    "choco-ring": {"protocol": {"name": "dsgd", "consensus_step": 0.5}, "runtime": {"name": "sequential"},
                   "compression": {"gossip": {"name": "random_k", "ratio": 0.2, "error_feedback": "ef21"}}},
    "cdproxsgt-ring": {"algorithm": {"name": "gradient", "batch_size": 20, "local_steps": 1},
                       "protocol": {"name": "cdproxsgt", "lr": 0.05, "l1": 1e-3, "gamma_x": 0.5, "gamma_y": 0.5},
                       "compression": {"gossip": {"name": "topk", "ratio": 0.3, "error_feedback": "ef21"}},
                       "runtime": {"name": "vectorized"}},
    "token-srrw": {"protocol": {"name": "token", "walk": "srrw", "alpha": 1.0, "tokens": 3, "repetitions": 2},
                   "runtime": {"name": "vectorized"}},
    "dadao-ring": {"algorithm": {"name": "gradient", "batch_size": 20, "local_steps": 1},
                   "protocol": {"name": "dadao", "L": 20.0, "mu": 0.1}, "runtime": {"name": "sequential"}},
}
def assert_same_rows(ranked: list[dict[str, Any]], single: list[dict[str, Any]]) -> None:
    """Every figure of every row but wall time agrees: numbers to rel 1e-6, the rest (histograms) exactly."""
    assert [(r["variant"], r["round"]) for r in ranked] == [(r["variant"], r["round"]) for r in single]
    for a, b in zip(ranked, single, strict=True):
        assert set(a) == set(b)
        for key in set(a) - {"wall_time"}:
            if isinstance(a[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-12), (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """One `mpiexec -n 2` run of every variant (checkpointing every round), and its scenario."""
    tmp = tmp_path_factory.mktemp("gossip")
    scenario = gossip_scenario(**VARIANTS)
    path = tmp / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    done = mpirun(2, str(cli_script(tmp / "cli.py")), "run", str(path), "--quiet", "--out", str(tmp / "run"))
    assert done.returncode == 0, done.stderr
    assert "running on 2 MPI ranks" in done.stderr
    return scenario, tmp / "run"


@needs_mpiexec
def test_every_gossip_protocol_over_two_ranks_gives_the_single_process_metrics(two_rank_run):
    """Every gossip protocol: D-SGD (ATC and CTA on a ring and a torus, DFedSAM-MGS on the time-varying one-peer
    exponential graph), SRRW tokens and DADAO."""
    scenario, out = two_rank_run
    ranked = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single = fedsim.run(scenario, write=False).metrics.rows
    assert {r["variant"] for r in ranked} == set(VARIANTS)
    assert all(r["consensus_error"] > 0 for r in ranked if r["round"] > 0 and "consensus_error" in r)
    assert_same_rows(ranked, single)


@needs_mpiexec
def test_each_rank_checkpoints_only_the_rows_of_its_own_block(two_rank_run):
    scenario, out = two_rank_run
    newest = completed(out)[0]
    manifest = read_manifest(newest)
    assert manifest["variant"] == "dadao-ring" and manifest["ranks"] == 2
    for rank, block in enumerate(block_partition(scenario["num_clients"], 2)):
        nodes = read_rank(newest, manifest, rank)["protocol"]["nodes"]
        assert nodes and all(leaf.shape[0] == len(block) == 8 for leaf in nodes.values())


def rows_without_wall_time(out: Path, variant: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows if r["variant"] == variant]


KILL_RANK_0_AT_EVALUATION = f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
from kill_run import kill_at
kill_at("evaluation", 3)
"""


@needs_mpiexec
def test_two_ranks_killed_mid_gossip_resume_from_their_own_rows_to_the_uninterrupted_metrics(two_rank_run, tmp_path):
    scenario, whole = two_rank_run
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    out = tmp_path / "run"
    args = ("run", str(path), "--quiet", "--variant", "atc-torus", "--out", str(out))
    killed = mpirun(2, str(cli_script(tmp_path / "killed.py", KILL_RANK_0_AT_EVALUATION)), *args)
    assert killed.returncode != 0 and completed(out)
    done = mpirun(2, str(cli_script(tmp_path / "cli.py")), "run", "--resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "resumed at server step" in done.stderr
    assert rows_without_wall_time(out, "atc-torus") == rows_without_wall_time(whole, "atc-torus")


@pytest.mark.slow
@needs_mpiexec
def test_four_ranks_on_a_torus_give_the_single_process_metrics(tmp_path):
    """Each rank holds one torus row and exchanges with two of the three other ranks (about 10 s on 2 cores)."""
    scenario = gossip_scenario(**{k: VARIANTS[k] for k in ("atc-torus",)}) | {"rounds": 2}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    done = mpirun(4, str(cli_script(tmp_path / "cli.py")), "run", str(path), "--quiet", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    ranked = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert_same_rows(ranked, fedsim.run(scenario, write=False).metrics.rows)


KILL_RANK_1 = """
import os, signal
from fedsim.runtime import mpi
from fedsim.runtime.sequential import SequentialRuntime

original, calls = SequentialRuntime.run_jobs, []

def run_jobs(self, jobs, starts):
    calls.append(1)
    if mpi.rank() == 1 and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, jobs, starts)

SequentialRuntime.run_jobs = run_jobs
"""


@needs_mpiexec
def test_a_rank_killed_mid_gossip_ends_the_run_instead_of_hanging(tmp_path):
    scenario = gossip_scenario(**{"atc-ring": VARIANTS["atc-ring"]})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    done = mpirun(2, str(cli_script(tmp_path / "cli.py", KILL_RANK_1)), "run", str(path), "--quiet", "--out",
                  str(tmp_path / "run"), timeout=60)
    assert done.returncode != 0 and not (tmp_path / "run" / "summary.json").exists()
