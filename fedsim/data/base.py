"""Containers for federated data and the registries of data sets and partitioners.

Client data is stored as one concatenated tensor per split plus offsets, never as one object per client, so a
runtime can slice a client cheaply, stack clients for vectorization, or move the whole set to a device at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

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


@dataclass(frozen=True)
class FederatedData:
    """Per-client train/test splits as concatenated tensors; client k owns rows offsets[k]:offsets[k+1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    train_offsets: np.ndarray
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_offsets: np.ndarray
    num_classes: int

    @property
    def num_clients(self) -> int:
        return len(self.train_offsets) - 1

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def train_sizes(self) -> np.ndarray:
        return np.diff(self.train_offsets)

    @property
    def test_sizes(self) -> np.ndarray:
        return np.diff(self.test_offsets)

    def client_train(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.train_offsets[k]), int(self.train_offsets[k + 1])
        return self.x_train[a:b], self.y_train[a:b]

    def client_test(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.test_offsets[k]), int(self.test_offsets[k + 1])
        return self.x_test[a:b], self.y_test[a:b]


class DataParams(Params):
    """Parameters every data set accepts."""

    test_fraction: float = 0.1


DATASETS: Registry = Registry("data set")
"""Entries: `fn(params, num_clients, rng) -> CentralDataset | FederatedData`.

A data set that returns `FederatedData` has natural clients (meta `natural=True`); one that returns a
`CentralDataset` is split by a partitioner and then per client into train/test by `params.test_fraction`.
"""

PARTITIONERS: Registry = Registry("partitioner")
"""Entries: `fn(labels, num_clients, rng, params) -> list[np.ndarray]`, one index array per client."""
