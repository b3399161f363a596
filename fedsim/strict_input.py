"""Untrusted scenario input read strictly and within bounds: UTF-8 YAML, plain data, one-line errors.

Every scenario file, `--set` value and mapping given to `fedsim.run` passes through here before any schema sees
it. YAML is limited to its core types (mappings with string keys, lists, strings, numbers, booleans, null): no
object-constructing or binary tags, no duplicate keys, nesting at most MAX_DEPTH deep, and anchors/aliases allowed
only while the document they expand to stays under MAX_NODES nodes, so alias bombs are refused before anything is
expanded. Integers must fit in 64 bits. Values echoed in errors are shortened (`shorten`).
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fedsim.errors import ScenarioError

MAX_FILE_BYTES = 4 << 20
"""Largest scenario file read (4 MiB; real ones are a few KiB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists (and of dotted `--set` keys)."""
MAX_NODES = 100_000
"""Most nodes a document may hold once its aliases are expanded."""
INT64 = 2**63
MAX_NUMBER_CHARS = 100
"""Longest number read: converting longer ones costs time (quadratic for YAML 1.1's base-60 integers) for values
no scenario field can hold."""

_TAG = "tag:yaml.org,2002:"
NUMBER_TAGS = frozenset(_TAG + t for t in ("int", "float"))
ALLOWED_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge"))
_TAG_NAMES = {"binary": "binary data", "timestamp": "a date", "set": "a set", "omap": "an ordered map",
              "pairs": "pairs"}

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 3


def shorten(value: Any) -> str:
    """A repr of `value` bounded in length (about 200 characters whatever its size), for error messages."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    text = _short.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|\.[0-9]+(?:[eE][-+]?[0-9]+)?)$")
"""Floats such as 1e-3, 1.5e3 or .5e2 that YAML 1.1 (PyYAML) reads as strings, for want of a dot or an exponent
sign, and YAML 1.2 as numbers."""


def _plain_resolvers() -> dict:
    """SafeLoader's implicit resolvers without dates and the YAML 1.1 `=` value (both stay plain strings), and
    with YAML 1.2's dotless exponent floats (`lr: 1e-3` is a number, as users mean it)."""
    resolvers = {first: [(tag, rx) for tag, rx in rules if tag not in (_TAG + "timestamp", _TAG + "value")]
                 for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in "-+.0123456789":
        resolvers[first] = [(_TAG + "float", EXPONENT_FLOAT), *resolvers.get(first, [])]
    return resolvers


class _Refused(Exception):
    """Raised inside the loader; carries the mark of the offending node."""

    def __init__(self, message: str, node: Node | None) -> None:
        super().__init__(message)
        self.node = node


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting, duplicate keys, non-string keys and any tag beyond the core ones."""

    yaml_implicit_resolvers = _plain_resolvers()

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", None)
            if self._nodes > MAX_NODES:
                raise _Refused(f"the document holds more than {MAX_NODES} values", None)
            node = super().compose_node(parent, index)
            if node.tag in NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
                raise _Refused(f"a number written with more than {MAX_NUMBER_CHARS} characters is too large", node)
            return node
        finally:
            self._depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, TypeError, OverflowError):
            tag = node.tag.replace(_TAG, "!!")
            raise _Refused(f"{shorten(node.value)} is not a valid {tag} value", node) from None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == _TAG + "merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise _Refused(f"mapping keys must be strings, got {shorten(key)} (quote it)", key_node)
            if key in seen:
                raise _Refused(f"duplicate key {shorten(key)}", key_node)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(root: Node) -> int:
    """Nodes in the document once every alias is expanded, computed without expanding (memoised per node);
    recursive aliases and disallowed tags are refused on the way."""
    sizes: dict[int, int] = {}
    pending: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in pending:
            raise _Refused("an alias refers to the node that contains it (a recursive document)", node)
        if node.tag not in ALLOWED_TAGS:
            name = node.tag.removeprefix(_TAG)
            what = _TAG_NAMES.get(name, f"the tag {shorten_key(node.tag.replace(_TAG, '!!'))}")
            raise _Refused(f"{what} is not allowed in a scenario (only mappings, lists, strings, numbers, "
                           f"booleans and null); quote the value if it is text", node)
        kind = {_TAG + "map": MappingNode, _TAG + "seq": SequenceNode}.get(node.tag, ScalarNode)
        if not isinstance(node, kind):
            raise _Refused(f"the tag {node.tag.replace(_TAG, '!!')} does not fit this value", node)
        pending.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        pending.discard(key)
        sizes[key] = total
        if total > MAX_NODES:
            raise _Refused(f"the document expands to more than {MAX_NODES} values once its aliases are expanded",
                           node)
        return total

    size(root)
    return sizes[id(root)]


def _where(source: str, node_or_mark: Any) -> str:
    """`source: line N` for a node or mark that knows its line, else just `source`."""
    line = getattr(getattr(node_or_mark, "start_mark", node_or_mark), "line", None)
    return f"{source}: line {line + 1}" if isinstance(line, int) else source


def _yaml_error(source: str, exc: yaml.YAMLError) -> str:
    """One line for any PyYAML error: where it is and what is wrong."""
    if isinstance(exc, yaml.reader.ReaderError):
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        return f"{source}: character {char} at position {exc.position} is not allowed in YAML"
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    problem = ", ".join(str(p) for p in parts if p) or str(exc)
    return f"{_where(source, getattr(exc, 'problem_mark', None))}: not valid YAML: {' '.join(str(problem).split())}"


def parse_yaml(text: str, source: str, path: str = "") -> Any:
    """Strict YAML `text` to plain data; `source` names it in errors (a file, or `--set KEY`), and `path` is the
    field it is the value of (errors inside it name `path.sub.field`)."""
    try:
        loader = StrictLoader(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(_yaml_error(source, exc)) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        data = loader.construct_document(node)
    except _Refused as exc:
        raise ScenarioError(f"{_where(source, exc.node)}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(_yaml_error(source, exc)) from None
    finally:
        loader.dispose()
    return plain_data(data, path, source)


class _ScenarioDumper(yaml.SafeDumper):
    """SafeDumper that quotes strings StrictLoader would read as numbers (such as "1e-3"), so what fedsim writes
    loads back as written."""


_ScenarioDumper.add_implicit_resolver(_TAG + "float", EXPONENT_FLOAT, list("-+.0123456789"))


def dump_yaml(data: Any) -> str:
    """Plain data as YAML text that `parse_yaml` reads back to the same data, keys in their given order."""
    return yaml.dump(data, Dumper=_ScenarioDumper, sort_keys=False)


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's plain data: a regular file of at most MAX_FILE_BYTES, UTF-8 text, strict YAML."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ScenarioError(f"{p}: is a directory; expected a scenario YAML file")
        if not p.exists():
            raise ScenarioError(f"scenario file not found: {p}")
        if not p.is_file():
            raise ScenarioError(f"{p}: not a regular file; expected a scenario YAML file")
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"{shorten_key(str(p))}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ScenarioError(f"{p}: larger than {MAX_FILE_BYTES >> 20} MiB; a scenario file is a few KiB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    return parse_yaml(text, str(p))


def plain_data(data: Any, path: str, source: str) -> Any:
    """`data` checked and copied as plain scenario data: dicts with string keys, lists, str, int (64-bit), float,
    bool, None; at most MAX_DEPTH deep and MAX_NODES values, counting shared references each time; no cycles.
    NumPy scalars become Python numbers and tuples lists, so a mapping built in Python validates as its YAML
    would. `path` is the field `data` is the value of; `source` names it in errors when it is the whole input."""
    copies: dict[int, Any] = {}
    sizes: dict[int, int] = {}
    pending: set[int] = set()

    def where(parts: tuple) -> str:
        if len(parts) > 2 and parts[0] == "variants":  # inside a variant, fields are named as everywhere else
            return f"variants.{parts[1]}: {where(parts[2:])}"
        text = "".join(f"[{p}]" if isinstance(p, int) else f".{shorten_key(p)}" for p in parts).lstrip(".")
        return text or source

    def walk(value: Any, parts: tuple, depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:
            raise ScenarioError(f"{where(parts)}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, np.generic) and isinstance(value, (np.bool_, np.integer, np.floating)):
            value = value.item()
        if value is None or isinstance(value, (bool, float, str)):
            return value, 1
        if isinstance(value, int):
            if not -INT64 <= value < INT64:
                raise ScenarioError(f"{where(parts)}: {shorten(value)} is too large (integers must fit in 64 bits)")
            return value, 1
        if not isinstance(value, (Mapping, list, tuple)):
            raise ScenarioError(f"{where(parts)}: {type(value).__name__} values are not allowed in a scenario")
        key = id(value)
        if key in sizes:
            return copies[key], sizes[key]
        if key in pending:
            raise ScenarioError(f"{where(parts)}: contains itself (a recursive structure)")
        pending.add(key)
        total, out = 1, {} if isinstance(value, Mapping) else []
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for k, v in items:
            if isinstance(value, Mapping) and not isinstance(k, str):
                raise ScenarioError(f"{where(parts)}: keys must be strings, got {shorten(k)}")
            copy, size = walk(v, (*parts, k), depth + 1)
            total += size
            if total > MAX_NODES:
                raise ScenarioError(f"{where(parts)}: more than {MAX_NODES} values (counting shared references)")
            if isinstance(out, dict):
                out[k] = copy
            else:
                out.append(copy)
        pending.discard(key)
        copies[key], sizes[key] = out, total
        return out, total

    return walk(data, tuple(path.split(".")) if path else (), 0)[0]


def shorten_key(key: str) -> str:
    """A field name as shown in errors: at most 60 characters."""
    return key if len(key) <= 60 else key[:57] + "..."
