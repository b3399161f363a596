"""MNIST-1D (Greydanus 2020): 10-class 1-D signals of length 40, generated locally, never downloaded."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from pydantic import Field

from fedsim.data.base import DATASETS, CentralDataset, DataParams, Footprint

BUILD_BYTES_PER_SAMPLE = 4096
"""Peak memory of mnist1d's generator per sample (measured: about 3.6 KB at 20,000 samples)."""


class MNIST1DParams(DataParams):
    """num_samples is split evenly over the 10 classes (rounded down to a multiple of 10)."""

    num_samples: int = Field(default=5000, ge=100)


@contextmanager
def _global_rng_state_kept() -> Iterator[None]:
    """make_dataset reseeds the global `random` and `numpy.random` states; put them back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def mnist1d_footprint(params: MNIST1DParams, num_clients: int) -> Footprint:
    """The generator's measured peak per sample; signals of length 40, 10 classes."""
    return Footprint(params.num_samples * BUILD_BYTES_PER_SAMPLE, (40,), 10)


@DATASETS.register("mnist1d", MNIST1DParams, footprint=mnist1d_footprint)
def load_mnist1d(params: MNIST1DParams, num_clients: int, rng: np.random.Generator) -> CentralDataset:
    """The generator's train and test parts pooled: x (n, 40) float32, y int64; its seed comes from `rng`."""
    from mnist1d.data import get_dataset_args, make_dataset  # on use: it imports matplotlib.pyplot

    args = get_dataset_args()
    args.num_samples = params.num_samples
    args.seed = int(rng.integers(2**31 - 1))
    with _global_rng_state_kept():
        data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return CentralDataset(x, y, 10)
