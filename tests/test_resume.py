"""Runs killed with SIGKILL at random points (local training, arrivals, evaluation, a checkpoint half-written)
resume with `fedsim run --resume` to the uninterrupted run's metrics, bit for bit, for every registered protocol
(each under the sequential or the vectorized runtime) and on two MPI ranks; finished runs, changed scenarios and
damaged checkpoints are one line."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import fedsim
from fedsim.checkpoint import completed
from fedsim.clock import Clock, Event
from fedsim.errors import RunInterrupted
from fedsim.runtime import Job, JobResult
from fedsim.servers import PROTOCOLS
from fedsim.state_tree import flatten_state, unflatten_state

KILL_RUN = str(Path(__file__).with_name("kill_run.py"))
POINTS = ["training", "arrival", "evaluation", "checkpoint"]
ENV = {**os.environ, "UCX_TLS": "self,sm"}


def scenario_for(protocol: str, tiny: dict, runtime: str = "sequential") -> dict:
    """A short run of `protocol` that checkpoints after every server step (every client in flight where the
    protocol does not take `clients_per_round`), on clients of different speeds (so asynchronous protocols run
    jobs in several batches, where a kill can land); gossip runs on a graph drawn afresh every round, mixing twice a
    round."""
    out = {**tiny, "rounds": 6, "protocol": {"name": protocol}, "runtime": {"name": runtime},
           "checkpoint": {"every": 1}, "output": {"plot": False}, "systems": {"name": "linear", "latency": 0.0}}
    meta = PROTOCOLS.get(protocol).meta
    if meta.get("peer_to_peer"):
        out.update(topology={"name": "ring"})
    if protocol == "dadao":
        out.update(algorithm={"name": "gradient", "batch_size": 20, "local_steps": 1},
                   protocol={"name": "dadao", "L": 20.0, "mu": 0.1}, systems={"name": "homogeneous"})
    if protocol == "cdproxsgt":
        out.update(algorithm={"name": "gradient", "batch_size": 20, "local_steps": 1},
                   protocol={"name": "cdproxsgt", "lr": 0.05, "l1": 1e-3, "gamma_x": 0.5, "gamma_y": 0.5},
                   compression={"gossip": {"name": "random_k", "ratio": 0.3, "error_feedback": "ef21"}})
    if protocol == "dsgd":
        # CHOCO-SGD: the public copies and keyed draws of a gossip codec resume with the nodes.
        out.update(topology={"name": "random_k", "k": 2},
                   protocol={"name": "dsgd", "gossip_steps": 2, "mixing": {"name": "uniform_neighbour"},
                             "consensus_step": 0.5},
                   compression={"gossip": {"name": "random_k", "ratio": 0.2, "error_feedback": "ef21"}})
    if "clients_per_round" not in meta.get("needs", ()):
        out.update(clients_per_round=None)
    return out


def rows_of(path: Path) -> list[dict]:
    """metrics.jsonl without wall-clock seconds (the one column a resumed run cannot share)."""
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def fedsim_cli(*args: str, kill: tuple[str, int] | None = None, ranks: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, KILL_RUN, *map(str, kill)] if kill else [sys.executable, "-m", "fedsim"]
    if ranks > 1:
        command = [shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks),
                   *command]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=ENV)


def kill_twice_then_resume(path: Path, out: Path, rng: random.Random, ranks: int = 1) -> list[str]:
    """Start the run, kill it at one random point, resume and kill it at the first call of another, then resume to
    the end; returns the kill points used. Each kill must land (the run must not finish first)."""
    first, second = rng.sample(POINTS, 2)
    killed = fedsim_cli("run", str(path), "--out", str(out), "--quiet", kill=(first, rng.randint(2, 4)), ranks=ranks)
    assert killed.returncode != 0 and "Traceback" not in killed.stderr, killed.stderr
    again = fedsim_cli("run", "--resume", str(out), "--quiet", kill=(second, 1), ranks=ranks)
    assert again.returncode != 0 and "Traceback" not in again.stderr, again.stderr
    done = fedsim_cli("run", "--resume", str(out), "--quiet", ranks=ranks)
    assert done.returncode == 0, done.stderr
    return [first, second]


VECTORIZED = {"fedbuff", "sync_st", "dsgd", "dadao", "token", "cdproxsgt"}
"""Protocols whose resume test runs under the vectorized runtime (stacked node states among them); the others run
under the sequential one, so each runtime's own state is resumed in several protocols' runs, each protocol once."""


@pytest.mark.parametrize("protocol", PROTOCOLS.names())
def test_a_run_killed_twice_resumes_to_the_uninterrupted_metrics_bit_for_bit(tiny, tmp_path, protocol):
    runtime = "vectorized" if protocol in VECTORIZED else "sequential"
    scenario = scenario_for(protocol, tiny, runtime)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    uninterrupted = fedsim.run(scenario, out=tmp_path / "whole")
    points = kill_twice_then_resume(path, tmp_path / "run", random.Random(f"{protocol}/{runtime}"))
    assert rows_of(tmp_path / "run") == rows_of(uninterrupted.out_dir), points
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["complete"]
    assert (tmp_path / "run" / "summary.json").read_text() != ""
    assert len(completed(tmp_path / "run")) == 2  # the last two good checkpoints are kept


def test_client_control_variates_and_error_feedback_residuals_resume_bit_for_bit(tiny, tmp_path):
    """Client state and uplink codec state (SCAFFOLD's c_i, top-k's residuals) come back from the checkpoint."""
    scenario = {**scenario_for("synchronous", tiny, "vectorized"),
                "algorithm": {"name": "scaffold", "lr": 0.05, "batch_size": 20},
                "compression": {"uplink": {"name": "topk", "ratio": 0.1, "error_feedback": True}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    uninterrupted = fedsim.run(scenario, out=tmp_path / "whole")
    points = kill_twice_then_resume(path, tmp_path / "run", random.Random("stateful"))
    assert rows_of(tmp_path / "run") == rows_of(uninterrupted.out_dir), points


def test_two_mpi_ranks_killed_and_resumed_give_the_uninterrupted_metrics(tiny, tmp_path):
    """One scenario with a variant per protocol: a kill may land in any of them; finished variants are kept. (Two
    ranks sum in another order than one process, so the reference is an uninterrupted two-rank run.)"""
    pytest.importorskip("mpi4py")
    variants = {p: {k: v for k, v in scenario_for(p, tiny).items() if k not in tiny or tiny[k] != v}
                for p in PROTOCOLS.names()}
    scenario = {**scenario_for("synchronous", tiny), "variants": variants}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    whole = fedsim_cli("run", str(path), "--out", str(tmp_path / "whole"), "--quiet", ranks=2)
    assert whole.returncode == 0, whole.stderr
    points = kill_twice_then_resume(path, tmp_path / "run", random.Random("mpi"), ranks=2)
    assert rows_of(tmp_path / "run") == rows_of(tmp_path / "whole"), points


@pytest.fixture
def killed_run(tiny, tmp_path) -> tuple[Path, Path, dict]:
    """A run killed after three checkpoints, and its scenario file."""
    scenario = scenario_for("synchronous", tiny)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    out = tmp_path / "run"
    killed = fedsim_cli("run", str(path), "--out", str(out), "--quiet", kill=("evaluation", 5))
    assert killed.returncode == -signal.SIGKILL
    return path, out, scenario


def test_a_damaged_checkpoint_is_named_and_the_previous_good_one_is_used(killed_run, tmp_path):
    path, out, scenario = killed_run
    newest, previous = completed(out)
    steps = json.loads((previous / "manifest.json").read_text())["server_steps"]
    tensors = newest / "rank-0.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10])
    done = fedsim_cli("run", "--resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"note: {tensors}: checksum mismatch (altered or truncated); passing over this checkpoint" in done.stderr
    assert f"resumed at server step {steps} " in done.stderr
    assert rows_of(out) == rows_of(fedsim.run(scenario, out=tmp_path / "whole").out_dir)


@pytest.mark.parametrize("damage", ["tamper", "version"])
def test_with_no_good_checkpoint_the_variant_starts_over(killed_run, tmp_path, damage):
    path, out, scenario = killed_run
    for directory in completed(out):
        manifest = directory / "manifest.json"
        text = manifest.read_text()
        manifest.write_text(text.replace('"server_steps": ', '"server_steps": 1') if damage == "tamper"
                            else text.replace('"format": 1', '"format": 0'))
    done = fedsim_cli("run", "--resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("passing over this checkpoint") == 2
    assert "variant tiny: no usable checkpoint; it starts over from the beginning" in done.stderr
    assert rows_of(out) == rows_of(fedsim.run(scenario, out=tmp_path / "whole").out_dir)


def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny, tmp_path):
    result = fedsim.run(scenario_for("synchronous", tiny), out=tmp_path / "run")
    before = {p.name: p.read_bytes() for p in result.out_dir.iterdir() if p.is_file()}
    done = fedsim_cli("run", "--resume", str(result.out_dir))
    assert done.returncode == 0 and f"note: run {result.out_dir} is finished; nothing to resume" in done.stderr
    assert {p.name: p.read_bytes() for p in result.out_dir.iterdir() if p.is_file()} == before
    again = fedsim.resume(result.out_dir)
    assert again.out_dir is None and again.metrics.rows == result.metrics.rows


def test_resuming_after_the_scenario_file_changed_is_refused_naming_the_field(killed_run):
    path, out, scenario = killed_run
    path.write_text(yaml.safe_dump({**scenario, "algorithm": {**scenario["algorithm"], "mu": 0.5}}, sort_keys=False))
    done = fedsim_cli("run", "--resume", str(out))
    assert done.returncode == 2
    assert done.stderr.startswith(f"fedsim: error: algorithm.mu: {path} changed since the run started")
    assert len(done.stderr.strip().splitlines()) == 1


def test_sigterm_saves_a_checkpoint_and_stops_and_the_run_resumes(tiny, tmp_path):
    scenario = {**scenario_for("synchronous", tiny), "rounds": 150, "checkpoint": {"wall_seconds": 0}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "fedsim", "run", str(path), "--out", str(out), "--quiet"],
                               stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stderr and f"fedsim run --resume {out}" in stderr
    assert len(completed(out)) == 1
    done = fedsim_cli("run", "--resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert rows_of(out) == rows_of(fedsim.run(scenario, out=tmp_path / "whole").out_dir)


def test_run_state_round_trips_shared_objects_records_and_exact_floats():
    message = {"params": {"w": torch.arange(3.0)}}
    job = Job(3, 7, 2, version=1)
    result = JobResult(job, {"delta": {"w": torch.ones(3, dtype=torch.bfloat16)}}, 10, 20, 12)
    state = {"pending": [(job, message), (Job(4, 8, 2, 1), message)], "done": {3: result},
             "x": 0.1 + 0.2, "inf": float("inf"), "queue": [Event(1.5, 0, "arrival", {"job": job})]}
    skeleton, tensors = flatten_state(state)
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["pending"][0][1] is back["pending"][1][1]  # one message, shared as before
    restored = back["done"][3]
    assert restored.job == job and (restored.num_samples, restored.work, restored.message_bytes) == (10, 20, 12)
    assert restored.message["delta"]["w"].dtype == torch.bfloat16
    assert back["x"] == 0.1 + 0.2 and back["inf"] == float("inf")
    assert back["queue"][0] == Event(1.5, 0, "arrival", {}) and back["queue"][0].payload["job"] == job


def test_the_clock_resumes_with_its_queue_in_delivery_order():
    clock = Clock()
    for delay, kind in [(2.0, "b"), (1.0, "a"), (2.0, "c")]:
        clock.schedule(delay, kind)
    again = Clock()
    again.load_state_dict(unflatten_state(*flatten_state(clock.state_dict())))
    seen = []

    class Log:
        def handle(self, event, clock):
            seen.append((event.time, event.kind))

    again.run(Log())
    assert seen == [(1.0, "a"), (2.0, "b"), (2.0, "c")]


def test_a_run_that_is_interrupted_raises_with_the_resume_command(tiny, tmp_path, monkeypatch):
    from fedsim import run_state

    monkeypatch.setattr(run_state.SignalFlag, "__enter__", lambda self: setattr(self, "received", signal.SIGINT)
                        or self)
    with pytest.raises(RunInterrupted, match=r"interrupted by SIGINT at server step 0 .* --resume") as info:
        fedsim.run(scenario_for("synchronous", tiny), out=tmp_path / "run")
    assert info.value.exit_code == 130


@pytest.mark.parametrize("privacy", [
    {"name": "dpsgd", "clip": 1.0, "noise_multiplier": 1.1},
    {"name": "dpfedavg", "clip": 0.5, "noise_multiplier": 0.8},
    {"name": "private_spiderboost", "aggregation": "tree", "noise_multiplier": 1.0},
], ids=["dpsgd", "dpfedavg", "private_spiderboost"])
def test_a_private_runs_spend_resumes_bit_for_bit(tiny, tmp_path, privacy):
    """The privacy spend (clients' local steps, rounds released) comes back from the checkpoint, and so does private
    SpiderBoost's server state (the phase's tree of noisy nodes, its key): the resumed run reports the
    uninterrupted run's epsilon and noise."""
    scenario = {**scenario_for("synchronous", tiny), "privacy": {**privacy, "accountants": ["rdp", "pld"]},
                "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "sampling": "poisson"}}
    if privacy["name"] == "dpfedavg":
        scenario["protocol"] = {"name": "synchronous", "client_sampling": "poisson"}
    if privacy["name"] == "private_spiderboost":
        scenario.update(clients_per_round=10, algorithm={"name": "spiderboost", "batch_size": 16},
                        server={"name": "spiderboost", "lr": 0.5, "phase_length": 4, "difference_rate": 0.3})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    uninterrupted = fedsim.run(scenario, out=tmp_path / "whole")
    points = kill_twice_then_resume(path, tmp_path / "run", random.Random(privacy["name"]))
    resumed = rows_of(tmp_path / "run")
    assert resumed == rows_of(uninterrupted.out_dir), points
    assert resumed[-1]["epsilon_rdp"] > 0 and resumed[-1]["epsilon_pld"] > 0
