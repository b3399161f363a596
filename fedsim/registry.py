"""One registry per kind of plugin: each entry is a plain callable plus a pydantic model of its parameters.

Scenarios name entries (`algorithm: {name: fedprox, mu: 1}`); the registry resolves the name and validates the
remaining keys against the entry's parameter model, so every plugin gets the same checks and error messages.
"""

from __future__ import annotations

import difflib
import importlib
import math
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fedsim.errors import ScenarioError
from fedsim.strict_input import shorten, shorten_key

T = TypeVar("T")


FLOAT_MAX = 3.4e38
"""Largest magnitude of a float parameter: rules compute in float32, where larger values overflow."""


class Params(BaseModel):
    """Base of every plugin's parameter model: frozen, unknown keys are errors, types are strict (no "1" for 1,
    no true for 1.0) and floats finite, also in float32; a field that means to allow inf says so with
    `Field(allow_inf_nan=True)`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _float32_range(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and math.isfinite(v) and abs(v) > FLOAT_MAX for v in values):
            raise ValueError(f"too large: floats must be at most {FLOAT_MAX:g} in magnitude")
        return value


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
        if not isinstance(name, str):
            raise ScenarioError(f"{field_path}: expected a name (a string), got {shorten(name)}; "
                                f"allowed: {', '.join(self.names())}")
        if name not in self._entries:
            raise ScenarioError(
                f"{field_path}: unknown {self.kind} {shorten(name)}; allowed: {', '.join(self.names())}"
            )
        return self._entries[name]

    def resolve(self, spec: dict[str, Any], field_path: str) -> tuple[Entry[T], Params]:
        """Validate a `{name: ..., **params}` mapping; errors name `field_path.<key>`."""
        if not isinstance(spec, dict):
            raise ScenarioError(f"{field_path}: expected a mapping with a 'name' key, got {shorten(spec)}")
        if "name" not in spec:
            glued = next((k for k in spec if ":" in k), None)
            hint = f" (in {shorten(glued)}, put a space after the colon)" if glued else ""
            raise ScenarioError(f"{field_path}.name: missing{hint}; allowed: {', '.join(self.names())}")
        rest = {k: v for k, v in spec.items() if k != "name"}
        entry = self.get(spec["name"], f"{field_path}.name")
        return entry, validate_params(entry.params, rest, field_path, f"{self.kind} {entry.name!r}")


def validate_params(model: type[Params], values: dict[str, Any], field_path: str, owner: str) -> Params:
    """Validate `values` against `model`, turning the first pydantic error into a one-line ScenarioError."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ScenarioError(format_validation_error(exc, model, field_path, owner)) from None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly, optionally, or in a union), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _locate(model: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel]]:
    """The field path of an error location (without pydantic's union-member tags such as 'int' or 'str') and
    the model holding its last field, whose fields an unknown-key error lists."""
    path: list[str] = []
    current: type[BaseModel] | None = model
    holder = model
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path.append(f"[{part}]")
        elif current is not None and (part in current.model_fields or i == len(loc) - 1):
            path.append(shorten_key(part))
            holder = current
            field = current.model_fields.get(part)
            current = _submodel(field.annotation) if field is not None else None
    return path, holder


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str, owner: str) -> str:
    """One line naming the field, what is wrong and, for unknown keys, the allowed ones (with a suggestion).
    Unknown keys are reported before missing ones: a misspelled field is both, and its name is the clue."""
    errors = sorted(exc.errors(), key=lambda e: {"extra_forbidden": 0, "missing": 2}.get(e["type"], 1))
    err = errors[0]
    parts, holder = _locate(model, tuple(err["loc"]))
    path = ".".join([prefix] * bool(prefix) + parts).replace(".[", "[")
    if err["type"] == "extra_forbidden":
        if len(parts) > 1:
            owner = path.rsplit(".", 1)[0]
        allowed = list(holder.model_fields)
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{path}: unknown field for {owner}{hint}; allowed: {', '.join(allowed) or '(none)'}"
    if err["type"] == "missing":
        return f"{path}: missing (required by {owner})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{path}: {message} (got {shorten(err.get('input'))})"


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a plugin package, so that dropping a file into it is all a new plugin needs."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")
