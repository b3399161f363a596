"""Scenario files: YAML validated by a schema, `--set a.b=value` overrides, named variants.

Every mistake is caught here, before any work, as one line naming the field and the allowed values. Components
(`data`, `partition`, `task`, `model`, `algorithm`, `server`, `protocol`, `topology`, `systems`, `runtime`) are
`{name: ..., **params}` mappings resolved against their registries; `task`, `server` and `protocol` default to the
data set's and the algorithm's own; an optional `privacy` section wraps the rules in a privacy mechanism, and
`compression` puts codecs on the uplink, downlink and gossip paths. Files and override values are read by
`fedsim.strict_input`: plain YAML only (no code, no object construction), bounded in size, depth and alias
expansion, strict about duplicate keys. A file may define `variants`: named sets of overrides, each run on top of
the base scenario; command-line overrides change the base, and a variant's own settings come last.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

import fedsim.data  # noqa: F401  (fill the data registries)
from fedsim.clients import ALGORITHMS
from fedsim.codecs import CODECS, build_codec
from fedsim.data.base import DATASETS, PARTITIONERS
from fedsim.error_feedback import ERROR_FEEDBACK
from fedsim.errors import FedsimError, ScenarioError
from fedsim.models import MODELS
from fedsim.privacy import PRIVACY, check_privacy
from fedsim.registry import Entry, Params, Registry, validate_params
from fedsim.runtime import RUNTIMES
from fedsim.sampling import active_count
from fedsim.servers import PROTOCOLS, SERVERS
from fedsim.strict_input import MAX_DEPTH, parse_yaml, plain_data, read_yaml_file, shorten, shorten_key
from fedsim.systems import SYSTEMS
from fedsim.tasks import TASKS
from fedsim.topologies import TOPOLOGIES
from fedsim.topologies.mixing import MIXING

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_NAME = 100
"""Longest scenario or variant name (it names the run directory)."""


class StragglerSpec(Params):
    """Clients of a synchronous round that cannot finish their epochs (`fedsim.sampling`): a fraction drawn apart
    from device speed (the FedProx paper's protocol), or those whose job outlasts a deadline (tied to speed)."""

    fraction: float = Field(0.0, ge=0, le=1, description="FedProx's protocol: this share of each round's clients "
                                                        "runs fewer epochs, whatever their speed")
    deadline: float | None = Field(None, gt=0, description="simulated seconds a round lasts at most; a client whose "
                                                           "job would end later runs the steps that fit, or is "
                                                           "dropped (`handling`)")
    handling: Literal["auto", "drop", "keep"] = "auto"


class EvaluationSpec(Params):
    """When and where the global model is evaluated, and the target whose first crossing the summary reports
    (simulated seconds, server steps and client updates to reach it)."""

    every: int = Field(1, ge=1, description="evaluate before every n-th round, and after the last")
    dissimilarity: bool = False
    gradient_norm: bool = Field(False, description="report grad_norm: the norm of the training objective's gradient "
                                                   "over the evaluated clients (sample-weighted)")
    clients: int | None = Field(None, ge=1, description="evaluate on a fixed sample of this many clients")
    target: float | None = Field(None, gt=0, le=1, description="test accuracy to reach (tasks with accuracy)")
    target_loss: float | None = Field(None, ge=0, description="test loss to reach (instead of target)")

    @field_validator("target_loss", mode="after")
    @classmethod
    def _one_target(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("target") is not None:
            raise ValueError("give target (accuracy) or target_loss (test loss), not both")
        return value


class CompressionSpec(Params):
    """Codecs on the message paths (`fedsim.codecs`): `{name: topk, ratio: 0.1, error_feedback: true}`; identity
    where not given. Client/server protocols have an uplink and a downlink, gossip protocols a gossip path (node
    to node); a codec on a path the protocol lacks is refused."""

    uplink: dict[str, Any] | None = None
    downlink: dict[str, Any] | None = None
    gossip: dict[str, Any] | None = None


MESSAGE_PATHS = ("uplink", "downlink", "gossip")
CLIENT_SERVER_PATHS = ("uplink", "downlink")


class CheckpointSpec(Params):
    """When a run saves a checkpoint in its run directory (`fedsim run --resume RUN_DIR` continues from the last
    good one). A run also saves one when it receives SIGINT or SIGTERM, then stops."""

    every: int | None = Field(None, ge=1, description="server steps between checkpoints")
    sim_seconds: float | None = Field(None, gt=0, description="simulated seconds between checkpoints")
    wall_seconds: float = Field(300.0, ge=0, description="with neither set, real seconds between checkpoints (so "
                                                         "short runs save none); 0: none")


class OutputSpec(Params):
    """Where a run writes and whether it draws its pictures (plot.png, timeline.png, async.png)."""

    dir: str | None = Field(None, min_length=1, description="run directory (default: runs/<name>)")
    plot: bool = True
    timeline_seconds: float | None = Field(None, gt=0, description="simulated seconds timeline.png shows (default: "
                                                                   "10% of the run, at least 3 median jobs)")


class ScenarioSchema(Params):
    """The static part of a scenario; components stay mappings until `resolve` checks them."""

    name: str = Field("scenario", pattern=NAME_PATTERN, max_length=MAX_NAME)
    seed: int = Field(0, ge=0)
    rounds: int | None = Field(None, ge=1, description="budget in server steps (rounds, server updates)")
    time_budget: float | None = Field(None, gt=0, description="budget in simulated seconds")
    num_clients: int = Field(ge=1)
    clients_per_round: int | None = Field(None, ge=1)
    data: dict[str, Any]
    partition: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    model: dict[str, Any]
    algorithm: dict[str, Any]
    server: dict[str, Any] | None = None
    protocol: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    compression: CompressionSpec = CompressionSpec()
    topology: dict[str, Any] = Field(default_factory=lambda: {"name": "star"})
    systems: dict[str, Any] = Field(default_factory=lambda: {"name": "homogeneous"})
    runtime: dict[str, Any] = Field(default_factory=lambda: {"name": "vectorized"})
    stragglers: StragglerSpec = StragglerSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    output: OutputSpec = OutputSpec()


@dataclass(frozen=True)
class Component:
    """A resolved registry entry and its validated parameters."""

    entry: Entry
    params: Params

    @property
    def name(self) -> str:
        return self.entry.name

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.entry.name, **self.params.model_dump(mode="json")}


COMPONENTS: dict[str, Registry] = {
    "data": DATASETS, "partition": PARTITIONERS, "task": TASKS, "model": MODELS, "algorithm": ALGORITHMS,
    "server": SERVERS, "protocol": PROTOCOLS, "topology": TOPOLOGIES, "systems": SYSTEMS, "runtime": RUNTIMES,
}


PLUGINS: dict[str, Registry] = {**COMPONENTS, "privacy": PRIVACY, "codec": CODECS,
                                 "error_feedback": ERROR_FEEDBACK, "mixing": MIXING}
"""Every registry a scenario can name something from (what `fedsim list` shows)."""


@dataclass(frozen=True)
class ResolvedScenario:
    """One runnable scenario (a variant): the validated schema plus every resolved component."""

    variant: str
    spec: ScenarioSchema
    components: dict[str, Component]
    declared_variant: bool = False

    @property
    def declared_name(self) -> str | None:
        """The variant's name when the scenario file declares variants, else None (for `naming_variant`)."""
        return self.variant if self.declared_variant else None

    @property
    def straggler_handling(self) -> str:
        return straggler_handling(self.spec, self.components)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved scenario (every default filled in), loadable again by `load_scenarios`."""
        out = self.spec.model_dump(mode="json")
        out.update({k: c.as_dict() for k, c in self.components.items()})
        return out


@contextmanager
def naming_variant(variant: str | None) -> Iterator[None]:
    """Errors raised inside start with `variants.NAME: ` when `variant` names a declared variant, so every error
    about a variant's fields, memory, files or data says which variant it is."""
    try:
        yield
    except FedsimError as exc:
        if variant is None:
            raise
        raise type(exc)(f"variants.{variant}: {exc}") from None


def read_scenario_file(path: str | Path) -> dict[str, Any]:
    """Parse a scenario YAML file into a mapping, with one-line errors for missing or malformed files."""
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ScenarioError(f"{path}: a scenario must be a mapping of fields, got {got}")
    return raw


KEY_PART = re.compile(r"[A-Za-z0-9_-]+")


def check_dotted_key(dotted: str, source: str) -> list[str]:
    """The parts of a dotted override key, each a field name; `source` names the override in errors."""
    parts = dotted.split(".")
    if len(parts) > MAX_DEPTH:
        raise ScenarioError(f"{source}: the key has {len(parts)} parts; at most {MAX_DEPTH} levels are allowed")
    bad = next((p for p in parts if not KEY_PART.fullmatch(p)), None)
    if bad is not None:
        what = "an empty field name" if bad == "" else f"the field name {shorten(bad)}"
        raise ScenarioError(f"{source}: {what} in {shorten_key(dotted)!r}; a key is field names joined by '.', "
                            f"each of letters, digits, '_' and '-'")
    return parts


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as strict YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError(f"--set {shorten_key(text)}: expected KEY=VALUE, e.g. algorithm.mu=0.1")
    check_dotted_key(key, f"--set {shorten_key(key)}")
    return key, parse_yaml(value, f"--set {shorten_key(key)}", key)


def parse_overrides(texts: Sequence[str]) -> dict[str, Any]:
    """Every `--set` of a command line; setting one key twice is an error, not a silent choice."""
    out: dict[str, Any] = {}
    for text in texts:
        key, value = parse_override(text)
        if key in out:
            raise ScenarioError(f"--set {shorten_key(key)}: given twice")
        out[key] = value
    return out


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `raw` with each dotted key set; a mapping value replaces the whole subtree, and `null`
    removes the key (so its default applies, or a variant can drop a field another algorithm lacks)."""
    out = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        parts = check_dotted_key(dotted, shorten_key(dotted))
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ScenarioError(f"{shorten_key(dotted)}: {'.'.join(parts[: i + 1])} is not a mapping "
                                    f"(it is {shorten(child)})")
            node = child
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = copy.deepcopy(value)
    return plain_data(out, "", "scenario")


def load_scenarios(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                   variants: Sequence[str] | None = None) -> tuple[list[ResolvedScenario], list[str]]:
    """Read, override and resolve a scenario into its runnable variants; also returns notices for the user."""
    if isinstance(source, (str, Path)):
        raw = read_scenario_file(source)
    else:
        raw = plain_data(source, "", "scenario")
        if not isinstance(raw, dict):
            raise ScenarioError(f"scenario: a scenario must be a mapping of fields, got {shorten(raw)}")
    bad_key = next((k for k in overrides or {} if not isinstance(k, str)), None)
    if bad_key is not None:
        raise ScenarioError(f"overrides: keys must be dotted field names (strings), got {shorten(bad_key)}")
    overrides = {key: plain_data(value, key, key) for key, value in (overrides or {}).items()}
    base = apply_overrides(raw, overrides)
    declared = base.pop("variants", None) or {}
    if not isinstance(declared, dict):
        raise ScenarioError(f"variants: expected a mapping of variant name -> mapping of overrides, got "
                            f"{shorten(declared)}")
    for name, delta in declared.items():
        if not re.match(NAME_PATTERN, name) or len(name) > MAX_NAME:
            raise ScenarioError(f"variants.{shorten_key(name)}: a variant name is up to {MAX_NAME} letters, "
                                f"digits, '_', '.' or '-', starting with a letter or digit")
        if not isinstance(delta, dict):
            raise ScenarioError(f"variants.{name}: expected a mapping of overrides, got {shorten(delta)}")
    if variants:
        unknown = [v for v in variants if v not in declared]
        if unknown:
            allowed = ", ".join(declared) or "(none)"
            raise ScenarioError(f"--variant {shorten_key(unknown[0])}: unknown; allowed: {allowed}")
        declared = {v: declared[v] for v in variants}
    if not declared:
        return [resolve(base, variant=None)], []
    notices = []
    resolved = []
    for name, delta in declared.items():
        for key in overrides:
            if key in delta:
                notices.append(f"variant {name} sets {key}={shorten(delta[key])} itself; --set {key} does not "
                               f"apply to it")
        with naming_variant(name):
            merged = apply_overrides(base, delta)
        resolved.append(resolve(merged, variant=name))
    return resolved, notices


def resolve(raw: Mapping[str, Any], variant: str | None) -> ResolvedScenario:
    """Validate one scenario mapping and resolve its components; errors name the field."""
    with naming_variant(variant):
        spec = validate_params(ScenarioSchema, dict(raw), "", "scenario")
        assert isinstance(spec, ScenarioSchema)
        components = _resolve_components(spec)
        _check_consistency(spec, components)
    return ResolvedScenario(variant or spec.name, spec, components, declared_variant=variant is not None)


def _resolve_components(spec: ScenarioSchema) -> dict[str, Component]:
    specs = {key: getattr(spec, key) for key in COMPONENTS}
    data_entry, _ = DATASETS.resolve(specs["data"], "data")
    if specs["partition"] is None:
        specs["partition"] = {"name": "natural" if data_entry.meta.get("natural") else "iid"}
    if specs["task"] is None:
        specs["task"] = {"name": data_entry.meta.get("task", "classification")}
    if specs["server"] is None or specs["protocol"] is None:
        algo, algo_params = ALGORITHMS.resolve(specs["algorithm"], "algorithm")
        server = algo.meta["server"]
        specs["server"] = specs["server"] or {"name": server(algo_params) if callable(server) else server}
        specs["protocol"] = specs["protocol"] or {"name": algo.meta.get("protocol", "synchronous")}
    out = {}
    for key, registry in COMPONENTS.items():
        entry, params = registry.resolve(specs[key], key)
        out[key] = Component(entry, params)
    if spec.privacy is not None:
        entry, params = PRIVACY.resolve(spec.privacy, "privacy")
        out["privacy"] = Component(entry, params)
    return out


def straggler_handling(spec: ScenarioSchema, components: dict[str, Component]) -> str:
    """"drop" or "keep": the scenario's choice, or the algorithm's own when it says "auto"."""
    handling = spec.stragglers.handling
    return components["algorithm"].entry.meta["stragglers"] if handling == "auto" else handling


def _check_message_keys(components: dict[str, Component]) -> None:
    """The algorithm reads what the server broadcasts, the server reads what the algorithm sends, and the protocol
    can carry that message: each side's keys are declared where it is registered (`receives`/`sends` on an
    algorithm, `broadcasts`/`aggregates` on a server, `carries` on a protocol; "params"/"delta" by default)."""
    algorithm, server, protocol = components["algorithm"], components["server"], components["protocol"]
    sends = set(algorithm.entry.meta.get("sends", ("delta",)))
    carries = protocol.entry.meta.get("carries")
    if carries is not None and not sends <= set(carries):
        raise ScenarioError(f"algorithm.name: protocol {protocol.name!r} carries only {sorted(carries)} from a "
                            f"client; {algorithm.name!r} sends {sorted(sends)}")
    if protocol.entry.meta.get("peer_to_peer"):
        return
    broadcasts = set(server.entry.meta.get("broadcasts", ("params",)))
    missing = sorted(set(algorithm.entry.meta.get("receives", ("params",))) - broadcasts)
    if missing:
        fitting = [e.name for e in SERVERS if set(missing) <= set(e.meta.get("broadcasts", ("params",)))]
        raise ScenarioError(f"server.name: algorithm {algorithm.name!r} needs {missing} from the server, which "
                            f"{server.name!r} does not broadcast; use {' or '.join(fitting) or 'another algorithm'}")
    unsent = sorted(set(server.entry.meta.get("aggregates", ("delta",))) - sends)
    if unsent:
        raise ScenarioError(f"server.name: server {server.name!r} aggregates {unsent}, which algorithm "
                            f"{algorithm.name!r} does not send")


def _check_client_models(spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """A protocol honours the straggler models and the systems profile's availability and dropouts its registration
    lists (`stragglers`, `availability`); any other is refused rather than silently ignored."""
    protocol = components["protocol"]
    stragglers = spec.stragglers
    for model, given in (("fraction", stragglers.fraction > 0), ("deadline", stragglers.deadline is not None)):
        if given and model not in protocol.entry.meta.get("stragglers", ()):
            fitting = [e.name for e in PROTOCOLS if model in e.meta.get("stragglers", ())]
            raise ScenarioError(f"stragglers.{model}: protocol {protocol.name!r} has no such straggler model (its "
                                f"slow clients come from the systems profile's speeds); use {' or '.join(fitting)}, "
                                f"or leave it out")
    systems = components["systems"].params
    for field, given in (("availability", systems.availability.kind != "always"), ("dropout", systems.dropout > 0)):
        if given and not protocol.entry.meta.get("availability"):
            fitting = [e.name for e in PROTOCOLS if e.meta.get("availability")]
            raise ScenarioError(f"systems.{field}: protocol {protocol.name!r} keeps its clients online for the whole "
                                f"run; use {', '.join(fitting)} to model clients going offline or dropping out")


def _check_consistency(spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Checks that span several fields."""
    if spec.rounds is None and spec.time_budget is None:
        raise ScenarioError("rounds: a run needs a budget: rounds (server steps), time_budget (simulated seconds), "
                            "or both")
    protocol = components["protocol"]
    paths = protocol.entry.meta.get("paths", CLIENT_SERVER_PATHS)
    for path in MESSAGE_PATHS:
        codec = getattr(spec.compression, path)
        build_codec(codec, f"compression.{path}")
        if codec is not None and path not in paths:
            has = f"its paths are {', '.join(paths)}" if paths else "it sends nothing through a codec"
            raise ScenarioError(f"compression.{path}: protocol {protocol.name!r} has no {path} path ({has}); "
                                f"remove it")
    missing = next((f for f in protocol.entry.meta.get("needs", ()) if getattr(spec, f) is None), None)
    if missing is not None:
        raise ScenarioError(f"{missing}: protocol {protocol.name!r} needs it; set it")
    peer_to_peer = bool(protocol.entry.meta.get("peer_to_peer"))
    if bool(components["topology"].entry.meta.get("client_server")) == peer_to_peer:
        fitting = [e.name for e in TOPOLOGIES if bool(e.meta.get("client_server")) != peer_to_peer]
        kind = "a peer-to-peer graph" if peer_to_peer else "a client/server star"
        raise ScenarioError(
            f"topology.name: protocol {protocol.name!r} runs on {kind}, which {components['topology'].name!r} is "
            f"not; allowed: {', '.join(fitting)}"
        )
    _check_message_keys(components)
    if "privacy" in components:
        check_privacy(components, spec)
    for kind in ("protocol", "algorithm", "systems"):  # own cross-field checks (a protocol's settings, a trace)
        check = components[kind].entry.meta.get("check")
        if check is not None:
            check(components[kind].params, spec, components)
    data_task = components["data"].entry.meta.get("task", "classification")
    if components["task"].name != data_task:
        raise ScenarioError(f"task.name: {components['task'].name!r} does not fit data set "
                            f"{components['data'].name!r}, whose targets are for {data_task!r}")
    task = components["task"]
    if spec.evaluation.target is not None and "accuracy" not in task.entry.obj.metrics:
        raise ScenarioError(f"evaluation.target: task {task.name!r} reports no accuracy; set evaluation.target_loss "
                            f"(a test loss to reach) instead")
    if spec.clients_per_round is not None and spec.clients_per_round > spec.num_clients:
        raise ScenarioError(
            f"clients_per_round: {spec.clients_per_round} is more than num_clients ({spec.num_clients})"
        )
    if components["partition"].entry.meta.get("natural") and not components["data"].entry.meta.get("natural"):
        natural = [e.name for e in DATASETS if e.meta.get("natural")]
        raise ScenarioError(
            f"partition.name: 'natural' needs a data set with its own clients ({', '.join(natural)}); "
            f"{components['data'].name!r} has none"
        )
    if components["data"].entry.meta.get("lazy") and not components["partition"].entry.meta.get("natural"):
        raise ScenarioError(
            f"partition.name: {components['data'].name!r} generates its clients on demand and cannot be "
            f"re-partitioned; use partition 'natural'"
        )
    if spec.stragglers.deadline is not None and spec.stragglers.fraction > 0:
        raise ScenarioError("stragglers.fraction, stragglers.deadline: choose one straggler model, the FedProx "
                            "paper's fraction or a deadline in simulated seconds")
    _check_client_models(spec, components)
    active = active_count(spec.clients_per_round or spec.num_clients, spec.stragglers.fraction)
    if straggler_handling(spec, components) == "drop" and active == 0:
        raise ScenarioError(
            f"stragglers.fraction: {spec.stragglers.fraction} leaves no client of {spec.clients_per_round} per "
            f"round able to finish, and stragglers are dropped, so nothing would be aggregated"
        )
