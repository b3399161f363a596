"""A SuperNode SIGKILLed mid-run on a real SuperLink: the ServerApp waits one `timeout` for its reply, then goes on
with the other node; every row after the kill lists the dead node's client as lost, and no row before it does."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("flwr")

import test_flower_bridge as bridge  # noqa: E402
from test_flower_bridge import FlowerProcesses, assert_same_metrics, in_process, small  # noqa: E402

from fedsim.cli import main  # noqa: E402
from fedsim.flower.build import built  # noqa: E402

flower_processes = bridge.flower_processes
"""The bridge tests' fixture: a SuperLink and SuperNodes, all stopped at the end (also when the test fails)."""

TIMEOUT = 25.0
"""Run config `timeout`: above a healthy round on a busy machine (about 18 s: each message starts a ClientApp
process). The nodes' first answer (about 25 s) has its own `connect_timeout`; if the SuperLink's own verdict on the
dead node (no heartbeat for 2 x 30 s) came first, its error reply would count as the node's silence just the same."""
CONNECT_TIMEOUT = 180.0
GRID_POLL = 3.0
"""Flower's Grid pulls replies every 3 s, so a round may end that much after its timeout."""


def start_flwr_run(processes: FlowerProcesses, app: Path, out: Path, timeout: float) -> subprocess.Popen:
    """`flwr run` of the app on the processes' SuperLink, in the background (its output goes to cli.log)."""
    (processes.root / "cli").mkdir(exist_ok=True)
    (processes.root / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{processes.port}"\n'
        f"insecure = true\n")
    processes.start("cli", "flwr", "run", str(app), "local", "--stream", "--run-config",
                    f"out='{out}' timeout={timeout} connect_timeout={CONNECT_TIMEOUT}")
    return processes.procs[-1]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The metrics rows written so far (the file is rewritten atomically, so it is always whole)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_rows(path: Path, count: int, run: subprocess.Popen, processes: FlowerProcesses,
                  seconds: float) -> list[dict[str, Any]]:
    """The rows once there are `count` of them; fails with the processes' logs if the run ends or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while len(rows := read_rows(path)) < count:
        assert run.poll() is None and time.monotonic() < deadline, processes.logs()
        time.sleep(0.02)
    return rows


@pytest.mark.flower_processes
def test_a_supernode_killed_mid_run_is_lost_in_every_later_round_and_the_run_finishes(flower_processes, tmp_path):
    processes = flower_processes
    processes.start_federation(nodes=2)
    # Client 1 is the slower one: while it takes part, its job sets each round's simulated length.
    scenario = {**small("fedavg"), "rounds": 3, "num_clients": 2, "clients_per_round": 2,
                "stragglers": {"fraction": 0.0}, "systems": {"name": "lognormal"}}
    path, app, out = tmp_path / "s.yaml", tmp_path / "app", tmp_path / "out"
    path.write_text(yaml.safe_dump(scenario))
    assert main(["flower-app", str(path), "--out", str(app)]) == 0
    run = start_flwr_run(processes, app, out, TIMEOUT)
    before = wait_for_rows(out / "metrics.jsonl", 2, run, processes, 240)
    os.killpg(processes.procs[2].pid, signal.SIGKILL)  # node1 (client 1), its SuperExec and ClientApp processes
    run.wait(timeout=240)
    rows = read_rows(out / "metrics.jsonl")
    # `flwr run` exits 0 even when the ServerApp raised, so a whole metrics file is the sign of success.
    assert [r["round"] for r in rows] == [0, 1, 2, 3], processes.logs()
    assert rows[:2] == before and not any("lost" in r for r in before)
    assert_same_metrics(before, in_process(scenario)[:2])

    killed = int(re.search(r"SuperNode ID: (\d+)", (processes.root / "node1.log").read_text())[1])
    assert [r["lost"] for r in rows[2:]] == [[{"round": t, "client": 1, "node": killed}] for t in (1, 2)]

    # Each later round trains on node0 alone: one message up, a new model, a round as long as client 0's job.
    sim = built(path)
    down, up = before[1]["bytes_down"] // 2, before[1]["bytes_up"] // 2
    seconds = [sim.systems.job_seconds(1, c, sim.data.train_sizes[c], down, up) for c in (0, 1)]  # constant compute
    assert math.isclose(before[1]["sim_time"], max(seconds)) and seconds[0] < seconds[1]
    for previous, row in zip(rows[1:], rows[2:], strict=False):
        assert row["bytes_up"] - previous["bytes_up"] == up and row["loss"] != previous["loss"]
        assert math.isclose(row["sim_time"] - previous["sim_time"], seconds[0])

    # The server waited one timeout for the dead node (plus at most one Grid poll), and never again.
    waited = rows[2]["wall_time"] - rows[1]["wall_time"]
    assert TIMEOUT <= waited <= TIMEOUT + GRID_POLL + 2, waited
    assert rows[3]["wall_time"] - rows[2]["wall_time"] < TIMEOUT
