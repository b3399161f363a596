"""One registry per kind of plugin: each entry is a plain callable plus a pydantic model of its parameters.

Scenarios name entries (`algorithm: {name: fedprox, mu: 1}`); the registry resolves the name and validates the
remaining keys against the entry's parameter model, so every plugin gets the same checks and error messages.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fedsim.errors import ScenarioError

T = TypeVar("T")


class Params(BaseModel):
    """Base of every plugin's parameter model: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    """For entries that take no parameters."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered plugin: its name, the object itself, its parameter model and free-form metadata."""

    name: str
    obj: T
    params: type[Params]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        doc = getattr(self.obj, "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """Named plugins of one kind (data sets, partitioners, models, algorithms, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, params: type[Params] = NoParams, **meta: Any) -> Callable[[T], T]:
        """Decorator: register `obj` under `name`; a name can be registered once."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, params, dict(meta))
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return (self._entries[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, field_path: str = "name") -> Entry[T]:
        """The entry called `name`, or a ScenarioError naming the field and the allowed names."""
        if name not in self._entries:
            raise ScenarioError(
                f"{field_path}: unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            )
        return self._entries[name]

    def resolve(self, spec: dict[str, Any], field_path: str) -> tuple[Entry[T], Params]:
        """Validate a `{name: ..., **params}` mapping; errors name `field_path.<key>`."""
        if not isinstance(spec, dict):
            raise ScenarioError(f"{field_path}: expected a mapping with a 'name' key, got {spec!r}")
        if "name" not in spec:
            raise ScenarioError(f"{field_path}.name: missing; allowed: {', '.join(self.names())}")
        rest = {k: v for k, v in spec.items() if k != "name"}
        entry = self.get(spec["name"], f"{field_path}.name")
        return entry, validate_params(entry.params, rest, field_path, f"{self.kind} {entry.name!r}")


def validate_params(model: type[Params], values: dict[str, Any], field_path: str, owner: str) -> Params:
    """Validate `values` against `model`, turning the first pydantic error into a one-line ScenarioError."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ScenarioError(format_validation_error(exc, model, field_path, owner)) from None


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str, owner: str) -> str:
    """One line naming the field, what is wrong and, for unknown keys, the allowed ones."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields) or "(none)"
        return f"{path}: unknown field for {owner}; allowed: {allowed}"
    if err["type"] == "missing":
        return f"{path}: missing (required by {owner})"
    return f"{path}: {err['msg']} (got {err.get('input')!r})"


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a plugin package, so that dropping a file into it is all a new plugin needs."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")
