"""Turn a scenario's data and partition choices into FederatedData, reproducibly from the run's seed.

All data randomness (generation, partition, train/test splits) comes from one numpy Generator on stream
DATA_STREAM of the run seed, `SeedSequence([seed, 1])`, so the data do not change when other parts of a run
(model init, client sampling) draw more or fewer numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedsim.data.base import DATASETS, PARTITIONERS, CentralDataset, ClientDataSource, FederatedData
from fedsim.errors import DataError, ScenarioError
from fedsim.registry import Entry, Params, validate_params

DATA_STREAM = 1
"""Index of the data stream in `SeedSequence([seed, stream])`."""


def data_rng(seed: int) -> np.random.Generator:
    """The Generator every data draw of a run with this seed uses (stream DATA_STREAM)."""
    return np.random.default_rng(np.random.SeedSequence([seed, DATA_STREAM]))


def split_train_test(
    parts: list[np.ndarray], rng: np.random.Generator, test_fraction: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Shuffle each client's indices; the first int((1 - test_fraction) * n_k) train, the rest test."""
    if not 0 <= test_fraction < 1:
        raise ScenarioError(f"data.test_fraction: must be in [0, 1), got {test_fraction}")
    train, test = [], []
    for part in parts:
        order = rng.permutation(part)
        cut = int((1 - test_fraction) * len(order))
        train.append(order[:cut])
        test.append(order[cut:])
    return train, test


def _offsets(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)


def _take(x: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return x[np.concatenate(parts).astype(np.int64)]


def gather(
    x: np.ndarray, y: np.ndarray, train: list[np.ndarray], test: list[np.ndarray], num_classes: int
) -> FederatedData:
    """FederatedData whose client k holds rows train[k] / test[k] of (x, y): float32 x; int64 labels for an
    integer or bool y, float32 targets for a floating y."""
    y_dtype = np.float32 if np.issubdtype(y.dtype, np.floating) else np.int64
    return FederatedData.from_offsets(
        x_train=torch.from_numpy(np.ascontiguousarray(_take(x, train), dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(_take(y, train), dtype=y_dtype)),
        train_offsets=_offsets(train),
        x_test=torch.from_numpy(np.ascontiguousarray(_take(x, test), dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(_take(y, test), dtype=y_dtype)),
        test_offsets=_offsets(test),
        num_classes=num_classes,
    )


def pool(data: FederatedData) -> CentralDataset:
    """All samples of a natural data set (train and test of every client) as one central data set."""
    x = torch.cat([data.x_train, data.x_test]).numpy()
    y = torch.cat([data.y_train, data.y_test]).numpy()
    return CentralDataset(x, y, data.num_classes)


def _params(kind: str, entry: Entry, given: Params | Mapping[str, Any] | None, field_path: str) -> Params:
    """Accept an already-validated parameter model, or validate a mapping of keys against the entry's."""
    if isinstance(given, entry.params):
        return given
    if isinstance(given, Params):
        wanted = entry.params.__name__
        raise TypeError(f"{field_path}: {type(given).__name__} given, {entry.name!r} takes {wanted}")
    return validate_params(entry.params, dict(given or {}), field_path, f"{kind} {entry.name!r}")


def _check_partition(parts: list[np.ndarray], num_samples: int, num_clients: int, name: str) -> None:
    """Guard against partitioner bugs: one part per client, disjoint and covering."""
    counts = np.bincount(np.concatenate(parts).astype(np.int64), minlength=num_samples)
    if len(parts) != num_clients or len(counts) != num_samples or not np.all(counts == 1):
        raise RuntimeError(f"partitioner {name!r} did not return a partition of {num_samples} samples")


def _check_train_sizes(data: ClientDataSource, test_fraction: float) -> None:
    """Every client needs at least one training sample."""
    empty = np.flatnonzero(data.train_sizes == 0)
    if len(empty):
        k = int(empty[0])
        raise DataError(
            f"num_clients: client {k} has no training samples ({int(data.test_sizes[k])} sample(s) in all, "
            f"data.test_fraction {test_fraction}); use fewer clients or another partition"
        )


def partition_central(
    data: CentralDataset,
    partitioner: Callable[..., list[np.ndarray]],
    params: Params,
    num_clients: int,
    rng: np.random.Generator,
    test_fraction: float,
) -> FederatedData:
    """Partition a central data set over clients, then split each client into train and test."""
    parts = partitioner(np.asarray(data.y), num_clients, rng, params)
    _check_partition(parts, len(data.y), num_clients, getattr(partitioner, "__name__", "?"))
    train, test = split_train_test(parts, rng, test_fraction)
    return gather(data.x, data.y, train, test, data.num_classes)


def build_federated_data(
    data_name: str,
    data_params: Params | Mapping[str, Any] | None,
    partition_name: str,
    partition_params: Params | Mapping[str, Any] | None,
    num_clients: int,
    seed: int,
) -> ClientDataSource:
    """Build the federated data set a scenario names; the same seed always gives the same data."""
    if num_clients < 1:
        raise ScenarioError(f"num_clients: must be >= 1, got {num_clients}")
    data_entry = DATASETS.get(data_name, "data.name")
    part_entry = PARTITIONERS.get(partition_name, "partition.name")
    dparams = _params(DATASETS.kind, data_entry, data_params, "data")
    pparams = _params(PARTITIONERS.kind, part_entry, partition_params, "partition")
    if part_entry.meta.get("natural") and not data_entry.meta.get("natural"):
        raise DataError(
            f"partition.name: 'natural' needs a data set with its own clients "
            f"({', '.join(e.name for e in DATASETS if e.meta.get('natural'))}); {data_name!r} has none"
        )
    if data_entry.meta.get("lazy") and not part_entry.meta.get("natural"):
        raise DataError(f"partition.name: {data_name!r} generates its clients on demand and cannot be pooled "
                        f"and re-partitioned; use partition 'natural'")
    rng = data_rng(seed)
    try:
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            data = data_entry.obj(dparams, num_clients, rng)
            if not part_entry.meta.get("natural"):
                central = pool(data) if isinstance(data, FederatedData) else data
                data = partition_central(central, part_entry.obj, pparams, num_clients, rng, dparams.test_fraction)
    except FloatingPointError as exc:
        raise DataError(f"data, partition: these parameters make the numbers overflow while building the data "
                        f"({exc}); use less extreme values") from None
    _check_train_sizes(data, dparams.test_fraction)
    return data
