"""PowerSGD as a codec: exact rank-1 rebuild, vectors sent as they are, warm start converging to the truncated SVD,
exact payload bytes, vmap equal to a loop, error-feedback telescoping, one-line errors and runtimes agreeing."""

from __future__ import annotations

import pytest
import torch
from rulekit import assert_runtimes_agree
from torch.func import vmap

import fedsim
from fedsim.codecs import build_codec
from fedsim.errors import ScenarioError
from fedsim.params import tree_leaves, tree_map, tree_nbytes, tree_unstack

KEY = torch.tensor([12345, 2**32 - 7])


def powersgd(**params):
    return build_codec({"name": "powersgd", **params}, "compression.uplink")


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def send(codec, message: dict, state: dict, key: torch.Tensor = KEY) -> tuple[dict, dict, dict]:
    """(payload, decoded message, new state) of one message."""
    payload, state = codec.encode(message, state, key)
    return payload, codec.decode(payload, message, {})[0], state


def with_spectrum(singular_values: list[float], n: int, m: int) -> torch.Tensor:
    """An n x m float64 matrix with the given singular values and random singular vectors."""
    u = torch.linalg.qr(randn(n, len(singular_values), seed=1)).Q
    v = torch.linalg.qr(randn(m, len(singular_values), seed=2)).Q
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("start", ["keyed draw", "ones"])
def test_a_rank_1_matrix_is_rebuilt_exactly_in_one_step(start):
    u, v = randn(6, 1, seed=3), randn(9, 1, seed=4)
    message = {"w": u @ v.T}
    codec = powersgd(rank=1, min_compression=0)
    state = codec.init(message) if start == "keyed draw" else {"w": torch.ones(9, 1, dtype=torch.float64)}
    payload, decoded, _ = send(codec, message, state)
    torch.testing.assert_close(decoded["w"], message["w"], rtol=0, atol=1e-13)
    sign = payload["w"]["p"][0, 0].sign() * u[0, 0].sign()  # P^ = +-u/|u|, Q = +-v|u|
    torch.testing.assert_close(payload["w"]["p"], sign * u / u.norm(), rtol=0, atol=1e-14)
    torch.testing.assert_close(payload["w"]["q"], sign * v * u.norm(), rtol=0, atol=1e-13)


def test_biases_vectors_and_scalars_are_sent_as_they_are():
    message = {"layer": {"weight": randn(16, 40), "bias": randn(16)}, "scale": randn(()),
               "kernel": randn(16, 3, 3, 3)}
    codec = powersgd(rank=2)
    payload, decoded, state = send(codec, message, codec.init(message))
    assert payload["layer"]["bias"] is message["layer"]["bias"] and payload["scale"] is message["scale"]
    assert torch.equal(decoded["layer"]["bias"], message["layer"]["bias"])
    assert set(state) == {"layer/weight", "kernel"} and state["kernel"].shape == (27, 2)
    assert payload["kernel"]["p"].shape == (16, 2) and decoded["kernel"].shape == (16, 3, 3, 3)


def test_warm_started_queries_converge_to_the_best_rank_r_approximation():
    matrix = with_spectrum([10.0, 5.0, 1.0, 0.5, 0.1], 8, 12)
    u, s, vt = torch.linalg.svd(matrix)
    best = u[:, :2] @ torch.diag(s[:2]) @ vt[:2]
    codec, message = powersgd(rank=2, min_compression=0), {"w": matrix}
    state, errors = codec.init(message), []
    for _ in range(30):
        _, decoded, state = send(codec, message, state)
        errors.append(float((decoded["w"] - best).norm()))
    assert errors[0] > 1e-3 and errors[-1] < 1e-12


def test_power_iterations_k_is_k_warm_started_encodes_in_one():
    message = {"w": randn(7, 11)}
    one, three = powersgd(rank=2, min_compression=0), powersgd(rank=2, min_compression=0, power_iterations=3)
    state = one.init(message)
    for _ in range(3):
        payload, _, state = send(one, message, state)
    at_once, _, at_once_state = send(three, message, three.init(message))
    for got, want in zip(tree_leaves(at_once), tree_leaves(payload), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    torch.testing.assert_close(at_once_state["w"], state["w"], rtol=0, atol=1e-14)


def test_an_all_zero_matrix_is_sent_as_zero_and_the_next_message_draws_a_fresh_query():
    codec, zero = powersgd(rank=1, min_compression=0), {"w": torch.zeros(5, 8, dtype=torch.float64)}
    _, decoded, state = send(codec, zero, codec.init(zero))
    assert torch.equal(decoded["w"], zero["w"]) and not state["w"].any()
    rank_one = {"w": randn(5, 1, seed=1) @ randn(1, 8, seed=2)}
    torch.testing.assert_close(send(codec, rank_one, state)[1]["w"], rank_one["w"], rtol=0, atol=1e-13)


def test_the_first_query_is_drawn_from_the_key():
    codec, message = powersgd(rank=1, min_compression=0), {"w": randn(6, 9)}
    first, again, other = (send(codec, message, codec.init(message), k)[1]["w"] for k in (KEY, KEY.clone(), KEY + 1))
    assert torch.equal(first, again) and not torch.allclose(first, other)


@pytest.mark.parametrize("params", [{"rank": 1}, {"rank": 3, "min_compression": 0}, {"rank": 4, "min_compression": 1}])
def test_payload_bytes_are_the_payload_tensors_bytes(params):
    codec = powersgd(**params)
    templates = [
        {"w": randn(10, 64, dtype=torch.float32), "b": randn(10, dtype=torch.float32)},
        {"conv": randn(8, 3, 5, 5, dtype=torch.float32), "tiny": randn(2, 2, dtype=torch.float32)},
        {"w": randn(33, 20).half(), "d": randn(40, 30), "e": torch.empty(0, 4)},
    ]
    for template in templates:
        payload, _ = codec.encode(template, codec.init(template), KEY)
        assert codec.payload_bytes(template) == tree_nbytes(payload)
        decoded = codec.decode(payload, template, {})[0]
        assert [(t.shape, t.dtype) for t in tree_leaves(decoded)] == [(t.shape, t.dtype) for t in tree_leaves(template)]


@pytest.mark.parametrize(("params", "expected"), [
    ({"rank": 2}, 2 * (10 + 64) * 4 + 40),  # rank-2 factors + the bias
    ({"rank": 4}, 4 * (10 + 64) * 4 + 40),  # 640 / 296 entries: 2.16 times smaller, compressed
    ({"rank": 4, "min_compression": 3}, 640 * 4 + 40),  # not 3 times smaller: sent as it is
    ({"rank": 64, "min_compression": 0}, 10 * (10 + 64) * 4 + 40),  # rank clipped to min(n, m) = 10
])
def test_bytes_of_a_10_by_64_float32_layer(params, expected):
    assert powersgd(**params).payload_bytes({"w": torch.zeros(10, 64), "b": torch.zeros(10)}) == expected


def test_a_matrix_exactly_min_compression_times_smaller_is_compressed():
    assert powersgd(rank=1).payload_bytes({"w": torch.zeros(4, 4)}) == (4 + 4) * 4  # 16 entries / 8 = 2


def test_a_rank_clipped_to_the_matrix_rebuilds_it_exactly():
    message = {"w": randn(3, 50)}
    codec = powersgd(rank=8, min_compression=0)
    torch.testing.assert_close(send(codec, message, codec.init(message))[1]["w"], message["w"], rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmapped_encode_and_decode_equal_a_loop(dtype):
    clients, codec = 4, powersgd(rank=2, min_compression=0)
    batch = {"w": randn(clients, 9, 13, dtype=dtype), "b": randn(clients, 9, dtype=dtype),
             "conv": randn(clients, 6, 2, 3, 3, dtype=dtype)}
    template = tree_unstack(batch, clients)[0]
    keys = torch.stack([torch.arange(clients), torch.full((clients,), 99)], dim=1)
    states = tree_map(lambda q: q.expand(clients, *q.shape), codec.init(template))
    loop_states = tree_unstack(states, clients)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for _ in range(2):  # the first message draws the queries, the second warm-starts from them
        payloads, states = vmap(codec.encode)(batch, states, keys)
        decoded = vmap(codec.decode, in_dims=(0, None, None))(payloads, template, {})[0]
        for i, message in enumerate(tree_unstack(batch, clients)):
            payload, loop_states[i] = codec.encode(message, loop_states[i], keys[i])
            for got, want in zip(tree_leaves(tree_unstack(decoded, clients)[i]),
                                 tree_leaves(codec.decode(payload, template, {})[0]), strict=True):
                torch.testing.assert_close(got, want, **tol)
            for got, want in zip(tree_leaves(tree_unstack(states, clients)[i]), tree_leaves(loop_states[i]),
                                 strict=True):
                torch.testing.assert_close(got, want, **tol)


def test_error_feedback_telescopes_sent_plus_residual_to_the_sum_of_messages():
    codec = powersgd(rank=1, min_compression=0, error_feedback=True)
    messages = [{"w": randn(6, 10, seed=s), "b": randn(6, seed=s)} for s in range(6)]
    state, sent = codec.init(messages[0]), tree_map(torch.zeros_like, messages[0])
    for message in messages:
        _, decoded, state = send(codec, message, state)
        sent = tree_map(torch.add, sent, decoded)
    total = tree_map(lambda *xs: sum(xs), *messages)
    torch.testing.assert_close(tree_map(torch.add, sent, state["residual"]), total, rtol=0, atol=1e-12)
    assert float(state["residual"]["w"].norm()) > 1e-3 and not state["residual"]["b"].any()


@pytest.mark.parametrize(("spec", "field"), [
    ({"rank": 0}, "compression.uplink.rank: "),
    ({"rank": 1.5}, "compression.uplink.rank: "),
    ({}, "compression.uplink.rank: missing"),
    ({"rank": 2, "power_iterations": 0}, "compression.uplink.power_iterations: "),
    ({"rank": 2, "min_compression": -1.0}, "compression.uplink.min_compression: "),
    ({"rank": 2, "scope": "tensor"}, "compression.uplink.scope: unknown field"),
])
def test_bad_powersgd_settings_are_one_line_scenario_errors_naming_the_field(spec, field):
    with pytest.raises(ScenarioError) as err:
        powersgd(**spec)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


@pytest.mark.parametrize("error_feedback", [False, True])
def test_sequential_and_vectorized_runtimes_agree_with_powersgd(tiny, error_feedback):
    uplink = {"name": "powersgd", "rank": 2, "error_feedback": error_feedback}
    scenario = {**tiny, "rounds": 3, "num_clients": 5, "compression": {"uplink": uplink}}
    rows = assert_runtimes_agree(lambda runtime: {**scenario, "runtime": runtime})
    weights_alone = 3 * 4 * 10 * 64 * 4  # rounds x clients x the float32 10 x 64 layer, uncompressed
    assert 0 < rows["sequential"][-1]["bytes_up"] == rows["vectorized"][-1]["bytes_up"] < weights_alone / 3


@pytest.mark.parametrize(("direction", "codec"), [
    ("uplink", {"name": "powersgd", "rank": 11}),
    ("downlink", {"name": "powersgd", "rank": 4, "min_compression": 8.0}),
    ("uplink", {"name": "powersgd", "rank": 11, "error_feedback": True}),
])
def test_a_rank_that_compresses_no_matrix_of_the_model_is_one_line_naming_rank(tiny, direction, codec):
    # tiny's one matrix is 10 x 64: rank 11 exceeds min(n, m); rank 4 sends 296 values for 640, not 8x fewer
    with pytest.raises(ScenarioError) as err:
        fedsim.run({**tiny, "rounds": 1, "compression": {direction: codec}}, write=False)
    message = str(err.value)
    assert message.startswith(f"compression.{direction}.rank: ") and "10x64" in message and "\n" not in message
    fedsim.run({**tiny, "rounds": 1, "compression": {direction: {**codec, "rank": 3, "min_compression": 2.0}}},
               write=False)
