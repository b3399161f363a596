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

_TAG = "tag:yaml.org,2002:"
ALLOWED_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge"))
_TAG_NAMES = {"binary": "binary data", "timestamp": "a date", "set": "a set", "omap": "an ordered map",
              "pairs": "pairs"}

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 3


def shorten(value: Any) -> str:
    """A repr of `value` bounded in length (about 200 characters whatever its size), for error messages."""
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

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", None)
            return super().compose_node(parent, index)
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
            raise _Refused(f"the document expands to more than {MAX_NODES} nodes (through its aliases)", node)
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


def parse_yaml(text: str, source: str) -> Any:
    """Strict YAML `text` to plain data; `source` names it in errors (a file, or `--set KEY`)."""
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
    check_plain(data, "", source)
    return data


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's plain data: a regular file of at most MAX_FILE_BYTES, UTF-8 text, strict YAML."""
    p = Path(path)
    if p.is_dir():
        raise ScenarioError(f"{p}: is a directory; expected a scenario YAML file")
    if not p.exists():
        raise ScenarioError(f"scenario file not found: {p}")
    if not p.is_file():
        raise ScenarioError(f"{p}: not a regular file; expected a scenario YAML file")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ScenarioError(f"{p}: larger than {MAX_FILE_BYTES >> 20} MiB; a scenario file is a few KiB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    return parse_yaml(text, str(p))


def check_plain(data: Any, path: str, source: str) -> None:
    """Check that `data` is plain scenario data: dicts with string keys, lists, str, int (64-bit), float, bool,
    None; at most MAX_DEPTH deep and MAX_NODES nodes counting shared references each time; no cycles."""
    sizes: dict[int, int] = {}
    pending: set[int] = set()

    def where(p: str) -> str:
        return p or source

    def walk(value: Any, p: str, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise ScenarioError(f"{where(p)}: nested more than {MAX_DEPTH} levels deep")
        if value is None or isinstance(value, (bool, float, str)):
            return 1
        if isinstance(value, int):
            if not -INT64 <= value < INT64:
                raise ScenarioError(f"{where(p)}: {shorten(value)} is too large (integers must fit in 64 bits)")
            return 1
        if not isinstance(value, (Mapping, list, tuple)):
            raise ScenarioError(f"{where(p)}: {type(value).__name__} values are not allowed in a scenario")
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in pending:
            raise ScenarioError(f"{where(p)}: contains itself (a recursive structure)")
        pending.add(key)
        total = 1
        if isinstance(value, Mapping):
            # Inside a variant, fields are named as everywhere else: `variants.NAME: field.path`.
            sep = ": " if depth == 2 and not path and p.startswith("variants.") else "."
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ScenarioError(f"{where(p)}: keys must be strings, got {shorten(k)}")
                total += walk(v, f"{p}{sep}{shorten_key(k)}" if p else shorten_key(k), depth + 1)
        else:
            total += sum(walk(v, f"{p}[{i}]", depth + 1) for i, v in enumerate(value))
        pending.discard(key)
        sizes[key] = total
        if total > MAX_NODES:
            raise ScenarioError(f"{where(p)}: more than {MAX_NODES} values (through shared references)")
        return total

    walk(data, path, 0)


def shorten_key(key: str) -> str:
    """A field name as shown in errors: at most 60 characters."""
    return key if len(key) <= 60 else key[:57] + "..."
