"""The compressor zoo (random-k, QSGD, scaled sign, natural): exact payload bytes, known answers (unbiasedness,
contraction, powers of two, signs, near-identity settings), keyed draws, vmap equal to a loop, one-line errors and
sequential and vectorized runtimes agreeing."""

from __future__ import annotations

import math

import pytest
import torch
from rulekit import assert_runtimes_agree
from torch.func import vmap

from fedsim import keyed_random
from fedsim.codecs import build_codec
from fedsim.compressors import _random_indices
from fedsim.errors import ScenarioError
from fedsim.params import tree_leaves, tree_map, tree_nbytes, tree_unstack

SPECS = [{"name": "random_k", "ratio": 0.3}, {"name": "random_k", "k": 4, "scaling": "biased"},
         {"name": "qsgd", "levels": 4}, {"name": "qsgd", "levels": 1, "variant": "contractive"},
         {"name": "sign"}, {"name": "natural"}]
RANDOMIZED = [s for s in SPECS if s["name"] != "sign"]
SAMPLES = 4000
KEY = torch.tensor([12345, 2**32 - 7])


def codec(spec: dict, scope: str = "model"):
    return build_codec({**spec, "scope": scope}, "codec")


def message(seed: int = 0, batch: tuple[int, ...] = ()) -> dict:
    """A nested message with leaves of odd sizes."""
    g = torch.Generator().manual_seed(seed)
    return {"delta": {"w": torch.randn(*batch, 7, 5, generator=g), "b": torch.randn(*batch, 5, generator=g)},
            "control": torch.randn(*batch, 3, generator=g)}


def keys(n: int) -> torch.Tensor:
    return torch.stack([torch.arange(n), torch.full((n,), 99)], dim=1)


def samples(spec: dict, x: torch.Tensor, n: int = SAMPLES) -> torch.Tensor:
    """C(x) under n keys, (n, d): one vmapped encode and decode."""
    c = codec(spec)
    template = {"x": x}
    payload, _ = vmap(c.encode, in_dims=(None, None, 0))(template, {}, keys(n))
    return vmap(c.decode, in_dims=(0, None, None))(payload, template, {})[0]["x"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16}[t.dtype]) \
        if t.is_floating_point() else t


def assert_bitwise_equal(a: dict, b: dict) -> None:
    for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))


TEMPLATES = [
    message(),
    {"v": torch.randn(1)},
    {"v": torch.randn(8), "u": torch.randn(9)},
    {"v": torch.randn(1000).double(), "u": torch.randn(3)},  # model scope promotes to float64
    {"v": torch.randn(33).half(), "e": torch.empty(0)},
]


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_payload_bytes_are_the_payload_tensors_bytes(spec, scope):
    c = codec(spec, scope)
    for template in TEMPLATES:
        payload, _ = c.encode(template, c.init(template), KEY)
        assert c.payload_bytes(template) == tree_nbytes(payload)
        assert_bitwise_equal(tree_map(torch.zeros_like, c.decode(payload, template, {})[0]),
                             tree_map(torch.zeros_like, template))  # shapes and dtypes of the template


@pytest.mark.parametrize(("spec", "expected"), [
    ({"name": "random_k", "ratio": 0.1}, 8 + 10 * 4),  # key + k float32 values
    ({"name": "qsgd", "levels": 4}, 4 + math.ceil(100 * 4 / 8)),  # norm + (3 level bits + sign) per entry
    ({"name": "qsgd", "levels": 3}, 4 + math.ceil(100 * 3 / 8)),
    ({"name": "sign"}, 4 + math.ceil(100 / 8)),  # scale + a bit per entry
    ({"name": "natural"}, math.ceil(100 * 9 / 8)),  # sign + 8 exponent bits per entry
])
def test_bytes_of_100_float32_entries(spec, expected):
    assert codec(spec).payload_bytes({"v": torch.zeros(100)}) == expected


def test_natural_exponent_codes_fit_each_float_format():
    nat = codec({"name": "natural"})
    assert [nat.payload_bytes({"v": torch.zeros(8, dtype=dt)}) for dt in
            (torch.float16, torch.bfloat16, torch.float64)] == [6, 9, 12]


@pytest.mark.parametrize("spec", [{"name": "random_k", "ratio": 0.25}, {"name": "qsgd", "levels": 2},
                                  {"name": "qsgd", "levels": 1}, {"name": "natural"}], ids=lambda s: str(s))
def test_unbiased_compressors_average_to_x_over_many_keys(spec):
    x = torch.randn(24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = samples(spec, x)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(SAMPLES)
    assert (draws != x).any()
    assert ((mean - x).abs() <= 4.5 * se + 1e-12).all()


@pytest.mark.parametrize(("spec", "delta"), [
    ({"name": "random_k", "k": 6, "scaling": "biased"}, lambda x: 6 / 24),
    ({"name": "qsgd", "levels": 1, "variant": "contractive"}, lambda x: 1 / (min(24, math.sqrt(24)) + 1)),
    ({"name": "qsgd", "levels": 3, "variant": "contractive"}, lambda x: 1 / (min(24 / 9, math.sqrt(24) / 3) + 1)),
    ({"name": "sign"}, lambda x: float(x.abs().sum() ** 2 / (24 * x.square().sum()))),
], ids=lambda s: str(s))
def test_contractive_compressors_keep_the_expected_error_below_one_minus_delta(spec, delta):
    for seed in range(3):
        x = torch.randn(24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        errors = (samples(spec, x, 1000) - x).square().sum(1)
        bound = (1 - delta(x)) * float(x.square().sum())
        assert errors.mean() <= bound + 3 * errors.std() / math.sqrt(1000) + 1e-12


def test_scaled_sign_is_the_l1_mean_with_the_signs_of_x():
    x = torch.tensor([-2.0, 0.5, 0.0, 3.5, -1e-30])
    out = samples({"name": "sign"}, x, 1)[0]
    assert torch.equal(out, torch.tensor([-1.2, 1.2, 1.2, 1.2, -1.2]))  # zeros go as +


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_natural_compression_sends_one_of_the_two_nearest_powers_of_two(dtype):
    x = (torch.randn(500, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    x[:3] = torch.tensor([0.0, -0.0, 0.25])
    out = samples({"name": "natural"}, x, 1)[0]
    assert out.dtype == dtype and torch.equal(out[:3], torch.tensor([0.0, 0.0, 0.25], dtype=dtype))
    nonzero = x != 0
    mantissa, exponent = torch.frexp(out[nonzero].double())
    assert (mantissa.abs() == 0.5).all() and torch.equal(out[nonzero].sign(), x[nonzero].sign())
    lower = torch.frexp(x[nonzero].double())[1] - 1
    assert ((exponent - 1 == lower) | (exponent - 1 == lower + 1)).all()


def test_natural_compression_sends_subnormals_to_zero_or_the_smallest_normal():
    tiny = torch.finfo(torch.float32).smallest_normal
    draws = samples({"name": "natural"}, torch.tensor([tiny / 4, -tiny / 2]), 2000)
    assert set(draws[:, 0].tolist()) == {0.0, tiny} and set(draws[:, 1].tolist()) == {0.0, -tiny}
    assert draws[:, 0].eq(tiny).float().mean() == pytest.approx(0.25, abs=0.04)


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("scaling", ["biased", "unbiased"])
def test_random_k_with_ratio_1_is_lossless_bit_for_bit(scope, scaling):
    m = message()
    m["delta"]["b"][:2] = torch.tensor([-0.0, 1e-45])
    c = codec({"name": "random_k", "ratio": 1.0, "scaling": scaling}, scope)
    payload, _ = c.encode(m, c.init(m), KEY)
    assert_bitwise_equal(c.decode(payload, m, {})[0], m)


def test_random_k_sends_k_distinct_entries_scaled_by_d_over_k_when_unbiased():
    x = torch.arange(1.0, 21.0)
    out = samples({"name": "random_k", "k": 5}, x, 50)
    assert ((out != 0).sum(1) == 5).all()
    assert torch.equal(out[out != 0], (x * 4).expand(50, 20)[out != 0])


def test_random_k_keeps_the_k_largest_scores_splitmix64_outputs_with_the_index_in_their_low_bits():
    d, k, key = 37, 5, KEY
    index_bits = (d - 1).bit_length()
    scores = [(o & -(1 << index_bits)) | i for i, o in enumerate(keyed_random.splitmix64(key, d).tolist())]
    expected = sorted(range(d), key=lambda i: scores[i], reverse=True)[:k]
    assert _random_indices(key, d, k).tolist() == expected


def test_random_k_keeps_every_entry_equally_often():
    d, k, n = 12, 3, 6000
    chosen = vmap(lambda key: _random_indices(key, d, k))(keys(n))
    assert (chosen.sort(dim=1).values.diff(dim=1) > 0).all()
    frequency = torch.bincount(chosen.reshape(-1), minlength=d) / n
    assert ((frequency - k / d).abs() < 4.5 * math.sqrt(k / d * (1 - k / d) / n)).all()


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("variant", ["unbiased", "contractive"])
def test_qsgd_with_a_huge_number_of_levels_is_near_identity(scope, variant):
    m = message()
    c = codec({"name": "qsgd", "levels": 2**31 - 1, "variant": variant}, scope)
    payload, _ = c.encode(m, c.init(m), KEY)
    for got, want in zip(tree_leaves(c.decode(payload, m, {})[0]), tree_leaves(m), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_qsgd_levels_are_multiples_of_the_norm_over_s():
    x = torch.randn(40, generator=torch.Generator().manual_seed(3))
    out = samples({"name": "qsgd", "levels": 5}, x, 20)
    steps = out * 5 / x.norm()
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-5)
    assert (steps.abs() <= 5 + 1e-5).all() and ((out == 0) | (out.sign() == x.sign())).all()


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_vmapped_encode_and_decode_equal_a_loop_bit_for_bit(spec, scope):
    clients = 4
    c, template = codec(spec, scope), message()
    batch, batch_keys = message(5, (clients,)), keys(clients)
    payloads, _ = vmap(c.encode, in_dims=(0, None, 0))(batch, {}, batch_keys)
    decoded = vmap(c.decode, in_dims=(0, None, None))(payloads, template, {})[0]
    for i, m in enumerate(tree_unstack(batch, clients)):
        payload, _ = c.encode(m, {}, batch_keys[i])
        assert_bitwise_equal(tree_unstack(payloads, clients)[i], payload)
        assert_bitwise_equal(tree_unstack(decoded, clients)[i], c.decode(payload, template, {})[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("spec", RANDOMIZED, ids=lambda s: "-".join(map(str, s.values())))
def test_vmap_equals_a_loop_on_messages_longer_than_a_chunk_of_draws(spec, dtype):
    clients, d = 3, 2 * keyed_random.CHUNK + 3
    c, template = codec(spec), {"v": torch.zeros(d, dtype=dtype)}
    batch = {"v": torch.randn(clients, d, generator=torch.Generator().manual_seed(4)).to(dtype)}
    payloads, _ = vmap(c.encode, in_dims=(0, None, 0))(batch, {}, keys(clients))
    decoded = vmap(c.decode, in_dims=(0, None, None))(payloads, template, {})[0]
    for i, m in enumerate(tree_unstack(batch, clients)):
        payload, _ = c.encode(m, {}, keys(clients)[i])
        assert_bitwise_equal(tree_unstack(payloads, clients)[i], payload)
        assert_bitwise_equal(tree_unstack(decoded, clients)[i], c.decode(payload, template, {})[0])


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("spec", RANDOMIZED, ids=lambda s: "-".join(map(str, s.values())))
def test_the_same_key_repeats_the_draws_and_another_key_changes_them(spec, scope):
    c, m = codec(spec, scope), message()
    first, again, other = (c.decode(c.encode(m, {}, k)[0], m, {})[0] for k in (KEY, KEY.clone(), KEY + 1))
    assert_bitwise_equal(first, again)
    assert any(not torch.equal(a, b) for a, b in zip(tree_leaves(first), tree_leaves(other), strict=True))


def test_tensor_scope_draws_each_leaf_from_its_own_key():
    c = codec({"name": "random_k", "k": 3, "scaling": "biased"}, "tensor")
    m = {"a": torch.arange(1.0, 31.0), "b": torch.arange(1.0, 31.0)}
    out = c.decode(c.encode(m, {}, KEY)[0], m, {})[0]
    assert not torch.equal(out["a"], out["b"])


@pytest.mark.parametrize(("spec", "field"), [
    ({"name": "random_k", "ratio": 0.0}, "compression.uplink.ratio: "),
    ({"name": "random_k", "ratio": 1.5}, "compression.uplink.ratio: "),
    ({"name": "random_k", "k": 0}, "compression.uplink.k: "),
    ({"name": "random_k"}, "compression.uplink: give exactly one of ratio and k"),
    ({"name": "random_k", "k": 2, "scaling": "rescaled"}, "compression.uplink.scaling: "),
    ({"name": "qsgd", "levels": 0}, "compression.uplink.levels: "),
    ({"name": "qsgd", "levels": 2.5}, "compression.uplink.levels: "),
    ({"name": "qsgd"}, "compression.uplink.levels: missing"),
    ({"name": "qsgd", "levels": 2, "variant": "biased"}, "compression.uplink.variant: "),
    ({"name": "sign", "scope": "layer"}, "compression.uplink.scope: "),
    ({"name": "natural", "levels": 3}, "compression.uplink.levels: unknown field"),
])
def test_bad_compressor_settings_are_one_line_scenario_errors_naming_the_field(spec, field):
    with pytest.raises(ScenarioError) as err:
        build_codec(spec, "compression.uplink")
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


@pytest.mark.parametrize("uplink", [
    {"name": "random_k", "ratio": 0.2},
    {"name": "qsgd", "levels": 4, "variant": "contractive", "scope": "tensor", "error_feedback": True},
    {"name": "sign"},
    {"name": "natural", "scope": "tensor"},
], ids=lambda s: s["name"])
def test_sequential_and_vectorized_runtimes_agree_with_each_compressor(tiny, uplink):
    scenario = {**tiny, "rounds": 3, "num_clients": 5, "compression": {"uplink": uplink}}
    rows = assert_runtimes_agree(lambda runtime: {**scenario, "runtime": runtime})
    assert rows["sequential"][-1]["bytes_up"] == rows["vectorized"][-1]["bytes_up"] > 0
