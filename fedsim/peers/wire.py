"""A pytree payload as bytes and back: safetensors for the tensors, the tree's shape as JSON in its metadata
(`fedsim.state_tree`), so a peer rebuilds the exact dtypes, shapes and keys; never pickle."""

from __future__ import annotations

import json
from typing import Any

import safetensors
import safetensors.torch

from fedsim.state_tree import StateTreeError, flatten_state, unflatten_state


class MalformedPayload(ValueError):
    """Bytes that are not a payload this module wrote."""


def encode_payload(tree: Any) -> bytes:
    skeleton, tensors = flatten_state(tree)
    return safetensors.torch.save(tensors, metadata={"tree": json.dumps(skeleton, separators=(",", ":"))})


def decode_payload(data: bytes) -> Any:
    try:
        tensors = safetensors.torch.load(data)  # checks the header and sizes first
        return unflatten_state(json.loads(_metadata(data)["tree"]), tensors)
    except (safetensors.SafetensorError, StateTreeError, KeyError, ValueError) as e:
        raise MalformedPayload(f"not a fedsim payload ({type(e).__name__}: {e})") from None


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (the header is an 8-byte little-endian length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})
