"""Generated populations: clients drawn on demand from (seed, k), sizes known up front, memory bounded."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from fedsim.data import DATASETS, build_federated_data
from fedsim.data.build import data_rng
from fedsim.data.population import GeneratedPopulation, PopulationParams


def _population(num_clients: int = 1000, seed: int = 0, **params: object) -> GeneratedPopulation:
    return GeneratedPopulation(PopulationParams(**params), num_clients, data_rng(seed))


def _client(pop: GeneratedPopulation, k: int) -> list[torch.Tensor]:
    return [*pop.client_train(k), *pop.client_test(k)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_client_data_depend_only_on_seed_and_index_not_on_access_order() -> None:
    forward, backward = _population(cache_clients=0), _population(cache_clients=0)
    ks = [0, 17, 999, 500, 3]
    first = {k: _client(forward, k) for k in ks}
    second = {k: _client(backward, k) for k in reversed(ks)}
    assert all(_same(first[k], second[k]) for k in ks)
    assert _same(_client(forward, 17), first[17])


def test_different_clients_and_different_seeds_differ() -> None:
    pop = _population()
    x0, x1 = pop.client_train(0)[0], pop.client_train(1)[0]
    assert not torch.equal(x0[: len(x1)], x1[: len(x0)])
    other = _population(seed=1)
    assert not np.array_equal(pop.train_sizes, other.train_sizes)
    assert not torch.equal(pop.client_train(5)[0][:1], other.client_train(5)[0][:1])


def test_a_population_is_a_prefix_of_a_larger_one_with_the_same_seed() -> None:
    small, large = _population(100), _population(10_000)
    assert np.array_equal(small.train_sizes, large.train_sizes[:100])
    assert _same(_client(small, 42), _client(large, 42))


def test_sizes_are_known_up_front_and_served_as_announced() -> None:
    pop = _population(500, test_fraction=0.2, min_samples=5, max_samples=80)
    total = pop.train_sizes + pop.test_sizes
    assert pop.train_sizes.dtype == np.int64 and len(total) == pop.num_clients == 500
    assert total.min() >= 5 and total.max() <= 80
    assert np.array_equal(pop.train_sizes, (total * 0.8).astype(np.int64))
    for k in (0, 7, 499):
        (xa, ya), (xb, yb) = pop.client_train(k), pop.client_test(k)
        assert (len(xa), len(ya), len(xb), len(yb)) == (pop.train_sizes[k], pop.train_sizes[k],
                                                        pop.test_sizes[k], pop.test_sizes[k])
        assert xa.dtype == torch.float32 and ya.dtype == torch.int64 and tuple(xa.shape[1:]) == pop.feature_shape
        assert 0 <= int(ya.min()) and int(ya.max()) < pop.num_classes


def test_max_samples_caps_a_heavy_tailed_size_draw() -> None:
    uncapped = _population(2000, size_mean=4, size_sigma=2, max_samples=10**9)
    capped = _population(2000, size_mean=4, size_sigma=2, max_samples=200)
    assert (uncapped.train_sizes + uncapped.test_sizes).max() > 10_000
    assert (capped.train_sizes + capped.test_sizes).max() == 200


def test_beta_spreads_the_clients_feature_means() -> None:
    def spread(beta: float) -> float:
        pop = _population(200, beta=beta)
        return float(np.std([pop.client_train(k)[0].mean().item() for k in range(200)]))

    assert spread(5.0) > 3 * spread(0.0)


def test_lru_cache_is_bounded_and_keeps_the_most_recent_clients() -> None:
    pop = _population(cache_clients=8)
    first = pop.client_train(0)[0]
    served = {k: pop.client_train(k)[0] for k in range(1, 50)}
    assert pop.cached_clients == 8
    assert pop.client_train(49)[0] is served[49]
    again = pop.client_train(0)[0]
    assert again is not first and torch.equal(again, first)
    assert pop.cached_clients == 8


def test_million_clients_are_served_in_memory_far_below_the_materialised_population() -> None:
    tracemalloc.start()
    try:
        pop = _population(1_000_000, seed=3)
        for k in np.random.default_rng(0).integers(0, pop.num_clients, 3000):
            pop.client_train(int(k)), pop.client_test(int(k))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    samples = int(pop.train_sizes.sum() + pop.test_sizes.sum())
    materialised = samples * (pop.feature_shape[0] * 4 + 8)
    assert materialised > 5 * 2**30
    assert peak < materialised / 100


def test_registered_as_a_lazy_natural_data_set_the_builder_returns_as_is() -> None:
    entry = DATASETS.get("synthetic_population")
    assert entry.meta["natural"] and entry.meta["lazy"]
    built = build_federated_data("synthetic_population", {"num_features": 20}, "natural", None, 300, seed=4)
    direct = _population(300, seed=4, num_features=20)
    assert isinstance(built, GeneratedPopulation) and built.feature_shape == (20,)
    assert np.array_equal(built.train_sizes, direct.train_sizes)
    assert _same(_client(built, 299), _client(direct, 299))


def test_client_out_of_range_is_an_error() -> None:
    with pytest.raises(IndexError):
        _population(10).client_train(10)
