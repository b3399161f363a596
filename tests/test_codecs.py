"""Codecs: identity and top-k round trips, exact wire bytes, parameter errors, the error-feedback invariant and
vmapped encode/decode equal to per-client loops bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from fedsim.codecs import CODECS, Identity, TopK, build_codec
from fedsim.error_feedback import ErrorFeedback
from fedsim.errors import ScenarioError
from fedsim.params import tree_leaves, tree_map, tree_nbytes, tree_unstack

KEY = torch.zeros(2, dtype=torch.int64)


def message(seed: int = 0, batch: tuple[int, ...] = ()) -> dict:
    """A nested message with two top-level keys and leaves of different sizes."""
    g = torch.Generator().manual_seed(seed)
    delta = {"0.weight": torch.randn(*batch, 6, 5, generator=g), "0.bias": torch.randn(*batch, 5, generator=g)}
    return {"delta": delta, "control": {"0.weight": torch.randn(*batch, 3, 2, generator=g)}}


def flat(tree: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tree_leaves(tree)])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so -0.0 and 0.0 differ."""
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16}[t.dtype])


def assert_bitwise_equal(a: dict, b: dict) -> None:
    for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(bits(x) if x.is_floating_point() else x, bits(y) if y.is_floating_point() else y)


def topk(scope: str = "model", **params) -> TopK:
    return build_codec({"name": "topk", "scope": scope, **params}, "codec")


def test_identity_round_trips_and_charges_the_message_bytes():
    codec = build_codec(None, "codec")
    m = message()
    payload, state = codec.encode(m, codec.init(m), KEY)
    assert isinstance(codec, Identity) and state == {}
    assert_bitwise_equal(codec.decode(payload, m, {})[0], m)
    assert codec.payload_bytes(m) == tree_nbytes(m) == (30 + 5 + 6) * 4


def test_topk_model_scope_keeps_the_k_largest_magnitudes_over_all_leaves():
    m = message()
    m["control"]["0.weight"] *= 100  # all six of its entries outrank every other leaf's
    codec = topk(k=8)
    payload, _ = codec.encode(m, codec.init(m), KEY)
    out = flat(codec.decode(payload, m, {})[0])
    full = flat(m)
    kept = full.abs().argsort(descending=True)[:8]
    assert set(out.nonzero().flatten().tolist()) == set(kept.tolist())
    assert torch.equal(out[kept], full[kept])
    assert torch.equal(out[-6:], full[-6:])  # the scaled leaf, last in tree_leaves order, went whole


def test_topk_tensor_scope_keeps_ceil_ratio_of_each_leaf():
    m = message()
    m["control"]["0.weight"] *= 100
    codec = topk("tensor", ratio=0.2)
    payload, _ = codec.encode(m, codec.init(m), KEY)
    out = codec.decode(payload, m, {})[0]
    for leaf, got, k in zip(tree_leaves(m), tree_leaves(out), [6, 1, 2], strict=True):  # ceil(0.2*d): 30, 5, 6
        kept = leaf.abs().reshape(-1).argsort(descending=True)[:k]
        assert set(got.reshape(-1).nonzero().flatten().tolist()) == set(kept.tolist())
        assert torch.equal(got.reshape(-1)[kept], leaf.reshape(-1)[kept])


def test_topk_ratio_is_read_as_the_decimal_written():
    codec = topk(ratio=0.07)
    assert codec.k(100) == 7  # float 0.07 * 100 is 7.000000000000001
    assert codec.k(1) == 1 and topk(ratio=0.01).k(10) == 1 and topk(k=50).k(41) == 41


@pytest.mark.parametrize(("scope", "k", "expected"), [("model", 7, 7 * 8), ("tensor", 4, (4 + 4 + 4) * 8)])
def test_topk_bytes_are_k_times_int32_index_plus_float32_value(scope, k, expected):
    m = message()
    codec = topk(scope, k=k)
    payload, _ = codec.encode(m, codec.init(m), KEY)
    assert codec.payload_bytes(m) == tree_nbytes(payload) == expected
    assert {t.dtype for t in tree_leaves(payload) if not t.is_floating_point()} == {torch.int32}  # the indices


def test_topk_values_travel_in_the_message_dtype_and_indices_widen_past_2_31_entries():
    half = {"w": torch.randn(10).half()}
    assert topk(k=3).payload_bytes(half) == 3 * (4 + 2)
    huge = {"w": torch.empty(2**31, device="meta")}
    assert topk(k=5).payload_bytes(huge) == 5 * (8 + 4)
    assert topk(k=5).payload_bytes({"w": torch.empty(2**31 - 1, device="meta")}) == 5 * (4 + 4)


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("params", [{"ratio": 1.0}, {"k": 10**6}])
def test_topk_with_k_equal_d_is_lossless_bit_for_bit(scope, params):
    m = message()
    m["delta"]["0.bias"][:3] = torch.tensor([-0.0, 1e-45, -3e38])
    m["control"]["0.weight"] = m["control"]["0.weight"].double()  # mixed dtypes come back as they went
    codec = topk(scope, **params)
    payload, _ = codec.encode(m, codec.init(m), KEY)
    assert_bitwise_equal(codec.decode(payload, m, {})[0], m)


@pytest.mark.parametrize(("spec", "field"), [
    ({"name": "topk", "ratio": 0.0}, "codec.ratio: "),
    ({"name": "topk", "ratio": 1.5}, "codec.ratio: "),
    ({"name": "topk", "k": 0}, "codec.k: "),
    ({"name": "topk", "ratio": 0.1, "k": 3}, "codec: give exactly one of ratio and k"),
    ({"name": "topk"}, "codec: give exactly one of ratio and k"),
    ({"name": "topk", "k": 3, "scope": "layer"}, "codec.scope: "),
    ({"name": "topk", "ratio": 0.1, "error_feedback": "yes"}, "codec.error_feedback.name: unknown error feedback"),
    ({"name": "topk", "ratoi": 0.1}, "codec.ratoi: unknown field"),
    ({"name": "gzip"},
     "codec.name: unknown codec 'gzip'; allowed: identity, natural, powersgd, qsgd, random_k, sign, topk"),
    ("topk", "codec: expected a mapping"),
])
def test_bad_codec_specs_are_one_line_scenario_errors_naming_the_field(spec, field):
    with pytest.raises(ScenarioError) as err:
        build_codec(spec, "codec")
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_build_codec_wraps_in_error_feedback_only_when_asked():
    plain = build_codec({"name": "topk", "ratio": 0.1}, "codec")
    wrapped = build_codec({"name": "topk", "ratio": 0.1, "error_feedback": True}, "codec")
    assert isinstance(plain, TopK) and isinstance(wrapped, ErrorFeedback) and isinstance(wrapped.inner, TopK)
    assert wrapped.inner.params == plain.params and plain.params.ratio == 0.1
    assert isinstance(build_codec({"name": "identity", "error_feedback": False}, "codec"), Identity)
    assert CODECS.names() == ["identity", "natural", "powersgd", "qsgd", "random_k", "sign", "topk"]


@pytest.mark.parametrize("inner", [{"name": "topk", "ratio": 0.1}, {"name": "topk", "k": 3, "scope": "tensor"},
                                   {"name": "identity"}])
def test_error_feedback_sent_plus_residual_is_message_plus_old_residual_exactly(inner):
    codec = build_codec({**inner, "error_feedback": True}, "codec")
    state = codec.init(message())
    for step in range(20):
        m = message(step)
        old = state["residual"]
        payload, state = codec.encode(m, state, KEY)
        sent = codec.decode(payload, m, {})[0]
        assert_bitwise_equal(tree_map(torch.add, sent, state["residual"]), tree_map(torch.add, m, old))
    assert codec.payload_bytes(m) == codec.inner.payload_bytes(m)
    assert inner["name"] == "identity" or flat(state["residual"]).abs().sum() > 0


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_error_feedback_residual_of_lossless_topk_stays_zero(scope):
    codec = ErrorFeedback(topk(scope, ratio=1.0))
    state = codec.init(message())
    for step in range(5):
        payload, state = codec.encode(message(step), state, KEY)
        assert_bitwise_equal(state["residual"], tree_map(torch.zeros_like, message()))


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_vmapped_error_feedback_topk_equals_a_loop_of_single_encodes_bit_for_bit(scope):
    clients = 5
    codec = build_codec({"name": "topk", "ratio": 0.15, "scope": scope, "error_feedback": True}, "codec")
    template = message()
    states = []
    for c in range(clients):  # two loop steps first, so residuals are nonzero and differ per client
        state = codec.init(template)
        for step in range(2):
            _, state = codec.encode(message(100 * c + step), state, KEY)
        states.append(state)
    batch = tree_map(lambda t: torch.round(t * 2) / 2, message(7, (clients,)))  # rounded: many magnitude ties
    keys = torch.arange(2 * clients, dtype=torch.int64).reshape(clients, 2)
    stacked = tree_map(lambda *ts: torch.stack(ts), *states)

    payloads, new_states = vmap(codec.encode)(batch, stacked, keys)
    decoded = vmap(codec.decode, in_dims=(0, None, None))(payloads, template, {})[0]

    for c, m in enumerate(tree_unstack(batch, clients)):
        payload, state = codec.encode(m, states[c], keys[c])
        assert_bitwise_equal(tree_unstack(payloads, clients)[c], payload)
        assert_bitwise_equal(tree_unstack(new_states, clients)[c], state)
        assert_bitwise_equal(tree_unstack(decoded, clients)[c], codec.decode(payload, template, {})[0])


ROUND_TRIP_INNER = [{"name": "identity"}, {"name": "topk", "ratio": 0.3}, {"name": "random_k", "ratio": 0.3},
                    {"name": "random_k", "k": 4, "scaling": "biased"}, {"name": "random_k", "ratio": 1.0},
                    {"name": "qsgd", "levels": 4}, {"name": "qsgd", "levels": 1, "variant": "contractive"},
                    {"name": "sign"}, {"name": "natural"}, {"name": "powersgd", "rank": 1, "min_compression": 1.0}]
ROUND_TRIP_FEEDBACK = [False, True, "ef21", {"name": "ef21_sgdm", "eta": 0.5},
                       {"name": "econtrol", "first_message": "compressed"}]


def _round_trip_spec(inner: dict, feedback: object, scope: str) -> dict:
    scoped = inner if inner["name"] in ("identity", "powersgd") else {**inner, "scope": scope}
    return {**scoped, "error_feedback": feedback} if feedback is not False else scoped


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("feedback", ROUND_TRIP_FEEDBACK,
                         ids=lambda f: str(f.get("name") if isinstance(f, dict) else f))
@pytest.mark.parametrize("inner", ROUND_TRIP_INNER, ids=lambda s: "-".join(map(str, s.values())))
def test_round_trip_is_encode_then_decode_bit_for_bit(inner, feedback, scope):
    """What in-process sends decode (`round_trip`, which skips the receiver's redraws and unpacking) is exactly what a
    receiver decodes from the payload with its mirror, vmapped over senders, for first and later messages."""
    codec = build_codec(_round_trip_spec(inner, feedback, scope), "codec")
    g = torch.Generator().manual_seed(3)
    template = {"w": torch.zeros(6, 5), "b": torch.zeros(5, dtype=torch.float64)}
    state = vmap(codec.init, randomness="same")(tree_map(lambda v: v.expand(3, *v.shape), template))
    for step in range(3):
        messages = tree_map(lambda v: torch.randn(3, *v.shape, generator=g, dtype=v.dtype), template)
        keys = torch.stack([torch.arange(3) + 10 * step, torch.full((3,), 7)], dim=1)
        first = step == 0
        payload, new_state = vmap(lambda m, s, k, f=first: codec.encode(m, s, k, first=f))(messages, state, keys)
        decoded, _ = vmap(codec.decode, in_dims=(0, None, 0))(payload, template, codec.shared(state))
        sent, rebuilt, trip_state = vmap(lambda m, s, k, f=first: codec.round_trip(m, s, k, first=f))(
            messages, state, keys)
        for a, b in [(payload, sent), (decoded, rebuilt), (new_state, trip_state)]:
            for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
                assert x.dtype == y.dtype and torch.equal(x, y)
        state = new_state
