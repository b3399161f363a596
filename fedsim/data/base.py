"""Containers for federated data and the registries of data sets and partitioners.

Client data is stored as one concatenated tensor per split plus offsets, never as one object per client, so a
runtime can slice a client cheaply, stack clients for vectorization, or move the whole set to a device at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from pydantic import Field

from fedsim.registry import Params, Registry


@dataclass(frozen=True)
class CentralDataset:
    """A pooled data set before partitioning: features `x` (n, *shape) float32 and integer labels `y` (n,)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int


class ClientDataSource(Protocol):
    """What runtimes and evaluation read client data through. `FederatedData` holds every client in memory;
    a generated population produces a client's tensors on demand, so memory follows the clients in flight."""

    num_classes: int

    @property
    def num_clients(self) -> int: ...

    @property
    def feature_shape(self) -> tuple[int, ...]: ...

    @property
    def train_sizes(self) -> np.ndarray: ...

    @property
    def test_sizes(self) -> np.ndarray: ...

    def client_train(self, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def client_test(self, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def _rows(starts: np.ndarray, sizes: np.ndarray, k: int, split: str) -> slice:
    if starts[k] < 0:
        raise LookupError(f"client {k}'s {split} data is not held here (it belongs to another MPI rank's shard)")
    return slice(int(starts[k]), int(starts[k] + sizes[k]))


def _gather_rows(starts: np.ndarray, sizes: np.ndarray, clients: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of `clients`' data, in that order, and each one's start in the gathered rows."""
    rows = [np.arange(starts[k], starts[k] + sizes[k]) for k in clients]
    firsts = np.concatenate([[0], np.cumsum([len(r) for r in rows])[:-1]]) if rows else np.zeros(0)
    return (np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)), firsts.astype(np.int64)


@dataclass(frozen=True)
class FederatedData:
    """Per-client train/test splits as concatenated tensors: client k's training rows are
    `x_train[train_starts[k] : train_starts[k] + train_sizes[k]]`, likewise for test.

    A shard (an MPI rank's part, `shard`) holds the rows of its own clients only; the other clients have start -1
    but keep their sizes, which every rank needs to sample and weight clients.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    train_starts: np.ndarray
    train_sizes: np.ndarray
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_starts: np.ndarray
    test_sizes: np.ndarray
    num_classes: int

    @classmethod
    def from_offsets(cls, x_train: torch.Tensor, y_train: torch.Tensor, train_offsets: np.ndarray,
                     x_test: torch.Tensor, y_test: torch.Tensor, test_offsets: np.ndarray,
                     num_classes: int) -> FederatedData:
        """Every client's data, client k owning rows offsets[k]:offsets[k+1] of each split."""
        train_offsets, test_offsets = np.asarray(train_offsets, np.int64), np.asarray(test_offsets, np.int64)
        return cls(x_train, y_train, train_offsets[:-1], np.diff(train_offsets), x_test, y_test,
                   test_offsets[:-1], np.diff(test_offsets), num_classes)

    @property
    def num_clients(self) -> int:
        return len(self.train_sizes)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def client_train(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _rows(self.train_starts, self.train_sizes, k, "training")
        return self.x_train[rows], self.y_train[rows]

    def client_test(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _rows(self.test_starts, self.test_sizes, k, "test")
        return self.x_test[rows], self.y_test[rows]

    def shard(self, clients: Sequence[int]) -> FederatedData:
        """A copy holding only `clients`' rows (every client's sizes are kept), for a rank that runs only those."""
        train_rows, train_firsts = _gather_rows(self.train_starts, self.train_sizes, clients)
        test_rows, test_firsts = _gather_rows(self.test_starts, self.test_sizes, clients)
        train_starts = np.full(self.num_clients, -1, dtype=np.int64)
        test_starts = train_starts.copy()
        train_starts[list(clients)], test_starts[list(clients)] = train_firsts, test_firsts
        train_index, test_index = torch.from_numpy(train_rows), torch.from_numpy(test_rows)
        return FederatedData(self.x_train[train_index], self.y_train[train_index], train_starts,
                             self.train_sizes.copy(), self.x_test[test_index], self.y_test[test_index], test_starts,
                             self.test_sizes.copy(), self.num_classes)


@dataclass(frozen=True)
class Footprint:
    """What building a data set will take and give, known before it is built: peak bytes of the build, the
    feature shape of one sample and the number of classes."""

    nbytes: int
    feature_shape: tuple[int, ...]
    num_classes: int


class DataParams(Params):
    """Parameters every data set accepts."""

    test_fraction: float = Field(0.1, ge=0, lt=1, description="share of each client's samples held out for testing")


DATASETS: Registry = Registry("data set")
"""Entries: `fn(params, num_clients, rng) -> CentralDataset | FederatedData`.

A data set that returns `FederatedData` has natural clients (meta `natural=True`); one that returns a
`CentralDataset` is split by a partitioner and then per client into train/test by `params.test_fraction`.

Every entry also declares `footprint=fn(params, num_clients) -> Footprint`: the peak bytes building it takes and
the shape of what it will hold, computed without building it (from the parameters, or from file headers for data
read from disk; missing or malformed files raise DataError here already). Runs and `fedsim check` refuse a data
set, or a model on it, that cannot fit in memory before allocating any of it.
"""

PARTITIONERS: Registry = Registry("partitioner")
"""Entries: `fn(labels, num_clients, rng, params) -> list[np.ndarray]`, one index array per client."""
