"""Property: a valid scenario with ONE invalidating mutation is always rejected cleanly by `fedsim run`/`check`.

Hypothesis draws the mutation (wrong type at a known field, a missing required key, an unknown key at any level,
a non-finite, out-of-bounds, beyond-64-bit or unallocatable number, deep nesting, a long string as a name or key,
non-UTF-8 bytes, an alias bomb, an object-constructing tag) and how it is delivered (in the file, as a
`--set KEY=VALUE` override, or inside a `variants:` entry). The drawn cases are then run as one batch through the
forked, resource-limited harness of `tests/hostile.py` (one worker process, no fresh interpreter per case), and
every one must be a clean rejection (`hostile.rejection_problems`), naming the mutated field where that is
well defined.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile import Case, CaseResult, alias_bomb, describe, rejection_problems, run_cases  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the harness reads /proc and forks")

MAX_EXAMPLES = 400
"""Generated cases per run: about 15 s on two slow cores when fedsim rejects each in tens of milliseconds."""
CASE_TIMEOUT = 10.0
"""Seconds per generated case (a clean rejection takes well under one)."""

NAN, INF = float("nan"), float("inf")

BASE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "rounds": 3,
    "num_clients": 10,
    "clients_per_round": 4,
    "data": {"name": "digits", "test_fraction": 0.1},
    "partition": {"name": "iid"},
    "model": {"name": "logreg"},
    "algorithm": {"name": "fedprox", "lr": 0.05, "batch_size": 20, "local_epochs": 1, "mu": 0.1},
    "server": {"name": "fedavg", "lr": 1.0, "weighting": "samples"},
    "topology": {"name": "star"},
    "systems": {"name": "homogeneous", "speed": 1000.0, "latency": 0.05, "bandwidth_up": 1e6, "bandwidth_down": 1e7},
    "runtime": {"name": "vectorized", "threads": 1, "devices": ["cpu"], "memory_budget": "2GiB", "min_batch": 8,
                "placement": {"policy": "round_robin"}},
    "stragglers": {"fraction": 0.0, "handling": "auto"},
    "evaluation": {"every": 1, "dissimilarity": False},
    "output": {"plot": True},
}
BASES: dict[str, dict[str, Any]] = {
    "base": BASE,
    "mlp": {**BASE, "model": {"name": "mlp", "hidden": [16]}},
    "synthetic": {**BASE, "partition": {"name": "natural"},
                  "data": {"name": "synthetic", "num_features": 60, "num_classes": 10, "sample_scale": 1,
                           "alpha": 1.0, "beta": 1.0}},
}

# Known fields: path -> (base, kind). Kinds pick the wrong-typed values below.
FIELDS: dict[str, tuple[str, str]] = {
    "name": ("base", "str"), "seed": ("base", "int"), "rounds": ("base", "int"), "num_clients": ("base", "int"),
    "clients_per_round": ("base", "int"),
    **{k: ("base", "mapping") for k in ("data", "partition", "model", "algorithm", "server", "topology", "systems",
                                        "runtime", "stragglers", "evaluation", "output", "runtime.placement")},
    **{f"{k}.name": ("base", "str") for k in ("data", "partition", "model", "algorithm", "server", "topology",
                                              "systems", "runtime")},
    "data.test_fraction": ("base", "float"), "algorithm.lr": ("base", "float"),
    "algorithm.batch_size": ("base", "int"), "algorithm.local_epochs": ("base", "int"),
    "algorithm.mu": ("base", "float"), "server.lr": ("base", "float"), "server.weighting": ("base", "literal"),
    "systems.speed": ("base", "float"), "systems.latency": ("base", "float"),
    "systems.bandwidth_up": ("base", "float"), "systems.bandwidth_down": ("base", "float"),
    "runtime.threads": ("base", "int"), "runtime.devices": ("base", "devices"),
    "runtime.memory_budget": ("base", "size"), "runtime.min_batch": ("base", "int"),
    "runtime.chunk_size": ("base", "int"), "runtime.compile": ("base", "bool"),
    "runtime.placement.policy": ("base", "literal"), "runtime.placement.map": ("base", "mapping"),
    "stragglers.fraction": ("base", "float"), "stragglers.handling": ("base", "literal"),
    "evaluation.every": ("base", "int"), "evaluation.dissimilarity": ("base", "bool"),
    "evaluation.clients": ("base", "int"), "output.dir": ("base", "str"), "output.plot": ("base", "bool"),
    "model.hidden": ("mlp", "list_int"),
    "data.num_features": ("synthetic", "int"), "data.num_classes": ("synthetic", "int"),
    "data.sample_scale": ("synthetic", "int"), "data.alpha": ("synthetic", "float"),
    "data.beta": ("synthetic", "float"),
}
NAME_FIELDS = ["name"] + [p for p in FIELDS if p.endswith(".name")]
STR_KINDS = {"str", "devices", "size"}

# (path, invalid values, substring the error must hold; "" = only that it must not blame memory_budget)
BIG = (2**63, 2**64, 10**30)
BAD_NUMBERS: list[tuple[str, tuple[Any, ...], str]] = [
    ("seed", (-1, -(2**70), 2**64), "seed"),
    ("rounds", (0, -1, *BIG), "rounds"),
    ("num_clients", (0, -3, *BIG), "num_clients"),
    ("num_clients", (10**12, 10**15), "num_clients"),
    ("clients_per_round", (0, -1, 11, *BIG), "clients_per_round"),
    ("data.test_fraction", (NAN, INF, -INF, -0.5, 1.0, 1.5), "data.test_fraction"),
    ("algorithm.lr", (NAN, INF, -INF, 0.0, -0.1), "algorithm.lr"),
    ("algorithm.batch_size", (0, -1), "algorithm.batch_size"),
    ("algorithm.batch_size", BIG, ""),
    ("algorithm.local_epochs", (0, -1, *BIG), "algorithm.local_epochs"),
    ("algorithm.mu", (NAN, INF, -INF, -1.0), "algorithm.mu"),
    ("server.lr", (NAN, INF, -INF, 0.0, -1.0), "server.lr"),
    ("systems.speed", (NAN, -INF, 0.0, -1.0), "systems.speed"),
    ("systems.latency", (NAN, INF, -INF, -1.0), "systems.latency"),
    ("systems.bandwidth_up", (NAN, -INF, 0.0), "systems.bandwidth_up"),
    ("systems.bandwidth_down", (NAN, -INF, 0.0), "systems.bandwidth_down"),
    ("runtime.threads", (0, -1, *BIG), "runtime.threads"),
    ("runtime.min_batch", (0, -1, 2**64), "runtime.min_batch"),
    ("runtime.chunk_size", (0, -1, 2**64), "runtime.chunk_size"),
    ("runtime.memory_budget", (-1, 2**64, "1e400", "-1GiB", "lots"), "runtime.memory_budget"),
    ("stragglers.fraction", (NAN, INF, -INF, -0.1, 1.5), "stragglers.fraction"),
    ("evaluation.every", (0, -1, 2**64), "evaluation.every"),
    ("evaluation.clients", (0, -1, 2**64), "evaluation.clients"),
    ("model.hidden", ([0], [-1], [2**64], [16, -3]), "model.hidden"),
    ("model.hidden", ([10**12], [10**6, 10**6]), "hidden"),
    ("data.num_features", (0, -1, 2**64), "data.num_features"),
    ("data.num_features", (10**9, 10**12), "num_features"),
    ("data.num_classes", (1, 0, -1, 2**64), "data.num_classes"),
    ("data.num_classes", (10**9,), "num_classes"),
    ("data.sample_scale", (0, -1, 2**64), "data.sample_scale"),
    ("data.sample_scale", (10**9,), "sample_scale"),
    ("data.alpha", (NAN, INF, -INF, -1.0), "data.alpha"),
    ("data.beta", (NAN, INF, -INF, -1.0), "data.beta"),
]

SECTIONS = ["", "data", "partition", "model", "algorithm", "server", "topology", "systems", "runtime",
            "stragglers", "evaluation", "output", "runtime.placement"]
KNOWN_KEYS: dict[str, set[str]] = {
    "": {"name", "seed", "rounds", "num_clients", "clients_per_round", "data", "partition", "model", "algorithm",
         "server", "topology", "systems", "runtime", "stragglers", "evaluation", "output", "variants"},
    "data": {"name", "test_fraction", "root", "max_samples", "num_samples", "num_features", "num_classes",
             "sample_scale", "alpha", "beta"},
    "partition": {"name", "alpha", "min_size", "distribution", "sigma", "exponent", "shards_per_client"},
    "model": {"name", "channels", "hidden"},
    "algorithm": {"name", "lr", "batch_size", "local_epochs", "mu"},
    "server": {"name", "lr", "weighting", "beta1", "beta2", "tau", "momentum"},
    "topology": {"name"},
    "systems": {"name", "speed", "latency", "bandwidth_up", "bandwidth_down", "speed_sigma", "bandwidth_sigma"},
    "runtime": {"name", "threads", "devices", "placement", "state_memory", "spill_dir", "memory_budget",
                "chunk_size", "compile", "min_batch"},
    "stragglers": {"fraction", "handling"},
    "evaluation": {"every", "dissimilarity", "clients"},
    "output": {"dir", "plot"},
    "runtime.placement": {"policy", "map"},
}
REQUIRED_TOP = ["rounds", "num_clients", "clients_per_round", "data", "model", "algorithm"]

TAGS = [
    '!!python/object/apply:os.system ["touch pwned"]', '!!python/object/new:os.system ["touch pwned"]',
    "!!python/name:os.system ''", "!!python/module:os ''", "!!set {a: null}", "!!timestamp 2001-12-14",
    "!!binary aGVsbG8=", "!foo bar", "!<tag:example.com,2000:app/x> bar", "!!int abc", "!!float abc",
    "!!bool maybe", "!!omap [a: 1]", "!!pairs [a: 1]",
]
BAD_BYTES = [b"\x80", b"\xff", b"\xc3\x28", b"\xe9", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf",
             b"\xe2\x82"]
VARIANT_NAMES = ["v1", "fast", "mu_0.5"]


@dataclass(frozen=True)
class Raw:
    """YAML text inserted as it stands (tags, anchors, deep nesting)."""

    text: str


DELETE = object()
"""The mutation removes the key."""


# ---------------------------------------------------------------------------------------------- YAML writing


def emit(value: Any) -> str:
    """`value` as one line of flow-style YAML (strings double-quoted; floats readable by YAML 1.1)."""
    if isinstance(value, Raw):
        return value.text
    if value is None or value is DELETE:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(emit(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{emit_key(k)}: {emit(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot emit {value!r}")


def emit_key(key: str) -> str:
    """A quoted key; keys over YAML's 1024-character limit for implicit keys get the explicit `? ` form."""
    return json.dumps(key) if len(key) < 1000 else f"? {json.dumps(key)} "


def emit_document(doc: dict[str, Any]) -> str:
    """A block mapping of flow values (a long top-level key as `? KEY` then `: VALUE` on the next line)."""
    return "".join(f"{emit_key(k)}: {emit(v)}\n" if len(k) < 1000 else f"? {json.dumps(k)}\n: {emit(v)}\n"
                   for k, v in doc.items())


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, for DELETE, remove) the dotted `path` in `doc`, creating mappings on the way."""
    parts = path.split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Mutation:
    """One invalidating change: `value` at `path` (in `base`), and what the error line must name."""

    kind: str
    base: str
    path: str
    value: Any
    expected: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    structural: bool = False
    """Rejected while reading YAML, before fields are known: no `variants.NAME` prefix is required."""


def _word() -> st.SearchStrategy[str]:
    return st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


def _wrong_values(kind: str) -> st.SearchStrategy[Any]:
    mapping = st.dictionaries(_word().map(lambda w: "k" + w), st.integers(0, 9), min_size=1, max_size=3)
    lists = st.lists(st.integers(0, 9), min_size=1, max_size=3)
    floats = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != int(x))
    by_kind = {
        "int": [st.integers(1, 99).map(str), _word(), floats, st.booleans(), lists, mapping],
        "float": [st.floats(0.01, 10).map(lambda x: f"{x:.3f}"), _word(), st.booleans(), lists, mapping],
        "str": [st.integers(-5, 5), floats, st.booleans(), lists, mapping, st.lists(_word(), min_size=1)],
        "bool": [st.integers(0, 2), st.sampled_from(["yes", "true", "on", "maybe"]), floats, lists, mapping],
        "literal": [st.integers(0, 3), st.booleans(), st.lists(_word(), min_size=1), mapping,
                    _word().map(lambda w: "zz" + w)],
        "mapping": [_word(), st.integers(0, 9), lists, st.booleans()],
        "list_int": [st.integers(1, 99).map(str), st.integers(1, 99), mapping, st.lists(_word(), min_size=1),
                     st.lists(floats, min_size=1, max_size=2), st.lists(st.booleans(), min_size=1, max_size=2)],
        "devices": [st.integers(0, 9), mapping, lists, st.lists(st.booleans(), min_size=1, max_size=2)],
        "size": [st.booleans(), lists, mapping, floats],
    }
    return st.one_of(by_kind[kind])


@st.composite
def wrong_type(draw: st.DrawFn) -> Mutation:
    path = draw(st.sampled_from(sorted(FIELDS)))
    base, kind = FIELDS[path]
    return Mutation("wrong type", base, path, draw(_wrong_values(kind)), (path,))


@st.composite
def missing_key(draw: st.DrawFn) -> Mutation:
    path = draw(st.sampled_from(REQUIRED_TOP + [p for p in NAME_FIELDS if p != "name"]))
    return Mutation("missing key", "base", path, DELETE, (path,))


def _typos(known: set[str]) -> st.SearchStrategy[str]:
    """A one-character slip (dropped, doubled or swapped) in a known field name, which is not itself known."""

    @st.composite
    def typo(draw: st.DrawFn) -> str:
        word = draw(st.sampled_from(sorted(known - {"variants"})))
        i = draw(st.integers(0, len(word) - 1))
        how = draw(st.sampled_from(["drop", "double", "swap"]))
        if how == "drop":
            return word[:i] + word[i + 1:]
        if how == "double":
            return word[:i] + word[i] + word[i:]
        return word[:i] + word[i + 1:i + 2] + word[i] + word[i + 2:] if i + 1 < len(word) else word + "s"

    return typo().filter(lambda w: w and w not in known and re.fullmatch(r"[A-Za-z0-9_-]+", w) is not None)


@st.composite
def unknown_key(draw: st.DrawFn) -> Mutation:
    section = draw(st.sampled_from(SECTIONS))
    known = KNOWN_KEYS[section]
    key = draw(st.one_of(_typos(known), _word().map(lambda w: "zz" + w)))
    path = f"{section}.{key}" if section else key
    forbidden = () if not section else ("clients_per_round",) + (("memory_budget",) if "placement" in section else ())
    return Mutation("unknown key", "base", path, draw(st.integers(0, 9)), (path,), forbidden)


@st.composite
def bad_number(draw: st.DrawFn) -> Mutation:
    path, values, expected = draw(st.sampled_from(BAD_NUMBERS))
    value = draw(st.sampled_from(values))
    forbidden: tuple[str, ...] = ()
    if not expected:
        forbidden = ("memory_budget",)
    elif path == "algorithm.mu" and isinstance(value, float) and not math.isfinite(value):
        forbidden = ("smaller algorithm.lr",)
    elif path == "partition.alpha":
        forbidden = ("raise alpha",)
    return Mutation("bad number", FIELDS[path][0], path, value, (expected,) if expected else (), forbidden)


def _any_path() -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(FIELDS))


@st.composite
def deep_nesting(draw: st.DrawFn) -> Mutation:
    path, depth = draw(_any_path()), draw(st.integers(200, 2000))
    text = "[" * depth + "1" + "]" * depth if draw(st.booleans()) else "{a: " * depth + "1" + "}" * depth
    return Mutation("deep nesting", FIELDS[path][0], path, Raw(text), (f"s.yaml|{path}",), structural=True)


@st.composite
def long_string(draw: st.DrawFn) -> Mutation:
    n = draw(st.sampled_from([10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6]))
    text = draw(st.sampled_from("ab_-9")) * n
    where = draw(st.sampled_from(["name", "key"]))
    if where == "name":
        path = draw(st.sampled_from(NAME_FIELDS))
        return Mutation("long string", "base", path, "n" + text, (path,))
    section = draw(st.sampled_from(SECTIONS))
    path = f"{section}.k{text}" if section else f"k{text}"
    return Mutation("long string", "base", path, 1, (f"{section}.",) if section else ())


@st.composite
def alias_bomb_value(draw: st.DrawFn) -> Mutation:
    path, fanout = draw(_any_path()), draw(st.integers(2, 10))
    levels = math.ceil(6 / math.log10(fanout)) + draw(st.integers(0, 2))
    leaf = draw(st.sampled_from(["1", "lol", "{a: 1}"]))
    return Mutation("alias bomb", FIELDS[path][0], path, Raw(alias_bomb(levels, fanout, leaf)),
                    (f"s.yaml|{path}",), structural=True)


@st.composite
def object_tag(draw: st.DrawFn) -> Mutation:
    path = draw(_any_path())
    kind = FIELDS[path][1]
    choices = [t for t in TAGS if not (t.startswith("!!set") and kind in ("list_int", "devices"))]
    return Mutation("tag", FIELDS[path][0], path, Raw(draw(st.sampled_from(choices))), (f"s.yaml|{path}",),
                    structural=True)


MUTATIONS = {
    "wrong type": wrong_type(), "missing key": missing_key(), "unknown key": unknown_key(),
    "bad number": bad_number(), "deep nesting": deep_nesting(), "long string": long_string(),
    "alias bomb": alias_bomb_value(), "tag": object_tag(),
}


KINDS = ["wrong type", "unknown key", "bad number", "missing key", "tag", "long string", "deep nesting",
         "non-UTF-8", "alias bomb"]
"""In this order because hypothesis draws the first more often than the rest."""


@dataclass(frozen=True)
class Generated:
    """A drawn case and how it was made (for grouping failures)."""

    kind: str
    delivery: str
    case: Case


def _splice(data: bytes, start: int, draw: st.DrawFn) -> bytes:
    pos = draw(st.integers(start, len(data)))
    return data[:pos] + draw(st.sampled_from(BAD_BYTES)) + data[pos:]


def _short(value: Any) -> str:
    text = emit(value) if not isinstance(value, Raw) else value.text
    return text if len(text) <= 50 else f"{text[:40]}...({len(text)} chars)"


@st.composite
def hostile_cases(draw: st.DrawFn) -> Generated:
    """A valid base scenario plus exactly one mutation that makes it invalid, delivered one of three ways."""
    cmd = draw(st.sampled_from(["run", "check"]))
    delivery = draw(st.sampled_from(["file", "set", "variant"]))
    argv = [cmd, "s.yaml"] + (["--quiet"] if cmd == "run" else [])
    variant = draw(st.sampled_from(VARIANT_NAMES))
    kind = draw(st.sampled_from(KINDS))
    if kind == "non-UTF-8":
        if delivery == "set":
            path = draw(st.sampled_from(NAME_FIELDS))
            argv += ["--set", f"{path}=x" + draw(st.sampled_from(["\udcff", "\udc80\udc80", "\udce9"]))]
            expected = (path,)
            data = emit_document(BASE).encode()
        else:
            doc = copy.deepcopy(BASE)
            if delivery == "variant":
                doc["variants"] = {variant: {"rounds": 2}}
            data = emit_document(doc).encode()
            data = _splice(data, data.find(b'"variants"') if delivery == "variant" else 0, draw)
            expected = ("s.yaml",)
        description = f"non-UTF-8 bytes via {delivery} ({cmd})"
        case = Case(description, tuple(argv), {"s.yaml": data}, expected, timeout=CASE_TIMEOUT)
        return Generated("non-UTF-8", delivery, case)

    mutation = draw(MUTATIONS[kind])
    if delivery == "set" and mutation.kind == "tag" and FIELDS[mutation.path][1] in STR_KINDS:
        delivery = "file"  # `--set output.dir=!!binary x` could be read as a plain string, which is no mistake
    doc = copy.deepcopy(BASES[mutation.base])
    prefixes: tuple[str, ...] = ()
    if delivery == "file":
        set_path(doc, mutation.path, mutation.value)
    elif delivery == "set":
        argv += ["--set", f"{mutation.path}={emit(mutation.value)}"]
    else:
        doc["variants"] = {variant: {mutation.path: None if mutation.value is DELETE else mutation.value}}
        if not mutation.structural:
            prefixes = (f"variants.{variant}: ",)
    expected = mutation.expected
    if delivery == "set" and mutation.structural:
        expected = (mutation.path,)
    shown = "delete" if mutation.value is DELETE else _short(mutation.value)
    path = mutation.path if len(mutation.path) <= 60 else f"{mutation.path[:50]}...({len(mutation.path)} chars)"
    description = f"{mutation.kind} via {delivery}: {path} = {shown} ({cmd})"
    case = Case(description, tuple(argv), {"s.yaml": emit_document(doc).encode()}, expected, mutation.forbidden,
                prefixes, CASE_TIMEOUT)
    return Generated(mutation.kind, delivery, case)


# ---------------------------------------------------------------------------------------------- the property


def _group(problem: str) -> str:
    return re.sub(r"'[^']*'|\d+(\.\d+)?", "_", problem)[:90]


def test_every_generated_hostile_scenario_is_rejected_cleanly() -> None:
    generated: list[Generated] = []

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(hostile_cases())
    def collect(g: Generated) -> None:
        generated.append(g)

    collect()
    unique: dict[str, Generated] = {}
    for i, g in enumerate(generated):
        unique.setdefault(f"#{i} {g.case.description}", g)
    cases = [Case(name, g.case.argv, g.case.files, g.case.expected, g.case.forbidden, g.case.prefixes,
                  g.case.timeout) for name, g in unique.items()]
    controls = [Case(f"control: check of the {name} scenario", ("check", "s.yaml"),
                     {"s.yaml": emit_document(doc).encode()}) for name, doc in BASES.items()]
    started = time.monotonic()
    results = run_cases(cases + controls, jobs=min(2, os.cpu_count() or 1))
    elapsed = time.monotonic() - started

    for result in results[len(cases):]:
        assert result.exit_code == 0 and not result.traceback, "a base scenario is not valid:\n" + describe(result)
    failures: list[tuple[Generated, CaseResult, list[str]]] = []
    for g, case, result in zip(unique.values(), cases, results[: len(cases)], strict=True):
        problems = rejection_problems(result, case.expected, case.forbidden, case.prefixes)
        if problems:
            failures.append((g, result, problems))
    slowest = max(results[: len(cases)], key=lambda r: r.seconds)
    summary = {
        "hostile_property": {
            "cases": len(cases), "failures": len(failures), "seconds": round(elapsed, 1),
            "slowest": {"description": slowest.description, "seconds": round(slowest.seconds, 2)},
            "kinds": dict(Counter(g.kind for g in unique.values())),
            "failing_kinds": dict(Counter(f"{g.kind} via {g.delivery}" for g, _, _ in failures)),
        }
    }
    print(json.dumps(summary))

    groups: dict[str, list[tuple[CaseResult, list[str]]]] = defaultdict(list)
    for g, result, problems in failures:
        groups[f"{g.kind}: {_group(problems[0])}"].append((result, problems))
    report = [f"{len(failures)} of {len(cases)} generated hostile cases were not cleanly rejected, "
              f"in {len(groups)} groups:"]
    for key, members in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:15]:
        result, problems = members[0]
        report.append(f"\n[{len(members)}x] {key}\n  problems: {'; '.join(problems)}\n"
                      + "\n".join("  " + line for line in describe(result).splitlines()))
    assert not failures, "\n".join(report)
