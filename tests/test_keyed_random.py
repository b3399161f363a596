"""Keyed random draws: Philox matches Random123 and SplitMix64 its reference, vmap draws what a loop draws (across
SplitMix64's chunks too), and the numbers are well distributed."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

from fedsim import keyed_random
from fedsim.keyed_random import (
    _unit_float,
    fast_uniform,
    fold_in,
    key_from_seed,
    mix64_,
    normal,
    philox4x32,
    splitmix64,
    tree_normal,
    uniform,
)
from fedsim.params import tree_leaves

# Random123 tests/kat_vectors (DEShawResearch/random123 @ 9545ff64), rows "philox4x32 R": counter[4] key[2] -> out[4].
_KAT = {
    10: [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ],
    7: [
        ([0, 0, 0, 0], [0, 0], [0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A]),
    ],
}
N = 100_000


def _keys(*seeds: int) -> torch.Tensor:
    return torch.stack([key_from_seed(s) for s in seeds])


def _reference_philox(counter: list[int], key: list[int], rounds: int) -> list[int]:
    """Philox4x32 on Python ints, independent of torch's int64 arithmetic."""
    c, k = list(counter), list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + 0x9E3779B9) % 2**32, (k[1] + 0xBB67AE85) % 2**32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 % 2**32, (p0 >> 32) ^ c[3] ^ k[1], p0 % 2**32]
    return c


def _ks_statistic(draws: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of `draws` and `cdf`."""
    x = draws.double().sort().values
    f = cdf(x)
    i = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    return max(float((i / x.numel() - f).max()), float((f - (i - 1) / x.numel()).max()))


_KS_CRITICAL = math.sqrt(-0.5 * math.log(0.001 / 2)) / math.sqrt(N)  # alpha = 0.001


@pytest.mark.parametrize("rounds", [10, 7])
def test_philox_matches_random123_known_answers(rounds):
    counters, keys, expected = (torch.tensor(list(col), dtype=torch.int64) for col in zip(*_KAT[rounds], strict=True))
    assert philox4x32(counters, keys, rounds).tolist() == expected.tolist()


def test_philox_matches_a_pure_python_reference_on_random_words():
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (200, 4), generator=g, dtype=torch.int64)
    keys = torch.randint(0, 2**32, (200, 2), generator=g, dtype=torch.int64)
    expected = [_reference_philox(c, k, 10) for c, k in zip(counters.tolist(), keys.tolist(), strict=True)]
    assert philox4x32(counters, keys).tolist() == expected


def test_philox_broadcasts_one_key_over_many_counters():
    counters = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    key = torch.tensor([5, 2**32 - 1], dtype=torch.int64)
    assert philox4x32(counters, key).tolist() == [_reference_philox(c, key.tolist(), 10) for c in counters.tolist()]


def test_philox_under_vmap_equals_the_batched_call():
    counters, keys, _ = (torch.tensor(list(col), dtype=torch.int64) for col in zip(*_KAT[10], strict=True))
    assert torch.equal(vmap(philox4x32)(counters, keys), philox4x32(counters, keys))
    assert torch.equal(vmap(philox4x32, in_dims=(None, 0))(counters[2], keys), philox4x32(counters[2], keys))


def test_philox_refuses_zero_rounds():
    with pytest.raises(ValueError, match="at least one round"):
        philox4x32(torch.zeros(4, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), rounds=0)


def test_key_from_seed_holds_the_low_and_high_words():
    assert key_from_seed(2**40 + 5).tolist() == [5, 2**8]
    assert key_from_seed(2**64 - 1).tolist() == [2**32 - 1, 2**32 - 1]
    with pytest.raises(ValueError, match="seed"):
        key_from_seed(-1)


@pytest.mark.parametrize("draw", [uniform, normal])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmap_over_keys_and_salts_draws_what_a_loop_draws(draw, dtype):
    keys, salts = _keys(0, 1, 2**40 + 3, 2**63 - 1), torch.tensor([0, 7, 2**33, 7])
    batched = vmap(lambda k, s: draw(k, s, (3, 5), dtype))(keys, salts)
    looped = torch.stack([draw(k, s, (3, 5), dtype) for k, s in zip(keys, salts, strict=True)])
    assert batched.dtype == dtype and torch.equal(batched, looped)
    shared_salt = vmap(lambda k: draw(k, 9, (7,), dtype))(keys)
    assert torch.equal(shared_salt, torch.stack([draw(k, 9, (7,), dtype) for k in keys]))


def test_vmap_over_keys_draws_the_tree_a_loop_draws():
    like = {"w": torch.zeros(3, 2), "inner": {"b": torch.zeros(3), "c": torch.zeros(2, 3, dtype=torch.float64)}}
    keys, salts = _keys(4, 5, 6), torch.tensor([1, 1, 2])
    batched = vmap(tree_normal, in_dims=(0, 0, None))(keys, salts, like)
    for i, (k, s) in enumerate(zip(keys, salts, strict=True)):
        for got, want in zip(tree_leaves(batched), tree_leaves(tree_normal(k, s, like)), strict=True):
            assert torch.equal(got[i], want)


def test_fold_in_under_vmap_equals_a_loop_and_depends_on_key_and_data():
    keys, data = _keys(1, 2, 3), torch.tensor([0, 5, 2**40])
    batched = vmap(fold_in)(keys, data)
    assert torch.equal(batched, torch.stack([fold_in(k, int(d)) for k, d in zip(keys, data, strict=True)]))
    assert batched.shape == (3, 2) and ((batched >= 0) & (batched < 2**32)).all()
    assert len({tuple(fold_in(key_from_seed(1), d).tolist()) for d in range(50)}) == 50
    assert not torch.equal(fold_in(key_from_seed(1), 3), fold_in(key_from_seed(2), 3))


def test_draws_are_a_pure_function_of_key_salt_and_shape():
    key = key_from_seed(123)
    assert torch.equal(normal(key, 4, (100,)), normal(key_from_seed(123), torch.tensor(4), (100,)))
    assert torch.equal(uniform(key, 4, (10, 10), torch.float64), uniform(key, 4, (10, 10), torch.float64))


@pytest.mark.parametrize("other", [(2, 0), (1, 1), (1, 2**32)], ids=["key", "salt", "salt-high-word"])
def test_different_keys_or_salts_give_different_draws(other):
    base = uniform(key_from_seed(1), 0, (1000,))
    changed = uniform(key_from_seed(other[0]), other[1], (1000,))
    assert (base == changed).float().mean() < 0.01


def test_tree_leaves_of_one_shape_draw_independently_and_keep_dtype_and_structure():
    like = {"a": torch.zeros(50_000), "b": {"c": torch.zeros(50_000), "d": torch.zeros(2, 2, dtype=torch.float64)}}
    noise = tree_normal(key_from_seed(8), 0, like)
    assert noise.keys() == like.keys() and noise["b"].keys() == like["b"].keys()
    assert [(v.shape, v.dtype) for v in tree_leaves(noise)] == [(v.shape, v.dtype) for v in tree_leaves(like)]
    a, c = noise["a"], noise["b"]["c"]
    assert abs(float(torch.corrcoef(torch.stack([a, c]))[0, 1])) < 0.02
    assert not torch.equal(a, normal(key_from_seed(8), 0, (50_000,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_is_strictly_inside_the_unit_interval_and_uniform(dtype):
    u = uniform(key_from_seed(11), 3, (N,), dtype)
    assert u.dtype == dtype and u.min() > 0 and u.max() < 1
    assert _ks_statistic(u, lambda x: x) < _KS_CRITICAL


def test_extreme_words_map_strictly_inside_the_unit_interval():
    ends = torch.tensor([0, 2**32 - 1], dtype=torch.int64)
    assert _unit_float(ends, torch.float32).tolist() == [2.0**-24, 1 - 2.0**-24]
    assert _unit_float(ends.repeat_interleave(2), torch.float64).tolist() == [2.0**-53, 1 - 2.0**-53]


def test_float64_uniforms_carry_more_bits_than_float32():
    u = uniform(key_from_seed(12), 0, (1000,), torch.float64)
    assert (u != u.float().double()).float().mean() > 0.99


def test_unsupported_dtypes_are_refused():
    with pytest.raises(ValueError, match="float32 and float64"):
        uniform(key_from_seed(0), 0, (3,), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_has_unit_moments_and_passes_kolmogorov_smirnov(dtype):
    z = normal(key_from_seed(13), 5, (N,), dtype)
    assert z.dtype == dtype and z.shape == (N,)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert _ks_statistic(z, torch.special.ndtr) < _KS_CRITICAL


def test_normal_is_box_muller_on_consecutive_uniform_pairs_using_both_outputs():
    u = uniform(key_from_seed(14), 2, (2000,), torch.float64)
    z = normal(key_from_seed(14), 2, (2000,), torch.float64)
    radius, angle = torch.sqrt(-2 * torch.log(u[0::2])), 2 * math.pi * u[1::2]
    assert torch.allclose(z[0::2], radius * torch.cos(angle)) and torch.allclose(z[1::2], radius * torch.sin(angle))
    assert abs(float(torch.corrcoef(normal(key_from_seed(15), 0, (N,)).reshape(-1, 2).T)[0, 1])) < 0.02


def test_draws_for_a_smaller_shape_are_a_prefix_of_a_larger_ones():
    assert torch.equal(normal(key_from_seed(14), 0, (3, 3)).reshape(-1), normal(key_from_seed(14), 0, (10,))[:9])
    assert torch.equal(uniform(key_from_seed(14), 0, (5,), torch.float64), uniform(key_from_seed(14), 0, (8,),
                                                                                     torch.float64)[:5])


# Vigna's splitmix64.c (prng.di.unimi.it): the first outputs of next() from state 1234567 and from state 0.
_SPLITMIX_REFERENCE = {1234567: [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                 4593380528125082431, 16408922859458223821],
                       0: [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]}


def _reference_splitmix64(seed: int, n: int) -> list[int]:
    """SplitMix64 on Python ints: next() n times from state `seed`."""
    out, mask = [], 2**64 - 1
    for i in range(1, n + 1):
        z = (seed + i * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def _unsigned(words: torch.Tensor) -> list[int]:
    return [w % 2**64 for w in words.tolist()]


@pytest.mark.parametrize("seed", sorted(_SPLITMIX_REFERENCE))
def test_splitmix64_matches_the_reference_outputs(seed):
    expected = _SPLITMIX_REFERENCE[seed]
    assert _unsigned(splitmix64(key_from_seed(seed), len(expected))) == expected


def test_splitmix64_matches_a_pure_python_reference_across_chunks():
    n, seed = 2 * keyed_random.CHUNK + 5, 2**63 + 2**40 + 17
    assert _unsigned(splitmix64(key_from_seed(seed), n)) == _reference_splitmix64(seed, n)
    assert torch.equal(splitmix64(key_from_seed(seed), 7), splitmix64(key_from_seed(seed), n)[:7])


def test_mix64_works_in_place_on_the_tensor_it_is_given():
    z = torch.tensor([1, -1, 2**62])
    out = mix64_(z)
    assert out is z and _unsigned(out) == [_reference_splitmix64(x % 2**64 - 0x9E3779B97F4A7C15, 1)[0]
                                          for x in (1, -1, 2**62)]


def test_splitmix64_hands_each_chunk_and_its_positions_to_then():
    n, key = keyed_random.CHUNK + 3, key_from_seed(5)
    seen = []
    out = splitmix64(key, n, lambda z, i: (seen.append(i.tolist()), z ^ i)[1])
    assert [s[0] for s in seen] == [0, keyed_random.CHUNK] and sum(map(len, seen)) == n
    assert torch.equal(out, splitmix64(key, n) ^ torch.arange(n))
    assert splitmix64(key, 0).shape == (0,) and fast_uniform(key, (0,)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_uniform_under_vmap_equals_a_loop_across_chunks(dtype):
    keys = _keys(0, 1, 2**40 + 3, 2**64 - 1)
    shape = (3, keyed_random.CHUNK + 1)  # more than one chunk of outputs in either dtype
    batched = vmap(lambda k: fast_uniform(k, shape, dtype))(keys)
    assert batched.dtype == dtype and torch.equal(batched, torch.stack([fast_uniform(k, shape, dtype) for k in keys]))
    assert torch.equal(vmap(lambda k: splitmix64(k, 2500))(keys), torch.stack([splitmix64(k, 2500) for k in keys]))


def test_fast_uniform_takes_the_top_bits_of_each_half_of_an_output_for_float32_and_of_the_whole_for_float64():
    seed = 99
    words = _reference_splitmix64(seed, 3)
    halves = [h for w in words for h in (w >> 32, w & 0xFFFFFFFF)]
    assert fast_uniform(key_from_seed(seed), (5,)).tolist() == [((h >> 9) * 2 + 1) * 2.0**-24 for h in halves[:5]]
    assert fast_uniform(key_from_seed(seed), (3,), torch.float64).tolist() == [((w >> 12) * 2 + 1) * 2.0**-53
                                                                               for w in words]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_uniform_is_strictly_inside_the_unit_interval_and_uniform(dtype):
    u = fast_uniform(key_from_seed(21), (N,), dtype)
    assert u.dtype == dtype and u.min() > 0 and u.max() < 1
    assert _ks_statistic(u, lambda x: x) < _KS_CRITICAL
    pairs = u[: N // 2 * 2].reshape(-1, 2).double().T  # the two halves of one output are uncorrelated
    assert abs(float(torch.corrcoef(pairs)[0, 1])) < 0.02


def test_fast_uniform_streams_of_neighbouring_keys_are_unrelated():
    a, b = fast_uniform(key_from_seed(1), (N,)), fast_uniform(key_from_seed(2), (N,))
    assert (a == b).float().mean() < 0.001 and abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02
    assert _ks_statistic((a - b).abs(), lambda x: 1 - (1 - x) ** 2) < _KS_CRITICAL  # |U - V| of independent U, V


def test_fast_uniform_refuses_unsupported_dtypes():
    with pytest.raises(ValueError, match="float32 and float64"):
        fast_uniform(key_from_seed(0), (3,), torch.float16)
