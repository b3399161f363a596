"""Partitioners (iid, labeldir, hsu_dirichlet, shards, quantity, natural) and the builder's central-data path."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import DATASETS, PARTITIONERS, build_federated_data
from fedsim.data.build import data_rng, split_train_test
from fedsim.data.partition import (
    DirichletParams,
    HsuDirichletParams,
    QuantityParams,
    ShardsParams,
    apportion,
    hsu_dirichlet,
    iid,
    labeldir,
    quantity,
    shards,
)
from fedsim.errors import DataError, ScenarioError
from fedsim.registry import NoParams

LABELS = np.repeat(np.arange(10), 100)  # 10 classes x 100 samples


def _partition(name: str, labels: np.ndarray, num_clients: int, seed: int = 0, **params) -> list[np.ndarray]:
    entry, validated = PARTITIONERS.resolve({"name": name, **params}, "partition")
    return entry.obj(labels, num_clients, np.random.default_rng(seed), validated)


def _classes_per_client(parts: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    return np.array([len(np.unique(labels[p])) for p in parts])


def _size_cv(parts: list[np.ndarray]) -> float:
    sizes = np.array([len(p) for p in parts])
    return float(sizes.std() / sizes.mean())


CASES = [
    ("iid", {}),
    ("labeldir", {"alpha": 0.3}),
    ("labeldir", {"alpha": 100.0, "min_size": 10}),
    ("hsu_dirichlet", {"alpha": 0.1}),
    ("hsu_dirichlet", {"alpha": 100.0}),
    ("shards", {"shards_per_client": 3}),
    ("quantity", {"distribution": "lognormal", "sigma": 1.5}),
    ("quantity", {"distribution": "powerlaw", "exponent": 1.2}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
def test_partition_is_disjoint_and_covers_every_sample_once(name, params):
    labels = np.random.default_rng(9).permutation(LABELS)
    parts = _partition(name, labels, 20, **params)
    assert len(parts) == 20
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))


@pytest.mark.parametrize(("name", "params"), CASES)
def test_partition_is_deterministic_for_a_seed_and_changes_with_it(name, params):
    a, b = _partition(name, LABELS, 20, 1, **params), _partition(name, LABELS, 20, 1, **params)
    c = _partition(name, LABELS, 20, 2, **params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one_and_mix_all_classes():
    parts = iid(LABELS, 7, np.random.default_rng(0), NoParams())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _classes_per_client(parts, LABELS).min() >= 9


def test_labeldir_small_alpha_gives_fewer_classes_per_client_than_large_alpha():
    skewed = labeldir(LABELS, 20, np.random.default_rng(0), DirichletParams(alpha=0.1))
    uniform = labeldir(LABELS, 20, np.random.default_rng(0), DirichletParams(alpha=100.0))
    assert _classes_per_client(skewed, LABELS).mean() < 5
    assert _classes_per_client(uniform, LABELS).min() == 10


def test_labeldir_large_alpha_gives_each_client_about_an_equal_share_of_every_class():
    parts = labeldir(LABELS, 10, np.random.default_rng(0), DirichletParams(alpha=1000.0))
    counts = np.array([np.bincount(LABELS[p], minlength=10) for p in parts])
    assert np.abs(counts - 10).max() <= 4


def test_labeldir_gives_every_client_at_least_min_size_samples():
    for seed in range(5):
        parts = labeldir(LABELS, 40, np.random.default_rng(seed), DirichletParams(alpha=0.2, min_size=8))
        assert min(len(p) for p in parts) >= 8


def test_labeldir_that_cannot_reach_min_size_raises_naming_alpha():
    with pytest.raises(DataError, match=r"^partition\.alpha: .*100 clients >= 5 samples"):
        labeldir(LABELS, 100, np.random.default_rng(0), DirichletParams(alpha=0.001, min_size=5))


def test_hsu_dirichlet_keeps_client_sizes_equal_while_labeldir_sizes_swing_with_alpha():
    skewed = np.random.default_rng(5).permutation(np.repeat(np.arange(10), [40, 60, 80, 100, 120] * 2))
    for alpha in (0.05, 0.5, 5.0):
        sizes = [len(p) for p in hsu_dirichlet(skewed, 30, np.random.default_rng(1), HsuDirichletParams(alpha=alpha))]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(skewed)
    swing = [_size_cv(labeldir(skewed, 30, np.random.default_rng(1), DirichletParams(alpha=a))) for a in (0.1, 100.0)]
    assert swing[0] > 0.5 > 0.1 > swing[1]


def test_hsu_dirichlet_small_alpha_concentrates_classes_and_large_alpha_follows_the_global_mix():
    skewed = hsu_dirichlet(LABELS, 20, np.random.default_rng(0), HsuDirichletParams(alpha=0.05))
    mixed = hsu_dirichlet(LABELS, 20, np.random.default_rng(0), HsuDirichletParams(alpha=1000.0))
    assert _classes_per_client(skewed, LABELS).mean() < 5 < 9.5 < _classes_per_client(mixed, LABELS).mean()

    def mean_share_gap(parts: list[np.ndarray]) -> float:  # against the global mix, 0.1 per class
        return float(np.mean([np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - 0.1) for p in parts]))

    assert mean_share_gap(mixed) < 0.05 < 0.1 < mean_share_gap(skewed)


def test_labeldir_with_fewer_samples_than_clients_times_min_size_raises_naming_num_clients():
    with pytest.raises(DataError, match=r"^num_clients: 600 clients but only 1000 samples .*min_size 2"):
        labeldir(LABELS, 600, np.random.default_rng(0), DirichletParams(alpha=1.0))


def test_shards_give_each_client_at_most_shards_per_client_classes_and_equal_sizes():
    parts = shards(LABELS, 25, np.random.default_rng(0), ShardsParams(shards_per_client=2))
    assert _classes_per_client(parts, LABELS).max() <= 2
    assert {len(p) for p in parts} == {40}


def test_shards_with_one_shard_each_give_single_class_clients():
    parts = shards(LABELS, 50, np.random.default_rng(0), ShardsParams(shards_per_client=1))
    assert set(_classes_per_client(parts, LABELS)) == {1}


def test_sorted_shards_give_labels_rising_with_the_client_number_whatever_the_seed():
    labels = np.random.default_rng(9).permutation(LABELS)
    params = ShardsParams(shards_per_client=2, deal="sorted")
    parts = shards(labels, 20, np.random.default_rng(0), params)
    assert [np.unique(labels[p]).tolist() for p in parts] == [[k // 2] for k in range(20)]
    again = shards(labels, 20, np.random.default_rng(1), params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_shards_with_fewer_samples_than_shards_raise_naming_shards_per_client():
    with pytest.raises(DataError, match=r"^partition\.shards_per_client: 400 clients x 3 shards = 1200"):
        shards(LABELS, 400, np.random.default_rng(0), ShardsParams(shards_per_client=3))


def test_quantity_skew_sizes_are_more_unequal_than_iid_and_grow_with_sigma():
    even = iid(LABELS, 30, np.random.default_rng(0), NoParams())
    mild = quantity(LABELS, 30, np.random.default_rng(0), QuantityParams(sigma=0.3))
    wild = quantity(LABELS, 30, np.random.default_rng(0), QuantityParams(sigma=2.0))
    assert _size_cv(even) < 0.05 < _size_cv(mild) < _size_cv(wild)
    assert _size_cv(wild) > 1.0


def test_quantity_powerlaw_sizes_have_a_heavy_tail():
    params = QuantityParams(distribution="powerlaw", exponent=1.1)
    parts = quantity(LABELS, 50, np.random.default_rng(0), params)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 5 * np.median(sizes)


def test_quantity_gives_every_client_min_size_and_iid_labels():
    parts = quantity(LABELS, 40, np.random.default_rng(0), QuantityParams(sigma=3.0, min_size=6))
    assert min(len(p) for p in parts) >= 6
    biggest = max(parts, key=len)
    share = np.bincount(LABELS[biggest], minlength=10) / len(biggest)
    assert len(biggest) > 100 and np.abs(share - 0.1).max() < 0.06


def test_apportion_sums_to_the_total_and_gives_leftovers_to_the_largest_remainders():
    sizes = apportion(np.array([1.0, 2.0, 3.0, 0.5]), 97)
    assert sizes.sum() == 97
    np.testing.assert_allclose(sizes, np.array([1.0, 2.0, 3.0, 0.5]) / 6.5 * 97, atol=1)
    np.testing.assert_array_equal(apportion(np.array([1.0, 1.0, 1.0, 3.0]), 7), [1, 1, 1, 4])


def test_iid_with_more_clients_than_samples_raises_naming_num_clients():
    with pytest.raises(DataError, match=r"^num_clients: 500 clients but only 300 samples$"):
        iid(np.zeros(300, dtype=int), 500, np.random.default_rng(0), NoParams())


def test_natural_partitioner_is_a_marker_that_refuses_central_data():
    assert PARTITIONERS.get("natural").meta["natural"]
    with pytest.raises(DataError, match=r"^partition\.name: 'natural' needs a data set with its own clients"):
        _partition("natural", LABELS, 5)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "labeldir"}, r"partition\.alpha: missing"),
        ({"name": "labeldir", "alpha": 0}, r"partition\.alpha: "),
        ({"name": "shards", "shards_per_client": 0}, r"partition\.shards_per_client: "),
        ({"name": "quantity", "distribution": "zipf"}, r"partition\.distribution: "),
        ({"name": "iid", "alpha": 1}, r"partition\.alpha: unknown field"),
    ],
)
def test_partition_params_are_validated_with_the_field_named(spec, field):
    with pytest.raises(ScenarioError, match="^" + field):
        PARTITIONERS.resolve(spec, "partition")


def test_builder_partitions_digits_then_splits_each_client_from_the_data_stream():
    built = build_federated_data("digits", {}, "iid", {}, 10, seed=7)
    central = DATASETS.get("digits").obj(DATASETS.get("digits").params(), 10, data_rng(7))
    rng = data_rng(7)
    train, test = split_train_test(iid(central.y, 10, rng, NoParams()), rng, 0.1)
    assert built.feature_shape == (1, 8, 8) and built.num_classes == 10
    np.testing.assert_array_equal(built.train_sizes, [len(t) for t in train])
    np.testing.assert_array_equal(built.x_train.numpy(), central.x[np.concatenate(train)])
    np.testing.assert_array_equal(built.y_test.numpy(), central.y[np.concatenate(test)])


def test_builder_train_share_is_int_of_one_minus_test_fraction_per_client():
    built = build_federated_data("digits", {"test_fraction": 0.3}, "labeldir", {"alpha": 0.5}, 12, seed=0)
    total = built.train_sizes + built.test_sizes
    assert total.sum() == 1797
    np.testing.assert_array_equal(built.train_sizes, [int(0.7 * n) for n in total])


def test_builder_is_deterministic_for_a_seed_and_changes_with_it():
    a = build_federated_data("digits", {}, "labeldir", {"alpha": 0.5}, 10, seed=3)
    b = build_federated_data("digits", {}, "labeldir", {"alpha": 0.5}, 10, seed=3)
    c = build_federated_data("digits", {}, "labeldir", {"alpha": 0.5}, 10, seed=4)
    assert np.array_equal(a.y_train.numpy(), b.y_train.numpy())
    np.testing.assert_array_equal(a.train_sizes, b.train_sizes)
    assert not np.array_equal(a.train_sizes, c.train_sizes)


def test_builder_refuses_natural_partition_of_central_data():
    with pytest.raises(DataError) as err:
        build_federated_data("digits", {}, "natural", {}, 10, seed=0)
    assert str(err.value) == (
        "partition.name: 'natural' needs a data set with its own clients (least_squares, synthetic, synthetic_iid, "
        "synthetic_population); "
        "'digits' has none"
    )


def test_builder_raises_naming_num_clients_when_a_client_has_no_training_sample():
    with pytest.raises(DataError, match=r"^num_clients: client \d+ has no training samples"):
        build_federated_data("digits", {}, "iid", {}, 1797, seed=0)


def test_builder_validates_names_and_params_with_fields_named():
    with pytest.raises(ScenarioError, match=r"^data\.name: unknown data set 'nope'"):
        build_federated_data("nope", {}, "iid", {}, 10, seed=0)
    with pytest.raises(ScenarioError, match=r"^partition\.alpha: "):
        build_federated_data("digits", {}, "labeldir", {"alpha": -1}, 10, seed=0)
    with pytest.raises(ScenarioError, match=r"^data\.test_fraction: Input should be less than 1"):
        build_federated_data("digits", {"test_fraction": 1.0}, "iid", {}, 10, seed=0)
    with pytest.raises(ScenarioError, match=r"^num_clients: must be >= 1"):
        build_federated_data("synthetic", {}, "natural", {}, 0, seed=0)
