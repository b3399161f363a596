"""Codecs (compressors) between a client rule's message and the transport: encode to a wire payload, decode back.

The contract is optax-like: `init` gives per-sender codec state (kept by the caller, apart from the algorithm's
state), `encode` is a pure tensor function that runs under `torch.func.vmap` over a client axis, and
`payload_bytes` is the exact size the clock charges. Wrappers such as `ErrorFeedback` compose around any codec.
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
from fedsim.errors import ScenarioError
from fedsim.params import Pytree, tree_map, tree_nbytes, tree_sub, tree_zeros_like
from fedsim.registry import NoParams, Params, Registry
from fedsim.strict_input import shorten

Payload = dict[str, Any]
"""What goes on the wire: a pytree of tensors whose shapes depend only on the message's shapes."""


class Codec(Protocol):
    """A compressor: per-sender state, a vmappable encode (message, state, key) -> (payload, state), a decode."""

    def init(self, template: Pytree) -> Pytree:
        """Per-sender codec state for messages shaped like `template` (`{}` when stateless)."""
        ...

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor) -> tuple[Payload, Pytree]:
        """(payload, new state); pure and vmappable over a leading client axis of all three arguments. `key` is an
        int64 (2,) counter-based RNG key, ignored by deterministic codecs."""
        ...

    def decode(self, payload: Payload, template: Pytree) -> Pytree:
        """The message the receiver rebuilds: structure, shapes and dtypes of `template` (read for shapes only)."""
        ...

    def payload_bytes(self, template: Pytree) -> int:
        """Exact bytes of one payload for messages shaped like `template` (payload shapes are static)."""
        ...

    def check(self, template: Pytree, field_path: str) -> None:
        """Refuse settings that cannot fit messages shaped like `template` (the model's tensors, when the
        simulation is built) with a one-line ScenarioError naming `field_path.<setting>`."""
        ...


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

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor) -> tuple[Payload, Pytree]:
        return message, state

    def decode(self, payload: Payload, template: Pytree) -> Pytree:
        return payload

    def payload_bytes(self, template: Pytree) -> int:
        return tree_nbytes(template)

    def check(self, template: Pytree, field_path: str) -> None:
        """Any message fits."""


class ErrorFeedback:
    """Error feedback around any codec (Stich et al. 2018; Karimireddy et al. 2019): what the inner codec dropped
    is kept as a residual and added to the next message, so sent + new residual == message + old residual."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner

    def init(self, template: Pytree) -> Pytree:
        return {"residual": tree_zeros_like(template), "inner": self.inner.init(template)}

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor) -> tuple[Payload, Pytree]:
        corrected = tree_map(torch.add, message, state["residual"])
        payload, inner_state = self.inner.encode(corrected, state["inner"], key)
        sent = self.inner.decode(payload, corrected)
        return payload, {"residual": tree_sub(corrected, sent), "inner": inner_state}

    def decode(self, payload: Payload, template: Pytree) -> Pytree:
        return self.inner.decode(payload, template)

    def payload_bytes(self, template: Pytree) -> int:
        """The inner codec's bytes: the residual never travels."""
        return self.inner.payload_bytes(template)

    def check(self, template: Pytree, field_path: str) -> None:
        self.inner.check(template, field_path)


def build_codec(spec: Mapping[str, Any] | None, field_path: str) -> Codec:
    """The codec a scenario names (`{name: topk, ratio: 0.1, error_feedback: true}`); None is identity. Errors
    are one-line ScenarioErrors naming `field_path.<key>`."""
    if spec is None:
        return Identity()
    if not isinstance(spec, Mapping):
        raise ScenarioError(f"{field_path}: expected a mapping with a 'name' key, got {shorten(spec)}")
    rest = dict(spec)
    feedback = rest.pop("error_feedback", False)
    if not isinstance(feedback, bool):
        raise ScenarioError(f"{field_path}.error_feedback: expected true or false, got {shorten(feedback)}")
    entry, params = CODECS.resolve(rest, field_path)
    codec = entry.obj(params)
    return ErrorFeedback(codec) if feedback else codec
