"""Scenario files: YAML validated by a schema, `--set a.b=value` overrides, named variants.

Every mistake is caught here, before any work, as one line naming the field and the allowed values. Components
(`data`, `partition`, `model`, `algorithm`, `server`, `topology`, `systems`, `runtime`) are `{name: ..., **params}`
mappings resolved against their registries. Only plain YAML is read (`yaml.safe_load`): no code, no object
construction. A file may define `variants`: named sets of overrides, each run on top of the base scenario;
command-line overrides change the base, and a variant's own settings come last.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

import fedsim.data  # noqa: F401  (fill the data registries)
from fedsim.clients import ALGORITHMS
from fedsim.data.base import DATASETS, PARTITIONERS
from fedsim.errors import ScenarioError
from fedsim.models import MODELS
from fedsim.registry import Entry, Params, Registry, validate_params
from fedsim.runtime import RUNTIMES
from fedsim.sampling import active_count
from fedsim.servers import SERVERS
from fedsim.systems import SYSTEMS
from fedsim.topologies import TOPOLOGIES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StragglerSpec(Params):
    """FedProx's systems heterogeneity: a fraction of each round's clients cannot finish their epochs."""

    fraction: float = Field(0.0, ge=0, le=1)
    handling: Literal["auto", "drop", "keep"] = "auto"


class EvaluationSpec(Params):
    every: int = Field(1, ge=1, description="evaluate before every n-th round, and after the last")
    dissimilarity: bool = False
    clients: int | None = Field(None, ge=1, description="evaluate on a fixed sample of this many clients")


class OutputSpec(Params):
    dir: str | None = None
    plot: bool = True


class ScenarioSchema(Params):
    """The static part of a scenario; components stay mappings until `resolve` checks them."""

    name: str = Field("scenario", pattern=NAME_PATTERN)
    seed: int = Field(0, ge=0)
    rounds: int = Field(ge=1)
    num_clients: int = Field(ge=1)
    clients_per_round: int = Field(ge=1)
    data: dict[str, Any]
    partition: dict[str, Any] | None = None
    model: dict[str, Any]
    algorithm: dict[str, Any]
    server: dict[str, Any] | None = None
    topology: dict[str, Any] = Field(default_factory=lambda: {"name": "star"})
    systems: dict[str, Any] = Field(default_factory=lambda: {"name": "homogeneous"})
    runtime: dict[str, Any] = Field(default_factory=lambda: {"name": "vectorized"})
    stragglers: StragglerSpec = StragglerSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
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
    "data": DATASETS, "partition": PARTITIONERS, "model": MODELS, "algorithm": ALGORITHMS, "server": SERVERS,
    "topology": TOPOLOGIES, "systems": SYSTEMS, "runtime": RUNTIMES,
}


@dataclass(frozen=True)
class ResolvedScenario:
    """One runnable scenario (a variant): the validated schema plus every resolved component."""

    variant: str
    spec: ScenarioSchema
    components: dict[str, Component]

    @property
    def straggler_handling(self) -> str:
        return straggler_handling(self.spec, self.components)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved scenario (every default filled in), loadable again by `load_scenarios`."""
        out = self.spec.model_dump(mode="json")
        out.update({k: c.as_dict() for k, c in self.components.items()})
        return out


def read_scenario_file(path: str | Path) -> dict[str, Any]:
    """Parse a scenario YAML file into a mapping, with one-line errors for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"scenario file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ScenarioError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{p}: a scenario must be a mapping of fields, got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ScenarioError(f"--set {text}: expected KEY=VALUE, e.g. algorithm.mu=0.1")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `raw` with each dotted key set; a mapping value replaces the whole subtree, and `null`
    removes the key (so its default applies, or a variant can drop a field another algorithm lacks)."""
    out = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ScenarioError(f"{dotted}: {'.'.join(parts[: i + 1])} is not a mapping (it is {child!r})")
            node = child
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = copy.deepcopy(value)
    return out


def load_scenarios(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                   variants: Sequence[str] | None = None) -> tuple[list[ResolvedScenario], list[str]]:
    """Read, override and resolve a scenario into its runnable variants; also returns notices for the user."""
    raw = read_scenario_file(source) if isinstance(source, (str, Path)) else dict(source)
    overrides = dict(overrides or {})
    base = apply_overrides(raw, overrides)
    declared = base.pop("variants", None) or {}
    if not isinstance(declared, dict) or not all(isinstance(v, dict) for v in declared.values()):
        raise ScenarioError("variants: expected a mapping of variant name -> mapping of overrides")
    for name in declared:
        if not re.match(NAME_PATTERN, str(name)):
            raise ScenarioError(f"variants.{name}: variant names may use letters, digits, '_', '.', '-'")
    if variants:
        unknown = [v for v in variants if v not in declared]
        if unknown:
            raise ScenarioError(f"--variant {unknown[0]}: unknown; allowed: {', '.join(declared) or '(none)'}")
        declared = {v: declared[v] for v in variants}
    if not declared:
        return [resolve(base, variant=None)], []
    notices = []
    resolved = []
    for name, delta in declared.items():
        for key in overrides:
            if key in delta:
                notices.append(f"variant {name} sets {key}={delta[key]!r} itself; --set {key} does not apply to it")
        resolved.append(resolve(apply_overrides(base, delta), variant=name))
    return resolved, notices


def resolve(raw: Mapping[str, Any], variant: str | None) -> ResolvedScenario:
    """Validate one scenario mapping and resolve its components; errors name the field."""
    prefix = f"variants.{variant}: " if variant else ""
    try:
        spec = validate_params(ScenarioSchema, dict(raw), "", "scenario")
        assert isinstance(spec, ScenarioSchema)
        components = _resolve_components(spec)
        _check_consistency(spec, components)
    except ScenarioError as exc:
        raise ScenarioError(prefix + str(exc)) from None
    return ResolvedScenario(variant or spec.name, spec, components)


def _resolve_components(spec: ScenarioSchema) -> dict[str, Component]:
    specs = {key: getattr(spec, key) for key in COMPONENTS}
    data_entry = DATASETS.get(specs["data"].get("name", "") if isinstance(specs["data"], dict) else "", "data.name")
    if specs["partition"] is None:
        specs["partition"] = {"name": "natural" if data_entry.meta.get("natural") else "iid"}
    if specs["server"] is None:
        algo = ALGORITHMS.get(specs["algorithm"].get("name", ""), "algorithm.name")
        specs["server"] = {"name": algo.meta["server"]}
    out = {}
    for key, registry in COMPONENTS.items():
        entry, params = registry.resolve(specs[key], key)
        out[key] = Component(entry, params)
    return out


def straggler_handling(spec: ScenarioSchema, components: dict[str, Component]) -> str:
    """"drop" or "keep": the scenario's choice, or the algorithm's own when it says "auto"."""
    handling = spec.stragglers.handling
    return components["algorithm"].entry.meta["stragglers"] if handling == "auto" else handling


def _check_consistency(spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Checks that span several fields."""
    if spec.clients_per_round > spec.num_clients:
        raise ScenarioError(
            f"clients_per_round: {spec.clients_per_round} is more than num_clients ({spec.num_clients})"
        )
    if not components["topology"].entry.meta.get("client_server"):
        star = [e.name for e in TOPOLOGIES if e.meta.get("client_server")]
        raise ScenarioError(
            f"topology.name: {components['topology'].name!r} is a peer-to-peer graph; client/server algorithms "
            f"run on: {', '.join(star)}"
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
    active = active_count(spec.clients_per_round, spec.stragglers.fraction)
    if straggler_handling(spec, components) == "drop" and active == 0:
        raise ScenarioError(
            f"stragglers.fraction: {spec.stragglers.fraction} leaves no client of {spec.clients_per_round} per "
            f"round able to finish, and stragglers are dropped, so nothing would be aggregated"
        )
