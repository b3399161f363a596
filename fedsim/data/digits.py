"""scikit-learn's bundled 8x8 handwritten digits (1,797 images): small real data that needs no download."""

from __future__ import annotations

import numpy as np

from fedsim.data.base import DATASETS, CentralDataset, DataParams, Footprint


def digits_footprint(params: DataParams, num_clients: int) -> Footprint:
    """A fixed, small set: 1,797 images of 64 pixels, held a few times over while loading and splitting."""
    return Footprint(1797 * 64 * 8 * 4, (1, 8, 8), 10)


@DATASETS.register("digits", DataParams, footprint=digits_footprint)
def digits(params: DataParams, num_clients: int, rng: np.random.Generator) -> CentralDataset:
    """All 1,797 digits as x (n, 1, 8, 8) float32 in [0, 1] (pixels are 0..16) and 10 classes."""
    from sklearn.datasets import load_digits  # on use: importing scikit-learn takes ~0.7 s

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    return CentralDataset(x, data.target.astype(np.int64), 10)
