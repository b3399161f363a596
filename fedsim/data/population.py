"""A FedProx-style Synthetic(alpha, beta) population of up to millions of clients, generated on demand.

`synthetic` materialises every device up front, so its memory grows with the population. Here client k's data
are drawn only when a runtime asks for them, from a generator keyed by (population key, k) alone: the same
client always gets the same samples whatever order clients are visited in, and memory follows the clients in
flight (plus a small LRU cache of recent ones), not the population.

Each client k draws, as FedProx's generate_synthetic.py does per device: u_k ~ N(0, alpha), B_k ~ N(0, beta),
a feature mean v_k ~ N(B_k, 1)^d, a labeller W_k ~ N(u_k, 1)^(d x c), b_k ~ N(u_k, 1)^c, then features
x ~ N(v_k, diag((j + 1)^-1.2)) (drawn as v_k + scale * standard normal, as the covariance is diagonal) and
labels argmax(x W_k + b_k). The draws are not FedProx's draw for draw (each client has its own stream).

Sample sizes must be known for every client without generating any, so all are drawn at construction in one
vectorised call: n_k = min((int(lognormal(size_mean, size_sigma)) + min_samples) * sample_scale, max_samples).
FedProx's lognormal(4, 2) has mean ~400 and a tail in the tens of thousands; the defaults here (median 30, mean
~41, capped at 200) keep a million-client population's clients small and bounded. Client k's first
int((1 - test_fraction) * n_k) samples train, the rest test (samples are i.i.d. within a client, so no shuffle).

The population key is drawn from the data rng before the sizes, and the sizes form a prefix-stable sequence,
so client k of a population is the same client in any larger population built from the same seed.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from pydantic import Field

from fedsim.data.base import DATASETS, Footprint
from fedsim.data.synthetic import SyntheticParams

ClientSplits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(x_train, y_train, x_test, y_test) of one client."""


class PopulationParams(SyntheticParams):
    """Synthetic(alpha, beta) parameters plus the size distribution and the cache of generated clients.

    size_mean, size_sigma: mean and std of log(size) before the floor; min_samples: the floor added to every
    draw; max_samples: cap on a client's total samples (train + test, after sample_scale); cache_clients: how
    many recently generated clients to keep (0: none).
    """

    size_mean: float = 3.0
    size_sigma: float = Field(default=1.0, ge=0)
    min_samples: int = Field(default=10, ge=1)
    max_samples: int = Field(default=200, ge=1)
    cache_clients: int = Field(default=1024, ge=0)


def population_sizes(rng: np.random.Generator, num_clients: int, params: PopulationParams) -> np.ndarray:
    """Total samples per client, drawn in one vectorised call and capped at max_samples."""
    draws = np.floor(np.minimum(rng.lognormal(params.size_mean, params.size_sigma, num_clients), params.max_samples))
    # In float, capped before the cast: the same sizes as integer arithmetic, without overflow for extreme params.
    sizes = np.minimum((draws + params.min_samples) * float(params.sample_scale), params.max_samples)
    return sizes.astype(np.int64)


def population_footprint(params: PopulationParams, num_clients: int) -> Footprint:
    """Per-client sizes (a few arrays of num_clients) plus the cache of generated clients, each client taken at
    the 99.9th percentile of the size distribution (or max_samples), drawn in float64 and kept in float32, and the
    labeller and logits of the client being generated."""
    with np.errstate(over="ignore"):
        typical = min(float(params.max_samples),
                      (params.min_samples + math.exp(min(params.size_mean + 3.1 * params.size_sigma, 700)))
                      * params.sample_scale)
    per_client = typical * (params.num_features * 28 + 16)
    labeller = 2 * 8 * (params.num_features + 1) * params.num_classes + 8 * typical * params.num_classes
    nbytes = 48 * num_clients + (params.cache_clients + 1) * per_client + labeller
    return Footprint(int(min(nbytes, 2**63)), (params.num_features,), params.num_classes)


class GeneratedPopulation:
    """A `ClientDataSource` whose clients are generated on demand, deterministically from (key, k)."""

    def __init__(self, params: PopulationParams, num_clients: int, rng: np.random.Generator) -> None:
        self.num_classes = params.num_classes
        self._params = params
        self._key = [int(v) for v in rng.integers(0, 2**32, size=4, dtype=np.uint64)]
        sizes = population_sizes(rng, num_clients, params)
        self._train_sizes = _read_only((sizes * (1 - params.test_fraction)).astype(np.int64))
        self._test_sizes = _read_only(sizes - self._train_sizes)
        self._feature_std = np.sqrt(np.power(np.arange(1, params.num_features + 1, dtype=float), -1.2))
        self._cache: OrderedDict[int, ClientSplits] = OrderedDict()

    @property
    def num_clients(self) -> int:
        return len(self._train_sizes)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self._params.num_features,)

    @property
    def train_sizes(self) -> np.ndarray:
        return self._train_sizes

    @property
    def test_sizes(self) -> np.ndarray:
        return self._test_sizes

    @property
    def cached_clients(self) -> int:
        """How many generated clients the LRU cache holds now."""
        return len(self._cache)

    def client_train(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _, _ = self._client(k)
        return x, y

    def client_test(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, x, y = self._client(k)
        return x, y

    def _client(self, k: int) -> ClientSplits:
        """Client k's splits, from the cache or freshly generated (and then cached, evicting the oldest)."""
        k = int(k)
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        if not 0 <= k < self.num_clients:
            raise IndexError(f"client {k} out of range for a population of {self.num_clients}")
        splits = self._generate(k)
        if self._params.cache_clients:
            self._cache[k] = splits
            if len(self._cache) > self._params.cache_clients:
                self._cache.popitem(last=False)
        return splits

    def _generate(self, k: int) -> ClientSplits:
        """Draw client k from its own stream: labeller and feature mean, then its samples."""
        p = self._params
        rng = np.random.default_rng(np.random.SeedSequence(self._key, spawn_key=(k,)))
        u, big_b = rng.normal(0, p.alpha), rng.normal(0, p.beta)
        mean_x = rng.normal(big_b, 1, p.num_features)
        w = rng.normal(u, 1, (p.num_features, p.num_classes))
        b = rng.normal(u, 1, p.num_classes)
        n = int(self._train_sizes[k] + self._test_sizes[k])
        noise = rng.standard_normal((n, p.num_features))
        x = (mean_x + noise * self._feature_std).astype(np.float32)
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
        cut = int(self._train_sizes[k])
        return x_t[:cut], y_t[:cut], x_t[cut:], y_t[cut:]


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@DATASETS.register("synthetic_population", PopulationParams, natural=True, lazy=True,
                   footprint=population_footprint)
def synthetic_population(params: PopulationParams, num_clients: int, rng: np.random.Generator) -> GeneratedPopulation:
    """Synthetic(alpha, beta) for up to millions of clients, each generated on demand (memory: clients in use)."""
    return GeneratedPopulation(params, num_clients, rng)
