"""Codecs (compressors) between a client rule's message and the transport: encode to a wire payload, decode back.

The contract is optax-like: `init` gives per-sender codec state (kept by the caller, apart from the algorithm's
state), `encode` is a pure tensor function that runs under `torch.func.vmap` over a client axis, and
`payload_bytes` is the exact size the clock charges. Error feedback (`fedsim.error_feedback`) wraps any codec.
The compressors themselves (top-k, random-k, QSGD, sign, natural, PowerSGD) live in `fedsim.compressors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from fedsim.compressors import (
    QSGD,
    Natural,
    PowerSGD,
    PowerSGDParams,
    QSGDParams,
    RandomK,
    RandomKParams,
    ScaledSign,
    ScopeParams,
    TopK,
    TopKParams,
)
from fedsim.error_feedback import ERROR_FEEDBACK
from fedsim.errors import ScenarioError
from fedsim.params import Pytree, tree_nbytes
from fedsim.registry import NoParams, Params, Registry
from fedsim.strict_input import shorten

Payload = dict[str, Any]
"""What goes on the wire: a pytree of tensors whose shapes depend only on the message's shapes."""


class Codec(Protocol):
    """A compressor: per-sender state, a vmappable encode (message, state, key) -> (payload, state), and a decode
    that rebuilds the message from the payload and the receiver's mirror of the sender's shared state.

    A sender's state has two parts: what only the sender knows (residuals, momentum) and what every receiver mirrors
    (`shared`: EF21's h_i, CHOCO's public copy), which the receiver updates from payloads alone, exactly as the
    sender does. Both sides start from `shared(init(template))`. A sender's first message may differ from the
    others (`first=True`: EF21 and EControl can send it uncompressed), so its payload and bytes may too."""

    def init(self, template: Pytree) -> Pytree:
        """Per-sender codec state before the first message, for messages shaped like `template` (`{}` when
        stateless)."""
        ...

    def shared(self, state: Pytree) -> Pytree:
        """The part of a sender's `state` its receivers mirror (`{}` when they keep nothing)."""
        ...

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor, *, first: bool = False) -> tuple[Payload,
                                                                                                         Pytree]:
        """(payload, new state); pure and vmappable over a leading client axis of the three tensor arguments.
        `key` is an int64 (2,) counter-based RNG key, ignored by deterministic codecs; `first`: the sender's first
        message (a Python bool, the same for a whole batch). The new state never shares storage with `message`
        (callers may write into the message afterwards); the payload may."""
        ...

    def decode(self, payload: Payload, template: Pytree, shared: Pytree) -> tuple[Pytree, Pytree]:
        """(the message the receiver rebuilds, its new mirror of the sender's shared state): structure, shapes and
        dtypes of `template` (read for shapes only); vmappable like `encode`."""
        ...

    def round_trip(self, message: Pytree, state: Pytree, key: torch.Tensor, *,
                   first: bool = False) -> tuple[Payload, Pytree, Pytree]:
        """(payload, the message a receiver whose mirror is `shared(state)` decodes, new state): `encode` then
        `decode`, bit for bit, in one call, so a codec can skip work the receiver would redo (random-k's index draw,
        unpacking codes it just packed); vmappable like `encode`. In-process sends use it."""
        ...

    def payload_bytes(self, template: Pytree, *, first: bool = False) -> int:
        """Exact bytes of one payload for messages shaped like `template` (payload shapes are static; a first
        message's may differ)."""
        ...

    def check(self, template: Pytree, field_path: str) -> None:
        """Refuse settings that cannot fit messages shaped like `template` (the model's tensors, when the
        simulation is built) with a one-line ScenarioError naming `field_path.<setting>`."""
        ...


def transmit(codec: Codec, message: Pytree, state: Pytree, key: torch.Tensor,
             first: bool) -> tuple[Payload, Pytree, int, Pytree]:
    """One message from sender to receiver in one process: the payload, what the receiver decodes (with its
    mirror, which equals the sender's shared state before the message), the payload's exact bytes, and the
    sender's new state."""
    payload, decoded, new_state = codec.round_trip(message, state, key, first=first)
    return payload, decoded, codec.payload_bytes(message, first=first), new_state


CODECS: Registry[Callable[[Params], Codec]] = Registry("codec")
CODECS.register("topk", params=TopKParams)(TopK)
CODECS.register("random_k", params=RandomKParams)(RandomK)
CODECS.register("qsgd", params=QSGDParams)(QSGD)
CODECS.register("sign", params=ScopeParams)(ScaledSign)
CODECS.register("natural", params=ScopeParams)(Natural)
CODECS.register("powersgd", params=PowerSGDParams)(PowerSGD)


@CODECS.register("identity")
class Identity:
    """No compression: the payload is the message itself; bytes are the message's bytes."""

    def __init__(self, params: Params | None = None) -> None:
        self.params = params or NoParams()

    def init(self, template: Pytree) -> Pytree:
        return {}

    def shared(self, state: Pytree) -> Pytree:
        return {}

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor, *, first: bool = False) -> tuple[Payload,
                                                                                                         Pytree]:
        return message, state

    def decode(self, payload: Payload, template: Pytree, shared: Pytree) -> tuple[Pytree, Pytree]:
        return payload, shared

    def round_trip(self, message: Pytree, state: Pytree, key: torch.Tensor, *,
                   first: bool = False) -> tuple[Payload, Pytree, Pytree]:
        return message, message, state

    def payload_bytes(self, template: Pytree, *, first: bool = False) -> int:
        return tree_nbytes(template)

    def check(self, template: Pytree, field_path: str) -> None:
        """Any message fits."""


def _error_feedback_spec(value: Any, field_path: str) -> dict[str, Any] | None:
    """`error_feedback` as a registry spec: false/absent none, true EF14, a name, or `{name: ..., **params}`."""
    if value is False:
        return None
    if value is True:
        return {"name": "ef14"}
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise ScenarioError(f"{field_path}: expected true, false, a method name ({', '.join(ERROR_FEEDBACK.names())}) "
                        f"or a mapping with a 'name' key, got {shorten(value)}")


def build_codec(spec: Mapping[str, Any] | None, field_path: str) -> Codec:
    """The codec a scenario names (`{name: topk, ratio: 0.1, error_feedback: {name: econtrol, eta: 0.1}}`); None is
    identity. Errors are one-line ScenarioErrors naming `field_path.<key>`."""
    if spec is None:
        return Identity()
    if not isinstance(spec, Mapping):
        raise ScenarioError(f"{field_path}: expected a mapping with a 'name' key, got {shorten(spec)}")
    rest = dict(spec)
    feedback = _error_feedback_spec(rest.pop("error_feedback", False), f"{field_path}.error_feedback")
    entry, params = CODECS.resolve(rest, field_path)
    codec = entry.obj(params)
    if feedback is None:
        return codec
    wrapper, wrapper_params = ERROR_FEEDBACK.resolve(feedback, f"{field_path}.error_feedback")
    return wrapper.obj(codec, wrapper_params)
