"""Pytrees and job facts as Flower records: what travels in a Flower Message and what a node keeps in
`context.state`.

A pytree becomes an ArrayRecord with one Array per leaf, named by its path ("delta/linear.weight"), plus its
skeleton (nested keys in order, empty mappings kept) in a ConfigRecord, so trees come back with their exact
structure. Leaves travel as their raw little-endian bytes (stype `torch.raw`), which keeps every torch dtype
(bfloat16 included, which numpy lacks) bit for bit, and makes a record's data bytes exactly the payload's bytes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedsim.params import Pytree

STYPE = "torch.raw"
"""Arrays serialized as the tensor's contiguous bytes in this machine's (little-endian) order."""

SEPARATOR = "/"
SKELETON = ".tree"
"""Suffix of the ConfigRecord that holds a tree's skeleton next to its ArrayRecord."""

if sys.byteorder != "little":
    raise ImportError("fedsim.flower records assume a little-endian machine")


def tensor_array(tensor: torch.Tensor) -> Array:
    """One tensor as a Flower Array: dtype name, shape and raw bytes (a copy, on the CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return Array(dtype=str(tensor.dtype).removeprefix("torch."), shape=tuple(tensor.shape), stype=STYPE, data=data)


def array_tensor(array: Array) -> torch.Tensor:
    """The tensor an Array made by `tensor_array` holds, with its dtype and shape."""
    if array.stype != STYPE:
        raise ValueError(f"array serialized as {array.stype!r}, expected {STYPE!r}")
    dtype = getattr(torch, array.dtype)
    if not array.data:
        return torch.empty(array.shape, dtype=dtype)
    return torch.frombuffer(bytearray(array.data), dtype=dtype).reshape(array.shape)


def flatten(tree: Pytree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Leaves by path, "a/b/c", in the tree's order; a key containing the separator is refused (names must be
    unambiguous)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if SEPARATOR in key:
            raise ValueError(f"pytree key {key!r} contains {SEPARATOR!r}; cannot name it in a record")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + SEPARATOR))
        else:
            out[name] = value
    return out


def skeleton(tree: Pytree) -> dict[str, Any]:
    """The tree's keys, nested, in order, with None for each leaf (empty mappings stay empty mappings)."""
    return {k: skeleton(v) if isinstance(v, Mapping) else None for k, v in tree.items()}


def tree_record(tree: Pytree) -> ArrayRecord:
    """A pytree's leaves as an ArrayRecord named by path."""
    return ArrayRecord({name: tensor_array(t) for name, t in flatten(tree).items()})


def record_tree(record: ArrayRecord, shape: Mapping[str, Any]) -> Pytree:
    """The pytree `tree_record` made, rebuilt along its skeleton `shape`."""
    def build(node: Mapping[str, Any], prefix: str) -> Pytree:
        return {k: build(v, f"{prefix}{k}{SEPARATOR}") if v is not None else array_tensor(record[f"{prefix}{k}"])
                for k, v in node.items()}

    return build(shape, "")


def put_tree(records: RecordDict, name: str, tree: Pytree | None) -> None:
    """Store a pytree under `name` (its arrays) and `name + SKELETON` (its structure); None removes both."""
    if tree is None:
        for key in (name, name + SKELETON):
            if key in records:
                del records[key]
        return
    records[name] = tree_record(tree)
    records[name + SKELETON] = ConfigRecord({"skeleton": json.dumps(skeleton(tree))})


def get_tree(records: RecordDict, name: str) -> Pytree | None:
    """The pytree `put_tree` stored under `name`, or None when there is none."""
    if name not in records:
        return None
    shape = json.loads(str(records.config_records[name + SKELETON]["skeleton"]))
    return record_tree(records.array_records[name], shape)


def data_bytes(record: ArrayRecord) -> int:
    """The bytes of the arrays' data a record carries (no names, no headers): for a payload, exactly the bytes
    the simulator charges for it."""
    return sum(len(array.data) for array in record.values())


def config_record(facts: Mapping[str, int | float | str | bool]) -> ConfigRecord:
    """Job or result facts (ids, counts) as a ConfigRecord."""
    return ConfigRecord(dict(facts))


def wire_contents(records: RecordDict) -> dict[str, bytes]:
    """Every object of a RecordDict as Flower serializes it for the wire (object id -> bytes, headers included)."""
    return {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(records).items()}


def wire_bytes(records: RecordDict) -> int:
    """The bytes Flower sends for a RecordDict's objects (arrays, records and their headers)."""
    return sum(len(content) for content in wire_contents(records).values())


def over_the_wire(records: RecordDict) -> RecordDict:
    """A RecordDict serialized as Flower sends it and rebuilt from those bytes alone (what a receiver gets)."""
    inflated = inflate_object_from_contents(records.object_id, wire_contents(records))
    assert isinstance(inflated, RecordDict)
    return inflated
