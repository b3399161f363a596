"""Hostile input to the `fedsim` command line: every user mistake is one `fedsim: error:` line, exit status 2.

All cases run as one batch through `tests/hostile.py` (one worker process importing fedsim once, a forked,
resource-limited child per case); each case is then one test, named by its description.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile import (  # noqa: E402
    Case,
    CaseResult,
    Directory,
    Fifo,
    FileSpec,
    GzipZeros,
    Sparse,
    alias_bomb,
    assert_accepted,
    assert_rejected,
    run_cases,
    scenario_text,
)

GiB = 2**30
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the harness reads /proc and forks")


# ---------------------------------------------------------------------------------------------- builders


def case(description: str, scenario: str | bytes | FileSpec | None = None, *args: str, cmd: str = "run",
         files: dict[str, FileSpec] | None = None, expected: str | tuple[str, ...] = (),
         forbidden: tuple[str, ...] = (), prefixes: tuple[str, ...] = (), argv: tuple[str, ...] | None = None,
         timeout: float = 20.0) -> Case:
    """`fedsim CMD s.yaml [--quiet] ARGS...` in a directory holding s.yaml (= `scenario`) and `files`."""
    all_files: dict[str, FileSpec] = dict(files or {})
    if scenario is not None:
        all_files["s.yaml"] = scenario.encode() if isinstance(scenario, str) else scenario
    if argv is None:
        argv = (cmd, "s.yaml", *(("--quiet",) if cmd == "run" else ()), *args)
    return Case(description, tuple(argv), all_files, (expected,) if isinstance(expected, str) else expected,
                forbidden, prefixes, timeout)


def variant_prefixes(name: str) -> tuple[str, ...]:
    return (f"variants.{name}: ",)


def idx(dims: tuple[int, ...], body: bytes = b"") -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000080N, N big-endian dimensions, then `body`."""
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body


def mnist_files(root: str = "data", train: int = 100, test: int = 20, labels: bytes | None = None,
                **replace: FileSpec) -> dict[str, FileSpec]:
    """A small, valid MNIST directory (train and t10k parts); `replace` swaps files by (dotted-free) name."""
    rng = np.random.default_rng(0)
    files: dict[str, FileSpec] = {
        "train-images-idx3-ubyte": idx((train, 28, 28), rng.integers(0, 256, train * 784, np.uint8).tobytes()),
        "train-labels-idx1-ubyte": idx((train,), labels if labels is not None else bytes(i % 10 for i in range(train))),
        "t10k-images-idx3-ubyte": idx((test, 28, 28), rng.integers(0, 256, test * 784, np.uint8).tobytes()),
        "t10k-labels-idx1-ubyte": idx((test,), bytes(i % 10 for i in range(test))),
    }
    for name, spec in replace.items():
        files.pop(name.removesuffix(".gz"), None)
        files[name] = spec
    return {f"{root}/{name}": spec for name, spec in files.items()}


MNIST = scenario_text({"data": "{name: mnist, root: data}"})
CIFAR = scenario_text({"data": "{name: cifar10, root: cifar}"})


def cifar_batch(n: int = 20, labels: list[int] | None = None) -> bytes:
    """A CIFAR-10 python batch as the original files hold it (bytes keys, uint8 data of n x 3072)."""
    data = np.random.default_rng(n).integers(0, 256, (n, 3072), np.uint8)
    return pickle.dumps({b"batch_label": b"batch", b"labels": labels or [i % 10 for i in range(n)],
                         b"data": data, b"filenames": [b"x.png"] * n}, protocol=2)


class _ReduceTo:
    """Pickles as a call of `func(*args)` on load (what a malicious pickle does)."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def cifar_files(first: bytes, subdir: str = "") -> dict[str, FileSpec]:
    """A CIFAR-10 directory whose data_batch_1 is `first` and the other batches valid."""
    root = f"cifar/{subdir}" if subdir else "cifar"
    files: dict[str, FileSpec] = {f"{root}/data_batch_1": first}
    files.update({f"{root}/data_batch_{i}": cifar_batch() for i in range(2, 6)})
    files[f"{root}/test_batch"] = cifar_batch()
    return files


def nested_lists(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def nested_mappings(depth: int) -> str:
    return "{a: " * depth + "1" + "}" * depth


def latin1_scenario() -> bytes:
    return scenario_text({"name": "café"}).encode("latin-1")


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def truncated_gzip() -> bytes:
    """A gzip of a valid 100-image IDX file (incompressible pixels), cut after 2000 bytes."""
    return gzip.compress(idx((100, 28, 28), random_bytes(100 * 784, 3)))[:2000]


BOMB = alias_bomb(9, 9)
BOMB_KEYS = "".join(
    [f"lol0: &l0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)]
)
LONG_NAME = "x" * 300


# ---------------------------------------------------------------------------------------------- the cases

REJECTED: list[Case] = [
    # --- files that are not UTF-8 YAML, or not files at all
    case("random binary bytes as the scenario", random_bytes(4096, 1), expected="s.yaml"),
    case("Latin-1 text as the scenario", latin1_scenario(), expected="s.yaml"),
    case("UTF-16 scenario with a byte-order mark", scenario_text().encode("utf-16"), expected="s.yaml"),
    case("NUL bytes inside the scenario", scenario_text().encode() + b"\0\0\0", expected="s.yaml"),
    case("empty scenario file", b"", expected="s.yaml"),
    case("scenario file holding only a comment", "# nothing here\n", expected="s.yaml"),
    case("scenario that is a list, not a mapping", "- rounds: 3\n", expected="s.yaml"),
    case("scenario that is a plain string", "hello\n", expected="s.yaml"),
    case("directory given as the scenario", Directory(), expected=("s.yaml", "directory"), forbidden=("not found",)),
    case("missing scenario file", argv=("run", "missing.yaml", "--quiet"), expected="missing.yaml"),
    case("named pipe given as the scenario", Fifo(), expected="s.yaml", timeout=10),
    case("/dev/zero given as the scenario", argv=("run", "/dev/zero", "--quiet"), expected="/dev/zero", timeout=10),
    case("sparse 8 GiB file as the scenario", Sparse(8 * GiB, scenario_text().encode()), expected="s.yaml"),
    # --- deep nesting
    case("600 nested lists in a flow sequence", scenario_text({"rounds": nested_lists(600)})),
    case("1000 nested flow mappings", scenario_text({"data": nested_mappings(1000)})),
    case("700 nested block mappings",
         scenario_text() + "".join(f"{'  ' * i}a{i}:\n" for i in range(700)) + "  " * 700 + "x: 1\n"),
    case("3000-part dotted --set key", scenario_text(), "--set", ".".join(["a"] * 3000) + "=1"),
    case("2000 nested lists in a --set value", scenario_text(), "--set", f"model.hidden={nested_lists(2000)}",
         expected="model.hidden"),
    case("1000 nested mappings inside a variant",
         scenario_text(extra=f"variants:\n  deep: {{data: {nested_mappings(1000)}}}"),
         expected="s.yaml|variants.deep"),
    # --- names of the wrong type
    case("model name is a list", scenario_text({"model": "{name: [logreg]}"}), expected="model.name"),
    case("algorithm name is a mapping", scenario_text({"algorithm": "{name: {a: 1}}"}), expected="algorithm.name"),
    case("variant named by the integer 1", scenario_text(extra="variants:\n  1: {rounds: 2}"),
         expected="variants.1|s.yaml"),
    case("data name is an integer", scenario_text({"data": "{name: 5}"}), expected="data.name"),
    case("partition name is a boolean", scenario_text({"partition": "{name: true}"}), expected="partition.name"),
    case("server name is a float", scenario_text(extra="server: {name: 1.5}"), expected="server.name"),
    case("topology name is null", scenario_text(extra="topology: {name: null}"), expected="topology.name"),
    case("runtime name is a list", scenario_text(extra="runtime: {name: [vectorized]}"), expected="runtime.name"),
    case("systems name is a mapping", scenario_text(extra="systems: {name: {homogeneous: 1}}"),
         expected="systems.name"),
    case("scenario name is an integer", scenario_text({"name": "123"}), expected="name"),
    case("model given as a bare string", scenario_text({"model": "logreg"}), expected="model"),
    case("variants given as a list", scenario_text(extra="variants: [a, b]"), expected="variants"),
    case("a variant that is a string, not a mapping", scenario_text(extra="variants:\n  fast: quick"),
         expected="variants.fast"),
    case("--set gives a component name a list", scenario_text(), "--set", "algorithm.name=[fedprox]",
         expected="algorithm.name"),
    # --- sizes that overflow or cannot be allocated
    case("memory_budget of 1e400", scenario_text(extra='runtime: {name: vectorized, memory_budget: "1e400"}'),
         expected="runtime.memory_budget"),
    case("negative memory_budget", scenario_text(extra='runtime: {name: vectorized, memory_budget: "-1GiB"}'),
         expected="runtime.memory_budget"),
    case("num_clients of 10**30", scenario_text({"num_clients": str(10**30)}), expected="num_clients"),
    case("num_clients of 2**63", scenario_text({"num_clients": str(2**63)}), expected="num_clients"),
    case("clients_per_round of 10**30", scenario_text({"clients_per_round": str(10**30)}),
         expected="clients_per_round"),
    case("rounds of 10**30", scenario_text({"rounds": str(10**30)}), expected="rounds"),
    case("mlp hidden layer of 10**12 units", scenario_text({"model": f"{{name: mlp, hidden: [{10**12}]}}"}),
         expected="hidden"),
    case("mlp hidden layers of 10**5 x 10**5 units",
         scenario_text({"model": f"{{name: mlp, hidden: [{10**5}, {10**5}]}}"}), expected="hidden"),
    case("cnn with 10**9 channels", scenario_text({"model": f"{{name: cnn, channels: [{10**9}]}}"}),
         expected="channels"),
    case("synthetic data with 10**9 features, natural partition",
         scenario_text({"data": f"{{name: synthetic, num_features: {10**9}}}", "partition": "{name: natural}"}),
         expected="num_features"),
    case("synthetic data with 10**9 features, partition omitted",
         scenario_text({"data": f"{{name: synthetic, num_features: {10**9}}}", "partition": None}),
         expected="num_features"),
    case("synthetic data with sample_scale 10**9",
         scenario_text({"data": f"{{name: synthetic, sample_scale: {10**9}}}", "partition": "{name: natural}"}),
         expected="sample_scale"),
    case("synthetic data with 10**9 classes",
         scenario_text({"data": f"{{name: synthetic, num_classes: {10**9}}}", "partition": "{name: natural}"}),
         expected="num_classes"),
    case("mnist1d with 10**12 samples", scenario_text({"data": f"{{name: mnist1d, num_samples: {10**12}}}"}),
         expected="num_samples"),
    case("batch_size of 10**30 does not blame memory_budget", scenario_text(), "--set",
         f"algorithm.batch_size={10**30}", forbidden=("memory_budget",)),
    case("local_epochs of 10**30", scenario_text(), "--set", f"algorithm.local_epochs={10**30}",
         expected="local_epochs"),
    case("evaluation on 10**30 clients", scenario_text(extra=f"evaluation: {{clients: {10**30}}}"),
         expected="evaluation.clients"),
    case("shards partition with 10**12 shards per client",
         scenario_text({"partition": f"{{name: shards, shards_per_client: {10**12}}}"}),
         expected="shards_per_client"),
    # --- data files that lie
    case("IDX header claims 2^31 x 2^31 images with no bytes", MNIST,
         files=mnist_files(**{"train-images-idx3-ubyte": idx((2**31, 2**31, 28))}), expected="data"),
    case("IDX header claims 2^32-1 in every dimension", MNIST,
         files=mnist_files(**{"train-images-idx3-ubyte": idx((2**32 - 1,) * 3)}), expected="data"),
    case("IDX labels header claims 2^32-1 labels with no bytes", MNIST,
         files=mnist_files(**{"train-labels-idx1-ubyte": idx((2**32 - 1,))}), expected="data"),
    case("gzip member inflating to 4 GiB behind an honest IDX header", MNIST,
         files=mnist_files(**{"train-images-idx3-ubyte.gz": GzipZeros(4 * GiB, idx((4 * GiB // 784, 28, 28)))}),
         expected="data"),
    case("gzip member inflating to 4 GiB behind a header claiming 100 images", MNIST,
         files=mnist_files(**{"train-images-idx3-ubyte.gz": GzipZeros(4 * GiB, idx((100, 28, 28)))}),
         expected="data"),
    case("truncated gzip images file", MNIST,
         files=mnist_files(**{"train-images-idx3-ubyte.gz": truncated_gzip()}),
         expected="data"),
    case("sparse 8 GiB images file whose header matches its size", MNIST,
         files=mnist_files(**{"train-images-idx3-ubyte": Sparse(16 + (8 * GiB // 784) * 784,
                                                                idx((8 * GiB // 784, 28, 28)))}),
         expected="data"),
    case("sparse 8 GiB images file whose header claims 100 images", MNIST,
         files=mnist_files(**{"train-images-idx3-ubyte": Sparse(8 * GiB, idx((100, 28, 28)))}), expected="data"),
    case("MNIST labels outside 0..9", MNIST, files=mnist_files(labels=bytes([200] * 100)), expected="data"),
    case("MNIST label 10 among valid labels", MNIST,
         files=mnist_files(labels=bytes([i % 10 for i in range(99)] + [10])), expected="data"),
    case("CIFAR-10 batch that runs a shell command when unpickled", CIFAR,
         files=cifar_files(pickle.dumps(_ReduceTo(os.system, "touch pwned"))), expected="data"),
    case("CIFAR-10 batch under cifar-10-batches-py that runs a shell command", CIFAR,
         files=cifar_files(pickle.dumps(_ReduceTo(os.system, "touch pwned")), "cifar-10-batches-py"),
         expected="data"),
    case("CIFAR-10 batch that opens a file when unpickled", CIFAR,
         files=cifar_files(pickle.dumps(_ReduceTo(open, "pwned", "w"))), expected="data"),
    case("CIFAR-10 batch that allocates 10 GB when unpickled", CIFAR,
         files=cifar_files(pickle.dumps(_ReduceTo(bytearray, 10**10))), expected="data"),
    case("CIFAR-10 batch with labels outside 0..9", CIFAR, files=cifar_files(cifar_batch(labels=[99] * 20)),
         expected="data"),
    # --- alias bombs
    case("alias bomb as the value of rounds", scenario_text({"rounds": BOMB})),
    case("alias bomb as top-level keys", scenario_text(extra=BOMB_KEYS)),
    case("alias bomb inside a component's parameters", scenario_text({"model": f"{{name: mlp, hidden: {BOMB}}}"})),
    case("alias bomb in a variant override", scenario_text(extra=f"variants:\n  boom: {{model.hidden: {BOMB}}}")),
    case("alias bomb inline in --set", scenario_text(), "--set", f"model.hidden={BOMB}"),
    case("alias bomb used as a mapping key", scenario_text(extra=f"bomb: {BOMB}\nkeyed: {{? *l8 : 1}}")),
    # --- silently accepted today
    case("duplicate top-level rounds", scenario_text(extra="rounds: 5"), expected="rounds"),
    case("lr twice inside algorithm",
         scenario_text({"algorithm": "{name: fedprox, lr: 0.05, batch_size: 20, lr: 0.5}"}), expected="lr"),
    case("a variant defined twice", scenario_text(extra="variants:\n  v1: {rounds: 2}\n  v1: {rounds: 4}"),
         expected="v1"),
    case("duplicate key inside a --set mapping", scenario_text(), "--set", "algorithm={name: fedprox, lr: 1, lr: 2}",
         expected="lr"),
    case("rounds given as the string '1'", scenario_text({"rounds": '"1"'}), expected="rounds"),
    case("rounds given as true", scenario_text({"rounds": "true"}), expected="rounds"),
    case("rounds given as the float 2.5", scenario_text({"rounds": "2.5"}), expected="rounds"),
    case("seed given as the string '0'", scenario_text({"seed": '"0"'}), expected="seed"),
    case("algorithm.lr given as true", scenario_text(), "--set", "algorithm.lr=true", expected="algorithm.lr"),
    case("algorithm.lr given as the string '0.05'",
         scenario_text({"algorithm": '{name: fedprox, lr: "0.05"}'}), expected="algorithm.lr"),
    case("--set rounds to the quoted string '3'", scenario_text(), "--set", 'rounds="3"', expected="rounds"),
    case("evaluation.dissimilarity given as 1", scenario_text(extra="evaluation: {dissimilarity: 1}"),
         expected="evaluation.dissimilarity"),
    case("output.plot given as 'yes'", scenario_text(extra='output: {plot: "yes"}'), expected="output.plot"),
    case("stragglers.fraction given as a string", scenario_text(extra='stragglers: {fraction: "0.1"}'),
         expected="stragglers.fraction"),
    case("algorithm name given as !!binary", scenario_text({"algorithm": "{name: !!binary ZmVkcHJveA==}"}),
         expected="algorithm.name|s.yaml"),
    case("--out given as the empty string", scenario_text(), "--out", "", expected="--out"),
    case("output.dir given as the empty string", scenario_text(extra='output: {dir: ""}'), expected="output.dir"),
    case("a variant sets rounds to a string", scenario_text(extra='variants:\n  v1: {rounds: "2"}'),
         prefixes=variant_prefixes("v1")),
    # --- impossible values
    case("algorithm.lr of .inf", scenario_text(), "--set", "algorithm.lr=.inf", expected="algorithm.lr"),
    case("algorithm.lr of .nan", scenario_text(), "--set", "algorithm.lr=.nan", expected="algorithm.lr"),
    case("algorithm.mu of .inf", scenario_text(), "--set", "algorithm.mu=.inf", expected="algorithm.mu",
         forbidden=("smaller algorithm.lr",)),
    case("algorithm.mu of .nan", scenario_text(), "--set", "algorithm.mu=.nan", expected="algorithm.mu",
         forbidden=("smaller algorithm.lr",)),
    case("server lr of .inf", scenario_text(extra="server: {name: fedavg, lr: .inf}"), expected="server.lr"),
    case("fedadam tau of .inf", scenario_text(extra="server: {name: fedadam, tau: .inf}"), expected="server.tau"),
    case("fedavgm momentum of .nan", scenario_text(extra="server: {name: fedavgm, momentum: .nan}"),
         expected="server.momentum"),
    case("labeldir alpha of .inf", scenario_text({"partition": "{name: labeldir, alpha: .inf}"}),
         expected="partition.alpha", forbidden=("raise alpha",)),
    case("labeldir alpha of .nan", scenario_text({"partition": "{name: labeldir, alpha: .nan}"}),
         expected="partition.alpha"),
    case("stragglers.fraction of .nan", scenario_text(extra="stragglers: {fraction: .nan}"),
         expected="stragglers.fraction"),
    case("systems latency of .nan", scenario_text(extra="systems: {name: homogeneous, latency: .nan}"),
         expected="systems.latency"),
    case("data test_fraction of .nan", scenario_text({"data": "{name: digits, test_fraction: .nan}"}),
         expected="data.test_fraction"),
    case("data test_fraction of 1.5", scenario_text({"data": "{name: digits, test_fraction: 1.5}"}),
         expected="data.test_fraction"),
    case("synthetic alpha of .inf",
         scenario_text({"data": "{name: synthetic, alpha: .inf}", "partition": "{name: natural}"}),
         expected="data.alpha"),
    case("quantity partition sigma of .inf", scenario_text({"partition": "{name: quantity, sigma: .inf}"}),
         expected="partition.sigma"),
    case("lognormal speed_sigma that overflows",
         scenario_text(extra="systems: {name: lognormal, speed_sigma: 1.0e+300}"), expected="systems.speed_sigma"),
    case("quantity partition sigma that overflows",
         scenario_text({"partition": "{name: quantity, sigma: 1.0e+300}"}), expected="partition.sigma"),
    # --- output paths
    case("--out names an existing file", scenario_text(), "--out", "existing.txt",
         files={"existing.txt": b"keep me\n"}, expected="existing.txt"),
    case("--out lies under an existing file", scenario_text(), "--out", "existing.txt/run",
         files={"existing.txt": b"keep me\n"}, expected="existing.txt"),
    case("--out in /proc", scenario_text(), "--out", "/proc/fedsim-x", expected=("--out", "/proc")),
    case("--out in /sys", scenario_text(), "--out", "/sys/fedsim-x", expected=("--out", "/sys")),
    case("--out is /dev/null", scenario_text(), "--out", "/dev/null", expected="/dev/null"),
    case("--out with a 300-character directory name", scenario_text(), "--out", LONG_NAME),
    case("output.dir holding a NUL byte", scenario_text(extra='output: {dir: "a\\0b"}'), expected="output.dir"),
    case("output.dir names an existing file", scenario_text(extra="output: {dir: existing.txt}"),
         files={"existing.txt": b"keep me\n"}, expected="output.dir"),
    case("output.dir with a 300-character directory name", scenario_text(extra=f"output: {{dir: {LONG_NAME}}}"),
         expected="output.dir"),
    case("--out holds an earlier run and --overwrite is missing", scenario_text(), "--out", "old",
         files={"old/metrics.jsonl": b"{}\n"}, expected="--overwrite"),
    # --- several lines for one error
    case("tab indentation error", "rounds: 3\n\tnum_clients: 10\n", expected="s.yaml"),
    case("unclosed double quote", scenario_text({"name": '"tiny'}), expected="s.yaml"),
    case("unclosed flow mapping", scenario_text({"data": "{name: digits"}), expected="s.yaml"),
    case("mapping values not allowed here", scenario_text({"rounds": "3: 4: 5"}), expected="s.yaml"),
    case("no command at all", argv=()),
    case("run without a scenario", argv=("run",)),
    case("unknown option --bogus", scenario_text(), "--bogus", expected="--bogus"),
    case("unknown command frobnicate", argv=("frobnicate",), expected="frobnicate"),
    case("--set without its value", argv=("run", "s.yaml", "--set"), files={"s.yaml": scenario_text().encode()},
         expected="--set"),
    case("--set without '='", scenario_text(), "--set", "rounds", expected="rounds"),
    case("list with an unknown option", argv=("list", "--bogus"), expected="--bogus"),
    case("lognormal speed_sigma of 1000 (numpy divide-by-zero warnings)",
         scenario_text(extra="systems: {name: lognormal, speed_sigma: 1000.0, bandwidth_sigma: 1000.0}"),
         expected="systems"),
    case("quantity partition sigma of 1000 (numpy invalid-value warnings)",
         scenario_text({"partition": "{name: quantity, sigma: 1000.0}"}), expected="partition"),
    case("two YAML documents in one file", scenario_text() + "---\nrounds: 4\n", expected="s.yaml"),
    case("--variant name holding a newline", scenario_text(extra="variants:\n  v1: {rounds: 2}"), "--variant",
         "v1\nv2"),
    case("--set value holding a newline", scenario_text(), "--set", "name=tiny\nrounds: 4", expected="name"),
    case("100000-character scenario name", scenario_text({"name": "n" * 100_000}), expected="name"),
    case("100000-character unknown top-level key", scenario_text(extra=f"? {'k' * 100_000}\n: 1"),
         expected="unknown"),
    # --- errors that name the wrong thing
    case("unknown key in stragglers lists stragglers' fields",
         scenario_text(extra="stragglers: {fraction: 0.1, handlng: drop}"),
         expected=("stragglers.handlng", "handling"), forbidden=("clients_per_round",)),
    case("unknown key in evaluation lists evaluation's fields", scenario_text(extra="evaluation: {evry: 2}"),
         expected=("evaluation.evry", "every"), forbidden=("clients_per_round",)),
    case("unknown key in output lists output's fields", scenario_text(extra="output: {dirr: x}"),
         expected=("output.dirr", "plot"), forbidden=("clients_per_round",)),
    case("unknown key in runtime.placement lists placement's fields",
         scenario_text(extra="runtime: {name: vectorized, placement: {polcy: map}}"),
         expected=("runtime.placement.polcy", "policy"), forbidden=("clients_per_round", "memory_budget")),
    case("unknown key in data lists the data set's fields", scenario_text({"data": "{name: digits, nmae: x}"}),
         expected=("data.nmae", "test_fraction"), forbidden=("clients_per_round",)),
    case("--set ..=1 names the key", scenario_text(), "--set", "..=1", expected=".."),
    case("--set with an empty first part", scenario_text(), "--set", ".rounds=1", expected=".rounds"),
    case("--set with an empty last part", scenario_text(), "--set", "rounds.=1", expected="rounds."),
    case("--set through a non-mapping", scenario_text(), "--set", "rounds.x=1", expected="rounds"),
    case("malformed variant override keeps its prefix", scenario_text(extra="variants:\n  fast: {rounds.x: 1}"),
         prefixes=variant_prefixes("fast")),
    case("empty variant override key keeps its prefix", scenario_text(extra='variants:\n  fast: {"..": 1}'),
         prefixes=variant_prefixes("fast")),
    case("unknown key in a variant keeps its prefix",
         scenario_text(extra="variants:\n  fast: {evaluation.evry: 2}"),
         expected="evaluation.evry", prefixes=variant_prefixes("fast")),
    case("misspelled top-level round names round", scenario_text({"rounds": None}, "round: 3"),
         expected="round:"),
    case("misspelled component name key", scenario_text({"algorithm": "{nme: fedprox}"}), expected="algorithm."),
    case("unknown --variant", scenario_text(extra="variants:\n  v1: {rounds: 2}"), "--variant", "v2",
         expected="v2"),
    # --- tags that try to construct objects
    case("!!python/object/apply:os.system tag",
         scenario_text({"name": '!!python/object/apply:os.system ["touch pwned"]'})),
    case("!!python/name:os.system tag", scenario_text({"algorithm": "{name: !!python/name:os.system }"})),
    case("!!python/object/new tag", scenario_text({"model": "!!python/object/new:os.system [touch pwned]"})),
    case("!!python/module tag", scenario_text({"data": "!!python/module:os"})),
    case("!!set where a name is expected", scenario_text({"model": "{name: !!set {logreg}}"})),
    case("!!timestamp where a string is expected", scenario_text({"name": "!!timestamp 2001-12-14"})),
    case("!!timestamp as a data root", scenario_text({"data": "{name: mnist, root: !!timestamp 2001-12-14}"})),
    case("custom !foo tag", scenario_text({"algorithm": "{name: !foo fedprox}"})),
    case("!!int tag on a non-number", scenario_text({"rounds": "!!int abc"})),
    case("!!float tag on a non-number", scenario_text(), "--set", "algorithm.lr=!!float abc",
         expected="algorithm.lr"),
    case("!!bool tag on a non-boolean", scenario_text(extra="output: {plot: !!bool maybe}")),
    case("!!omap where a component is expected", scenario_text({"algorithm": "!!omap [name: fedprox]"})),
    case("!!python/name tag inline in --set", scenario_text(), "--set", "rounds=!!python/name:os.system",
         expected="rounds"),
    case("!!python/object/apply tag in a variant",
         scenario_text(extra='variants:\n  evil: {name: !!python/object/apply:os.system ["touch pwned"]}')),
    # --- `fedsim check` rejects exactly like `fedsim run`
    case("check: random binary bytes", random_bytes(4096, 2), cmd="check", expected="s.yaml"),
    case("check: directory given as the scenario", Directory(), cmd="check", expected=("s.yaml", "directory"),
         forbidden=("not found",)),
    case("check: 1000 nested flow mappings", scenario_text({"data": nested_mappings(1000)}), cmd="check"),
    case("check: alias bomb as the value of rounds", scenario_text({"rounds": BOMB}), cmd="check"),
    case("check: alias bomb inline in --set", scenario_text(), "--set", f"model.hidden={BOMB}", cmd="check"),
    case("check: duplicate top-level rounds", scenario_text(extra="rounds: 5"), cmd="check", expected="rounds"),
    case("check: num_clients of 10**30", scenario_text({"num_clients": str(10**30)}), cmd="check",
         expected="num_clients"),
    case("check: mlp hidden layer of 10**12 units", scenario_text({"model": f"{{name: mlp, hidden: [{10**12}]}}"}),
         cmd="check", expected="hidden"),
    case("check: IDX header claims 2^31 x 2^31 images", MNIST, cmd="check",
         files=mnist_files(**{"train-images-idx3-ubyte": idx((2**31, 2**31, 28))}), expected="data"),
    case("check: malicious CIFAR-10 pickle", CIFAR, cmd="check",
         files=cifar_files(pickle.dumps(_ReduceTo(os.system, "touch pwned"))), expected="data"),
    case("check: unknown key in evaluation", scenario_text(extra="evaluation: {evry: 2}"), cmd="check",
         expected=("evaluation.evry", "every"), forbidden=("clients_per_round",)),
    case("check: --out names an existing file", scenario_text(), "--out", "existing.txt", cmd="check",
         files={"existing.txt": b"keep me\n"}, expected="existing.txt"),
    case("check: --out in /proc", scenario_text(), "--out", "/proc/fedsim-x", cmd="check",
         expected=("--out", "/proc")),
    case("check: !!python/object/apply tag", scenario_text({"name": '!!python/object/apply:os.system ["touch pwned"]'}),
         cmd="check"),
    case("check: algorithm.mu of .nan", scenario_text(), "--set", "algorithm.mu=.nan", cmd="check",
         expected="algorithm.mu", forbidden=("smaller algorithm.lr",)),
    case("check: misspelled top-level round", scenario_text({"rounds": None}, "round: 3"), cmd="check",
         expected="round:"),
    case("check without a scenario", argv=("check",)),
    case("check: lognormal speed_sigma of 1000",
         scenario_text(extra="systems: {name: lognormal, speed_sigma: 1000.0, bandwidth_sigma: 1000.0}"),
         cmd="check", expected="systems"),
    case("check: quantity partition sigma of 1000 (run rejects it)",
         scenario_text({"partition": "{name: quantity, sigma: 1000.0}"}), cmd="check", expected="partition"),
]

ACCEPTED: dict[str, Case] = {
    "check": case("check of the valid base scenario", scenario_text(), cmd="check"),
    "run": Case("one round of the valid base scenario", ("run", "s.yaml", "--set", "rounds=1", "--quiet", "--out",
                                                            "out"), {"s.yaml": scenario_text().encode()},
                allow_training=True),
    "mnist": case("check of a small valid MNIST directory", MNIST, cmd="check", files=mnist_files()),
    "cifar": case("check of a small valid CIFAR-10 directory", CIFAR, cmd="check", files=cifar_files(cifar_batch())),
}

CODE_CASES = [c for c in REJECTED
              if any(isinstance(f, bytes) and b"pwned" in f for f in c.files.values()) or "pwned" in str(c.argv)]
"""Cases whose input would create the file `pwned` if any code in it ran (pickles, YAML python/* tags)."""


@pytest.fixture(scope="module")
def results() -> dict[str, CaseResult]:
    """Every case of this module, run once as one batch."""
    cases = REJECTED + list(ACCEPTED.values())
    return {r.description: r for r in run_cases(cases, jobs=min(2, os.cpu_count() or 1))}


@pytest.mark.parametrize("hostile", REJECTED, ids=[c.description for c in REJECTED])
def test_user_mistake_is_one_error_line_and_nothing_else(hostile: Case, results: dict[str, CaseResult]) -> None:
    assert_rejected(results[hostile.description], hostile.expected, hostile.forbidden, hostile.prefixes)


@pytest.mark.parametrize("hostile", CODE_CASES, ids=[c.description for c in CODE_CASES])
def test_code_hidden_in_input_never_runs(hostile: Case, results: dict[str, CaseResult]) -> None:
    result = results[hostile.description]
    assert not [p for p in result.written if "pwned" in p], f"code in the input ran: {result.written}"


def test_check_accepts_the_valid_base_scenario_and_writes_nothing(results: dict[str, CaseResult]) -> None:
    result = results[ACCEPTED["check"].description]
    assert_accepted(result)
    assert "rounds:" in result.stdout and not result.written


def test_run_of_the_valid_base_scenario_succeeds(results: dict[str, CaseResult]) -> None:
    result = results[ACCEPTED["run"].description]
    assert_accepted(result)
    assert result.trained and "out/metrics.jsonl" in result.written


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_check_accepts_the_small_valid_data_directory_the_lying_cases_start_from(
        name: str, results: dict[str, CaseResult]) -> None:
    result = results[ACCEPTED[name].description]
    assert_accepted(result)
    assert not result.written
