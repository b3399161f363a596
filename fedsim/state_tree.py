"""Run state as plain data, without pickle: a tree of dicts, lists, tuples, numbers, strings, tensors, numpy arrays
and the few record types registered in STATE_TYPES (jobs, results, events, job phases) becomes a JSON-able
skeleton plus a flat name -> tensor map (what safetensors stores), and back.

Objects that appear twice in a tree (a broadcast message shared by several jobs, a tensor held by two holders)
are stored once and come back as one object, so code that batches by identity behaves as before. Floats
round-trip exactly (JSON writes Python floats by repr; nan and infinities are tagged); numpy scalars keep their
dtype; tensors keep dtype and device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from fedsim.clock import Event
from fedsim.runtime import Job, JobResult
from fedsim.systems import JobPhases

STATE_TYPES: dict[str, type] = {cls.__name__: cls for cls in (Job, JobResult, Event, JobPhases)}
"""The record types a state tree may hold, by name: only these are rebuilt from a checkpoint."""


class StateTreeError(ValueError):
    """A state tree holds something that cannot be stored, or a stored skeleton is malformed."""


def flatten_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The tree's JSON-able skeleton and its tensors (CPU, contiguous, each its own storage), by name."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, int] = {}
    alive: list[Any] = []  # keeps every visited object alive so ids stay unique while flattening

    def shared(obj: Any, encode: Any) -> Any:
        ref = seen.get(id(obj))
        if ref is not None:
            return {"@ref": ref}
        seen[id(obj)] = len(seen)
        alive.append(obj)
        return {"@id": seen[id(obj)], **encode()}

    def visit(obj: Any) -> Any:
        if obj is None or type(obj) in (bool, int, str):
            return obj
        if type(obj) is float:
            return obj if np.isfinite(obj) else {"@float": repr(obj)}
        if isinstance(obj, torch.Tensor):
            def tensor() -> dict[str, Any]:
                name = f"t{len(tensors)}"
                tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
                return {"@tensor": name, "device": str(obj.device)}
            return shared(obj, tensor)
        if isinstance(obj, np.ndarray):
            def array() -> dict[str, Any]:
                name = f"t{len(tensors)}"
                tensors[name] = torch.from_numpy(np.ascontiguousarray(obj).copy())
                return {"@ndarray": name}
            return shared(obj, array)
        if isinstance(obj, np.generic):
            return {"@np": obj.dtype.str, "v": visit(obj.item())}
        if isinstance(obj, dict):
            return shared(obj, lambda: {"@dict": [[visit(k), visit(v)] for k, v in obj.items()]})
        if isinstance(obj, list):
            return shared(obj, lambda: {"@list": [visit(v) for v in obj]})
        if isinstance(obj, tuple):
            return {"@tuple": [visit(v) for v in obj]}
        if isinstance(obj, set):
            return {"@set": [visit(v) for v in sorted(obj)]}
        name = type(obj).__name__
        if STATE_TYPES.get(name) is type(obj):
            return shared(obj, lambda: {"@type": name, "fields": {f.name: visit(getattr(obj, f.name))
                                                                  for f in dataclasses.fields(obj)}})
        raise StateTreeError(f"run state holds a {type(obj).__module__}.{name}, which checkpoints cannot store")

    return visit(tree), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The tree `flatten_state` described (shared objects shared again, tensors back on their devices)."""
    made: dict[int, Any] = {}

    def keep(node: dict[str, Any], obj: Any) -> Any:
        made[node["@id"]] = obj
        return obj

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "@ref" in node:
            return made[node["@ref"]]
        if "@float" in node:
            return float(node["@float"])
        if "@tensor" in node:
            return keep(node, tensors[node["@tensor"]].to(node["device"]))
        if "@ndarray" in node:
            return keep(node, tensors[node["@ndarray"]].numpy().copy())
        if "@np" in node:
            return np.dtype(node["@np"]).type(visit(node["v"]))
        if "@dict" in node:
            out = keep(node, {})
            out.update((visit(k), visit(v)) for k, v in node["@dict"])
            return out
        if "@list" in node:
            out = keep(node, [])
            out.extend(visit(v) for v in node["@list"])
            return out
        if "@tuple" in node:
            return tuple(visit(v) for v in node["@tuple"])
        if "@set" in node:
            return {visit(v) for v in node["@set"]}
        if "@type" in node:
            cls = STATE_TYPES[node["@type"]]
            return keep(node, cls(**{k: visit(v) for k, v in node["fields"].items()}))
        raise StateTreeError(f"unknown node in a stored run state: {sorted(node)}")

    try:
        return visit(skeleton)
    except (KeyError, TypeError) as e:
        raise StateTreeError(f"malformed run state ({type(e).__name__}: {e})") from None
