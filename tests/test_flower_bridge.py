"""The Flower bridge: every client/server algorithm run as a Flower ServerApp and ClientApps (in one process, on
Flower's in-memory grid and simulation-engine workers, messages serialized as for the wire) gives the metrics
of the in-process run; records carry pytrees bit for bit; bad node configs are one line."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("flwr")

from flwr.app import Error, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.config import get_project_config, validate_config  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.serverapp.server_app import LoadServerAppError  # noqa: E402
from flwr.supercore.object_ref import load_app  # noqa: E402
from flwr.superlink.grid import InMemoryGrid  # noqa: E402
from rulekit import client_server_algorithms, rule_params  # noqa: E402

import fedsim  # noqa: E402
from fedsim.cli import main  # noqa: E402
from fedsim.codecs import build_codec  # noqa: E402
from fedsim.errors import FedsimError  # noqa: E402
from fedsim.flower.client import NodeConfigError, client_app  # noqa: E402
from fedsim.flower.local import run_in_process  # noqa: E402
from fedsim.flower.records import data_bytes, get_tree, over_the_wire, put_tree, wire_bytes  # noqa: E402
from fedsim.flower.runtime import FlowerError  # noqa: E402
from fedsim.flower.server import metrics_rows, server_app  # noqa: E402
from fedsim.params import tree_nbytes  # noqa: E402


def small(algorithm: str, **extra: Any) -> dict[str, Any]:
    """4 digits clients, 3 a round with one straggler, 2 rounds of logistic regression."""
    params = {"fedprox": {"mu": 0.1}}.get(algorithm, {})
    hp = rule_params(algorithm, {"lr": 0.05, "batch_size": 20, "local_epochs": 1})
    return {"name": "bridge", "seed": 1, "rounds": 2, "num_clients": 4, "clients_per_round": 3,
            "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
            "algorithm": {"name": algorithm, **hp, **params},
            "stragglers": {"fraction": 0.34}, "runtime": {"name": "sequential"}, **extra}


def nodes(count: int) -> list[dict[str, Any]]:
    return [{"partition-id": k, "num-partitions": count} for k in range(count)]


def bridged(scenario: dict[str, Any], node_configs: list[dict[str, Any]] | None = None,
            run_config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    context = run_in_process(server_app(scenario), client_app(scenario),
                             node_configs if node_configs is not None else nodes(scenario["num_clients"]), run_config)
    return metrics_rows(context)


def assert_same_metrics(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    assert len(rows) == len(reference) > 1
    for row, ref in zip(rows, reference, strict=True):
        assert row.keys() == ref.keys()
        for key, value in ref.items():
            if key == "wall_time":
                continue
            if isinstance(value, float):
                assert math.isclose(row[key], value, rel_tol=1e-9, abs_tol=1e-12), (key, row, ref)
            else:
                assert row[key] == value, (key, row, ref)


def in_process(scenario: dict[str, Any]) -> list[dict[str, Any]]:
    return fedsim.run(scenario, write=False).metrics.rows


@pytest.mark.parametrize("algorithm", client_server_algorithms())
def test_every_client_server_algorithm_through_flower_gives_the_in_process_metrics(algorithm):
    scenario = small(algorithm)
    rows = bridged(scenario)
    assert_same_metrics(rows, in_process(scenario))
    assert rows[-1]["bytes_up"] > 0 and rows[-1]["accuracy"] > rows[0]["accuracy"]


def test_topk_with_error_feedback_through_flower_gives_the_in_process_metrics():
    uplink = {"name": "topk", "ratio": 0.1, "error_feedback": True}
    scenario = small("fedavg", rounds=3, clients_per_round=4, stragglers={"fraction": 0.0},
                     compression={"uplink": uplink})
    rows = bridged(scenario)
    assert_same_metrics(rows, in_process(scenario))
    # Residuals carried on the nodes change the numbers: without error feedback they differ.
    plain = in_process({**scenario, "compression": {"uplink": {**uplink, "error_feedback": False}}})
    assert rows[-1]["loss"] != plain[-1]["loss"]
    # Bytes up are what the replies' payload records carried: k int32 indices and k float32 values, plus the count.
    template = {"delta": {"weight": torch.zeros(10, 64), "bias": torch.zeros(10)}}
    per_message = build_codec(uplink, "compression.uplink").payload_bytes(template) + 8
    assert per_message == 65 * 8 + 8
    assert rows[1]["bytes_up"] == 4 * per_message


@pytest.mark.parametrize("feedback", ["ef21", {"name": "econtrol", "eta": 0.1}], ids=["ef21", "econtrol"])
def test_receiver_mirrored_error_feedback_through_flower_gives_the_in_process_metrics(feedback):
    # The server keeps each client's h_i from its payloads alone; first messages travel uncompressed.
    uplink = {"name": "topk", "ratio": 0.1, "error_feedback": feedback}
    scenario = small("fedavg", rounds=3, clients_per_round=4, stragglers={"fraction": 0.0},
                     compression={"uplink": uplink})
    rows = bridged(scenario)
    assert_same_metrics(rows, in_process(scenario))
    assert rows[1]["bytes_up"] == 4 * ((10 * 64 + 10) * 4 + 8)
    assert rows[2]["bytes_up"] - rows[1]["bytes_up"] == 4 * (65 * 8 + 8)


def test_a_compressed_downlink_travels_as_its_payload_and_nodes_decode_it(monkeypatch):
    import fedsim.flower.client as flower_client

    decoded = []
    real = flower_client.decoded_broadcast
    monkeypatch.setattr(flower_client, "decoded_broadcast", lambda sim, payload: decoded.append(payload) or
                        real(sim, payload))
    scenario = small("fedavg", compression={"downlink": {"name": "qsgd", "levels": 4},
                                            "uplink": {"name": "topk", "ratio": 0.1, "error_feedback": "econtrol"}})
    rows = bridged(scenario)
    assert_same_metrics(rows, in_process(scenario))
    # Every job's start arrived as the qsgd payload (a norm and bit-packed codes), never as the decoded model.
    assert len(decoded) == rows[-1]["client_updates"] == 4 and all(set(p) == {"norm", "codes"} for p in decoded)


def test_a_downlink_codec_that_needs_a_mirror_on_the_nodes_is_refused_on_flower():
    scenario = small("fedavg", clients_per_round=4, stragglers={"fraction": 0.0},
                     compression={"downlink": {"name": "topk", "ratio": 0.1, "error_feedback": "ef21"}})
    with pytest.raises(FedsimError, match=r"^compression\.downlink\.error_feedback: on Flower nodes"):
        bridged(scenario)


def test_records_carry_pytrees_bit_for_bit_with_their_structure():
    tree = {"delta": {"linear.weight": torch.randn(3, 4), "deep": {"x": torch.randn(2, dtype=torch.float64)}},
            "half": torch.randn(5).to(torch.bfloat16), "count": torch.tensor(2**40 + 3, dtype=torch.int64),
            "mask": torch.tensor([True, False]), "empty": {}, "none": torch.empty(0, 3),
            "odd": torch.tensor([float("nan"), -0.0, float("inf")])}
    records = RecordDict()
    put_tree(records, "m", tree)
    back = get_tree(over_the_wire(records), "m")

    def check(a: dict[str, Any], b: dict[str, Any]) -> None:
        assert list(a) == list(b)
        for key in a:
            if isinstance(a[key], dict):
                check(a[key], b[key])
            else:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
                assert a[key].reshape(-1).view(torch.uint8).tolist() == b[key].reshape(-1).view(torch.uint8).tolist()

    check(tree, back)
    assert list(records.array_records["m"]) == ["delta/linear.weight", "delta/deep/x", "half", "count", "mask",
                                                "none", "odd"]
    assert data_bytes(records.array_records["m"]) == tree_nbytes(tree) == 48 + 16 + 10 + 8 + 2 + 12
    assert wire_bytes(records) > tree_nbytes(tree)
    assert get_tree(records, "absent") is None
    put_tree(records, "m", None)
    assert "m" not in records and get_tree(records, "m") is None


def test_a_pytree_key_with_the_separator_is_refused():
    with pytest.raises(ValueError, match="contains '/'"):
        put_tree(RecordDict(), "m", {"a/b": torch.zeros(1)})


@pytest.mark.parametrize(("configs", "expected"), [
    ([{"partition-id": 0}, {"partition-id": 1}, {"partition-id": 2}, {}],
     "node_config.partition-id: missing; start the node with --node-config"),
    ([{"partition-id": k} for k in (0, 1, 2, 4)], "node_config.partition-id: 4 is out of range; the scenario has 4"),
    ([{"partition-id": k} for k in (0, 1, 2)] + [{"partition-id": "3"}],
     "node_config.partition-id: expected an integer in 0..3, got '3'"),
    ([{"partition-id": k} for k in (0, 1, 2, 2)], "node_config.partition-id: nodes "),
    ([{"partition-id": k, "num-partitions": 5} for k in range(4)],
     "node_config.num-partitions: 5, but the scenario has 4 clients"),
])
def test_bad_node_configs_are_one_line_naming_the_setting(configs, expected):
    with pytest.raises(NodeConfigError) as caught:
        bridged(small("fedavg"), configs, {"timeout": 5.0})
    line = str(caught.value)
    assert line.startswith(expected) and "\n" not in line
    assert isinstance(caught.value, FedsimError)


def test_a_client_without_a_node_is_named_once_the_timeout_passes():
    with pytest.raises(FlowerError, match=r"^nodes: no node holds client\(s\) 3 after 0.5 s \(3 of 4"):
        bridged(small("fedavg"), [{"partition-id": k} for k in range(3)], {"timeout": 0.5})


def test_a_node_that_stops_answering_is_dropped_after_the_timeout_and_the_rows_say_which_round_lost_it():
    scenario = small("fedavg", rounds=3, clients_per_round=4, stragglers={"fraction": 0.0})
    real = client_app(scenario)
    stalling = ClientApp()

    @stalling.query()
    def query(message, context):
        return real(message, context)

    @stalling.train()
    def train(message, context):
        if context.node_config["partition-id"] == 3 and message.content.config_records["job"]["id"] >= 1:
            time.sleep(1.5)
        return real(message, context)

    context = run_in_process(server_app(scenario), stalling, nodes(4), {"timeout": 1.0})
    rows, full = metrics_rows(context), in_process(scenario)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert_same_metrics(rows[:2], full[:2])
    # Round 1 waits for the node and loses its job; round 2 no longer waits for it.
    assert "lost" not in rows[1]
    assert [[(lost["round"], lost["client"]) for lost in row["lost"]] for row in rows[2:]] == [[(1, 3)], [(2, 3)]]
    per_message = full[1]["bytes_up"] // 4
    assert rows[3]["bytes_up"] == (4 + 3 + 3) * per_message


def test_a_node_the_superlink_reports_unavailable_loses_its_job_as_a_silent_one(monkeypatch):
    scenario = small("fedavg", rounds=3, clients_per_round=4, stragglers={"fraction": 0.0})
    original = InMemoryGrid.send_and_receive

    def node_3_unavailable_from_round_1(self, messages, *, timeout=None):
        messages = list(messages)
        dead = [m for m in messages if m.metadata.message_type == "train" and
                m.content.config_records["job"]["client"] == 3 and m.content.config_records["job"]["id"] >= 1]
        replies = list(original(self, [m for m in messages if m not in dead], timeout=timeout))
        return replies + [Message(Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=m)
                          for m in dead]

    monkeypatch.setattr(InMemoryGrid, "send_and_receive", node_3_unavailable_from_round_1)
    rows = bridged(scenario)
    assert [[(lost["round"], lost["client"]) for lost in row.get("lost", [])] for row in rows] == \
        [[], [], [(1, 3)], [(2, 3)]]


def test_flower_app_writes_an_app_flower_accepts_that_gives_the_in_process_metrics(tmp_path, capsys):
    scenario = small("fedprox", variants={"a": {"algorithm.mu": 0.0}, "b": {"algorithm.mu": 0.5}})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    app = tmp_path / "app"
    assert main(["flower-app", str(path), "--out", str(app), "--variant", "b"]) == 0
    config = get_project_config(app)
    valid, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert valid, errors
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedsim_app.server_app:app",
                                                           "clientapp": "fedsim_app.client_app:app"}
    server = load_app("fedsim_app.server_app:app", LoadServerAppError, str(app))
    client = load_app("fedsim_app.client_app:app", LoadServerAppError, str(app))
    out = tmp_path / "metrics"
    context = run_in_process(server, client, nodes(4), {"timeout": 60.0, "out": str(out)})
    reference = fedsim.run(path, variants=["b"], write=False).metrics.rows
    assert_same_metrics(metrics_rows(context), reference)
    written = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in written] == [r["round"] for r in reference]


def test_flower_app_needs_a_variant_when_the_scenario_has_several(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small("fedprox", variants={"a": {"algorithm.mu": 0.0}, "b": {}})))
    assert main(["flower-app", str(path), "--out", str(tmp_path / "app")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedsim: error: --variant: a Flower app runs one variant; choose one of a, b"
    assert not (tmp_path / "app").exists()
    Path(tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["flower-app", str(path), "--variant", "a", "--out", str(tmp_path / "full")]) == 2
    assert capsys.readouterr().err.startswith("fedsim: error: --out: ")


PR_SET_CHILD_SUBREAPER = 36
FLOWER_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(marker: bytes) -> list[int]:
    """Live processes whose environment holds `marker` (every process a test's Flower processes started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def reap_children() -> None:
    """Collect every exited child (Flower's detached processes are reparented here while we are their subreaper)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


class FlowerProcesses:
    """A SuperLink and SuperNodes on 127.0.0.1, each with its own FLWR_HOME under `root`. `stop` ends them and
    every process they started (the test process is their subreaper, so none is left to PID 1)."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, []
        root.mkdir(parents=True)
        self.marker = f"FEDSIM_FLOWER_TEST={root}"
        self.port = free_port()

    def env(self, home: str) -> dict[str, str]:
        key, value = self.marker.split("=", 1)
        (self.root / home).mkdir(parents=True, exist_ok=True)
        return {**os.environ, key: value, "FLWR_HOME": str(self.root / home), "FLWR_TELEMETRY_ENABLED": "0",
                "PATH": f"{FLOWER_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def start(self, name: str, *args: str) -> None:
        with (self.root / f"{name}.log").open("wb") as log:
            self.procs.append(subprocess.Popen([str(FLOWER_BIN / args[0]), *args[1:]], env=self.env(name),
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start_federation(self, nodes: int, node_config: dict[int, str] | None = None) -> None:
        """A SuperLink and `nodes` SuperNodes (node k holding client k, with `node_config[k]` added)."""
        self.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-runtime-dependency-installation")
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", self.port)) != 0:
            assert time.monotonic() < deadline and self.procs[0].poll() is None, self.logs()
            time.sleep(0.2)
        for k in range(nodes):
            self.start(f"node{k}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                       "--port", str(free_port()), "--node-config",
                       f"partition-id={k} num-partitions={nodes} {(node_config or {}).get(k, '')}".strip())

    def flwr_run(self, app: Path, out: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
        env = self.env("cli")
        (self.root / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
            f"insecure = true\n")
        return subprocess.run([str(FLOWER_BIN / "flwr"), "run", str(app), "local", "--stream", "--run-config",
                               f"out='{out}' timeout={timeout}"], env=env, capture_output=True, text=True,
                              timeout=300)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in marked(self.marker.encode()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + grace
            while marked(self.marker.encode()) and time.monotonic() < deadline:
                reap_children()
                time.sleep(0.1)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        reap_children()


@pytest.fixture
def flower_processes(tmp_path):
    libc = ctypes.CDLL(None, use_errno=True)
    if not sys.platform.startswith("linux") or libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("needs Linux (the test process reaps Flower's detached processes)")
    processes = FlowerProcesses(tmp_path / "flower")
    try:
        yield processes
    finally:
        processes.stop()
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        assert marked(processes.marker.encode()) == [], "Flower processes left running"


@pytest.mark.flower_processes
def test_fedprox_and_scaffold_on_a_real_superlink_and_supernodes_give_the_in_process_metrics(flower_processes,
                                                                                             tmp_path):
    processes = flower_processes
    processes.start_federation(nodes=2)
    for algorithm in ("fedprox", "scaffold"):
        scenario = {**small(algorithm), "num_clients": 2, "clients_per_round": 2, "stragglers": {"fraction": 0.0}}
        path = tmp_path / f"{algorithm}.yaml"
        path.write_text(yaml.safe_dump(scenario))
        app, out = tmp_path / f"{algorithm}-app", tmp_path / f"{algorithm}-out"
        assert main(["flower-app", str(path), "--out", str(app)]) == 0
        done = processes.flwr_run(app, out)
        assert done.returncode == 0, done.stdout + done.stderr + processes.logs()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert_same_metrics(rows, in_process(scenario))


def write_mnist_files(directory: Path, samples: int = 60) -> None:
    """Four small IDX files in MNIST's names: random 28x28 images, labels 0..9."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (samples, 28, 28), dtype=np.uint8)
    labels = (np.arange(samples) % 10).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", images[:40]), ("train-labels-idx1-ubyte", labels[:40]),
                        ("t10k-images-idx3-ubyte", images[40:]), ("t10k-labels-idx1-ubyte", labels[40:])):
        header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
        (directory / name).write_bytes(header + array.tobytes())


def test_nodes_read_their_data_from_their_own_data_dir(tmp_path):
    write_mnist_files(tmp_path / "server")
    scenario = small("fedavg", data={"name": "mnist", "root": str(tmp_path / "server")}, num_clients=2,
                     clients_per_round=2, stragglers={"fraction": 0.0})
    configs = []
    for k in range(2):
        write_mnist_files(tmp_path / f"device{k}")
        configs.append({"partition-id": k, "data-dir": str(tmp_path / f"device{k}")})
    assert_same_metrics(bridged(scenario, configs), in_process(scenario))
    missing = [{"partition-id": 0, "data-dir": str(tmp_path / "nowhere")}, {"partition-id": 1}]
    with pytest.raises(NodeConfigError, match=r"^node_config\.data-dir: '.*nowhere': data\.root"):
        bridged(scenario, missing)


def test_a_node_whose_reply_was_lost_starts_its_uplink_codec_afresh():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord

    from fedsim.flower.client import CODEC_STATE, HEARD, SENT, synced_codec_state

    context = SimpleNamespace(state=RecordDict())
    put_tree(context.state, CODEC_STATE, {"h": {"w": torch.ones(3)}})
    context.state[SENT] = ConfigRecord({"payloads": 4})

    def train_message(heard: int) -> RecordDict:
        return RecordDict({HEARD: ConfigRecord({"payloads": heard})})

    state, restarted = synced_codec_state(train_message(4), context)  # the server decoded all 4 payloads
    assert not restarted and torch.equal(state["h"]["w"], torch.ones(3))
    state, restarted = synced_codec_state(train_message(3), context)  # the 4th reply never reached it
    assert restarted and state is None
