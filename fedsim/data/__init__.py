"""Data sets, partitioners and the builder that turns a scenario's choices into per-client tensors.

Importing this package registers every built-in data set and partitioner.
"""

from fedsim.data import (  # noqa: F401  (fill the registries)
    digits,
    least_squares,
    mnist1d,
    partition,
    population,
    synthetic,
    vision,
)
from fedsim.data.base import DATASETS, PARTITIONERS, CentralDataset, ClientDataSource, FederatedData
from fedsim.data.build import build_federated_data

__all__ = ["DATASETS", "PARTITIONERS", "CentralDataset", "ClientDataSource", "FederatedData", "build_federated_data"]
