"""Error feedback as wrappers around any codec (`compression.<path>.error_feedback`): EF14, EF21, EF21-SGDM,
EControl.

EF14 keeps what the compressor dropped and adds it to the next message; the receiver needs nothing. EF21 and its
descendants keep an estimate h_i of the sender's messages on both sides: the sender compresses a correction to h_i,
both sides add the decoded correction, and the receiver's message is h_i itself, so the receiver's mirror of h_i
is codec state shared between sender and receiver (`Codec.shared`). Units are the message's (client deltas, not
gradients): with a constant step size the two differ by the factor -lr, so the methods are the papers' ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from fedsim.params import Pytree, tree_map, tree_nbytes, tree_sub, tree_zeros_like
from fedsim.registry import NoParams, Params, Registry

if TYPE_CHECKING:
    from fedsim.codecs import Codec, Payload


class ErrorFeedback:
    """EF14 (Seide et al. 2014; Stich et al. 2018; Karimireddy et al. 2019): what the inner codec dropped is kept
    as a residual and added to the next message, so sent + new residual == message + old residual."""

    def __init__(self, inner: Codec, params: Params | None = None) -> None:
        self.inner, self.params = inner, params or NoParams()

    def init(self, template: Pytree) -> Pytree:
        return {"residual": tree_zeros_like(template), "inner": self.inner.init(template)}

    def shared(self, state: Pytree) -> Pytree:
        return self.inner.shared(state["inner"])

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor, *, first: bool = False) -> tuple[Payload,
                                                                                                         Pytree]:
        payload, _, new_state = self.round_trip(message, state, key, first=first)
        return payload, new_state

    def round_trip(self, message: Pytree, state: Pytree, key: torch.Tensor, *,
                   first: bool = False) -> tuple[Payload, Pytree, Pytree]:
        """The receiver decodes what the inner codec sent, which the sender needs for its residual anyway."""
        corrected = tree_map(torch.add, message, state["residual"])
        payload, sent, inner_state = self.inner.round_trip(corrected, state["inner"], key, first=first)
        return payload, sent, {"residual": tree_sub(corrected, sent), "inner": inner_state}

    def decode(self, payload: Payload, template: Pytree, shared: Pytree) -> tuple[Pytree, Pytree]:
        return self.inner.decode(payload, template, shared)

    def payload_bytes(self, template: Pytree, *, first: bool = False) -> int:
        """The inner codec's bytes: the residual never travels."""
        return self.inner.payload_bytes(template, first=first)

    def check(self, template: Pytree, field_path: str) -> None:
        self.inner.check(template, field_path)


class MirroredParams(Params):
    """How the sender's first message goes: uncompressed (h_i^0 = the message, the papers' default, its full
    bytes counted) or compressed like any other (h_i^0 = C(message), from h_i = 0)."""

    first_message: Literal["full", "compressed"] = "full"


class MirroredFeedback(ABC):
    """Base of EF21-style methods: both sides keep h_i; a message sends C(target - ...) as the inner codec's
    payload, both sides add the decoded correction to h_i, and the receiver's message is the new h_i.

    State: `{"h": h_i, "inner": the inner codec's state, "own": what only the sender keeps}`; the receiver mirrors
    h_i and the inner codec's shared part. Payloads are `{"opening": message}` (a full first message) or
    `{"update": inner payload}`. Subclasses say what is compressed (`prepare`) and what the sender keeps (`settle`)."""

    params: MirroredParams

    def __init__(self, inner: Codec, params: MirroredParams) -> None:
        self.inner, self.params = inner, params

    def init(self, template: Pytree) -> Pytree:
        return {"h": tree_zeros_like(template), "inner": self.inner.init(template), "own": self.init_own(template)}

    def init_own(self, template: Pytree) -> Pytree:
        """What only the sender keeps, before its first message."""
        return {}

    def shared(self, state: Pytree) -> Pytree:
        return {"h": state["h"], "inner": self.inner.shared(state["inner"])}

    def opens_full(self, first: bool) -> bool:
        return first and self.params.first_message == "full"

    @abstractmethod
    def prepare(self, message: Pytree, state: Pytree, first: bool) -> tuple[Pytree, Pytree]:
        """(what goes through the inner codec, the sender's own state before the compression error is known)."""

    def settle(self, own: Pytree, sent: Pytree) -> Pytree:
        """The sender's own state once `sent` (the decoded correction) is known."""
        return own

    def opened_own(self, message: Pytree, state: Pytree) -> Pytree:
        """The sender's own state after a full first message (`message`: the sender's own copy of it)."""
        return state["own"]

    def _send(self, message: Pytree, state: Pytree, key: torch.Tensor,
              first: bool) -> tuple[Payload, Pytree | None, Pytree]:
        """(payload, the decoded correction or None for a full first message, the sender's new state)."""
        if self.opens_full(first):  # the state keeps a copy: callers may write into `message` afterwards
            kept = tree_map(torch.clone, message)
            return {"opening": message}, None, {"h": kept, "inner": state["inner"],
                                                "own": self.opened_own(kept, state)}
        target, own = self.prepare(message, state, first)
        payload, sent, inner_state = self.inner.round_trip(target, state["inner"], key, first=first)
        return {"update": payload}, sent, {"h": tree_map(torch.add, state["h"], sent), "inner": inner_state,
                                           "own": self.settle(own, sent)}

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor, *, first: bool = False) -> tuple[Payload,
                                                                                                         Pytree]:
        payload, _, new_state = self._send(message, state, key, first)
        return payload, new_state

    def round_trip(self, message: Pytree, state: Pytree, key: torch.Tensor, *,
                   first: bool = False) -> tuple[Payload, Pytree, Pytree]:
        """The receiver's message h_i + correction, added apart from the sender's new h_i (no storage shared)."""
        payload, sent, new_state = self._send(message, state, key, first)
        return payload, message if sent is None else tree_map(torch.add, state["h"], sent), new_state

    def decode(self, payload: Payload, template: Pytree, shared: Pytree) -> tuple[Pytree, Pytree]:
        if "opening" in payload:
            return payload["opening"], {"h": payload["opening"], "inner": shared["inner"]}
        sent, inner_shared = self.inner.decode(payload["update"], template, shared["inner"])
        h = tree_map(torch.add, shared["h"], sent)
        return h, {"h": h, "inner": inner_shared}

    def payload_bytes(self, template: Pytree, *, first: bool = False) -> int:
        """The message's own bytes for a full first message, else the inner codec's."""
        return tree_nbytes(template) if self.opens_full(first) else self.inner.payload_bytes(template, first=first)

    def check(self, template: Pytree, field_path: str) -> None:
        self.inner.check(template, field_path)


class EF21(MirroredFeedback):
    """EF21 (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021, Algorithm 1): c_i = C(m_i - h_i), h_i += c_i; the
    receiver's message is h_i."""

    def prepare(self, message: Pytree, state: Pytree, first: bool) -> tuple[Pytree, Pytree]:
        return tree_sub(message, state["h"]), {}


class MomentumParams(MirroredParams):
    """EF21-SGDM's momentum weight eta in (0, 1]: v_i <- (1 - eta) v_i + eta m_i (1: EF21 itself)."""

    eta: float = Field(0.1, gt=0, le=1)


class EF21SGDM(MirroredFeedback):
    """EF21-SGDM (Fatkhullin, Tyurin, Richtárik, NeurIPS 2023, Algorithm 1): v_i <- (1 - eta) v_i + eta m_i,
    c_i = C(v_i - h_i), h_i += c_i. The first message sets v_i^0 = m_i (the paper's v_i^0 = g_i^0)."""

    params: MomentumParams

    def init_own(self, template: Pytree) -> Pytree:
        return {"v": tree_zeros_like(template)}

    def opened_own(self, message: Pytree, state: Pytree) -> Pytree:
        return {"v": message}

    def prepare(self, message: Pytree, state: Pytree, first: bool) -> tuple[Pytree, Pytree]:
        eta = self.params.eta
        v = tree_map(torch.clone, message) if first else \
            tree_map(lambda v, m: (1 - eta) * v + eta * m, state["own"]["v"], message)
        return tree_sub(v, state["h"]), {"v": v}


class EControlParams(MirroredParams):
    """EControl's error-control weight eta >= 0 (0: EF21; the paper's theory takes delta / 400, practice tunes
    it)."""

    eta: float = Field(0.1, ge=0)


class EControl(MirroredFeedback):
    """EControl (Gao, Islamov, Stich, ICLR 2024, Algorithm 1): Delta_i = C(eta e_i + m_i - h_i),
    e_i <- e_i + m_i - h_i - Delta_i, h_i += Delta_i; the receiver's message is h_i (the server steps with
    h_t + mean Delta_t = mean h_{t+1}). The error e_i stays with the sender, in the message's units."""

    params: EControlParams

    def init_own(self, template: Pytree) -> Pytree:
        return {"e": tree_zeros_like(template)}

    def prepare(self, message: Pytree, state: Pytree, first: bool) -> tuple[Pytree, Pytree]:
        gap, e = tree_sub(message, state["h"]), state["own"]["e"]
        target = tree_map(lambda e, g: self.params.eta * e + g, e, gap)
        return target, {"e": tree_map(torch.add, e, gap)}

    def settle(self, own: Pytree, sent: Pytree) -> Pytree:
        return {"e": tree_sub(own["e"], sent)}


ERROR_FEEDBACK: Registry[Any] = Registry("error feedback")
ERROR_FEEDBACK.register("ef14")(ErrorFeedback)
ERROR_FEEDBACK.register("ef21", params=MirroredParams)(EF21)
ERROR_FEEDBACK.register("ef21_sgdm", params=MomentumParams)(EF21SGDM)
ERROR_FEEDBACK.register("econtrol", params=EControlParams)(EControl)
