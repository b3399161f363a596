"""Partitioners: split a central data set's sample indices over clients (IID, label skew, quantity skew).

Every partitioner returns one index array per client; together they are a partition of range(len(labels)).
Impossible requests raise a one-line DataError naming the scenario field to change.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fedsim.data.base import PARTITIONERS
from fedsim.errors import DataError
from fedsim.registry import NoParams, Params

MAX_DIRICHLET_TRIES = 1000
"""How many full Dirichlet draws are tried before giving up on the `min_size` guarantee."""


class DirichletParams(Params):
    """Label skew: per class, proportions over clients ~ Dir(alpha); smaller alpha, fewer classes each."""

    alpha: float = Field(gt=0)
    min_size: int = Field(default=2, ge=1)


class HsuDirichletParams(Params):
    """Label skew at equal client sizes: each client's class mix ~ Dir(alpha p), p the data set's class mix."""

    alpha: float = Field(gt=0)


class ShardsParams(Params):
    """McMahan's pathological split: each client gets `shards_per_client` shards of label-sorted data."""

    shards_per_client: int = Field(default=2, ge=1)
    deal: Literal["random", "sorted"] = Field("random", description="random: shards dealt at random (McMahan et "
                                                                   "al.); sorted: client k gets the k-th run of "
                                                                   "shards in label order, so labels rise with the "
                                                                   "client number (client-indexed speeds then "
                                                                   "give the fast clients labels of their own)")


class QuantityParams(Params):
    """Quantity skew: client sizes drawn from a heavy-tailed law, labels IID."""

    distribution: Literal["lognormal", "powerlaw"] = "lognormal"
    sigma: float = Field(default=1.0, gt=0, le=50)  # beyond 50, lognormal draws overflow
    exponent: float = Field(default=1.5, ge=0.1)  # below 0.1, Pareto draws overflow
    min_size: int = Field(default=2, ge=1)


def check_enough_samples(num_samples: int, num_clients: int, min_size: int = 1) -> None:
    """Raise a DataError naming `num_clients` when every client cannot get `min_size` samples."""
    if num_clients < 1:
        raise DataError(f"num_clients: must be >= 1, got {num_clients}")
    if num_samples < num_clients * min_size:
        need = "" if min_size == 1 else f" (partition.min_size {min_size} needs {num_clients * min_size})"
        raise DataError(f"num_clients: {num_clients} clients but only {num_samples} samples{need}")


def split_by_sizes(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cut `order` into consecutive chunks of the given sizes."""
    return np.split(order, np.cumsum(sizes)[:-1])


@PARTITIONERS.register("iid", NoParams)
def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator, params: Params) -> list[np.ndarray]:
    """Uniformly random split into clients whose sizes differ by at most one."""
    check_enough_samples(len(labels), num_clients)
    return np.array_split(rng.permutation(len(labels)), num_clients)


def _dirichlet_counts(
    class_sizes: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float
) -> np.ndarray:
    """Samples of each class (rows) per client (columns): cuts at the Dir(alpha) cumulative proportions."""
    proportions = rng.dirichlet(np.full(num_clients, alpha), size=len(class_sizes))
    cuts = (np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(int)
    cuts[:, -1] = class_sizes
    return np.diff(cuts, axis=1, prepend=0)


@PARTITIONERS.register("labeldir", DirichletParams)
def labeldir(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, params: DirichletParams
) -> list[np.ndarray]:
    """Label skew per class, NIID-Bench's `noniid-labeldir` (Li et al., ICDE 2022): each class is spread over the
    clients by Dir(alpha) proportions, so client sizes swing with alpha; proportions are redrawn until every client
    has `min_size` samples."""
    check_enough_samples(len(labels), num_clients, params.min_size)
    classes, class_sizes = np.unique(labels, return_counts=True)
    for _ in range(MAX_DIRICHLET_TRIES):
        counts = _dirichlet_counts(class_sizes, num_clients, rng, params.alpha)
        if counts.sum(axis=0).min() >= params.min_size:
            break
    else:
        raise DataError(
            f"partition.alpha: no Dirichlet({params.alpha}) split of {len(labels)} samples gave all "
            f"{num_clients} clients >= {params.min_size} samples in {MAX_DIRICHLET_TRIES} tries; "
            "raise alpha or lower num_clients / partition.min_size"
        )
    per_class = [
        split_by_sizes(rng.permutation(np.flatnonzero(labels == c)), row)
        for c, row in zip(classes, counts, strict=True)
    ]
    return [np.sort(np.concatenate(chunks)) for chunks in zip(*per_class, strict=True)]


def _hsu_counts(class_sizes: np.ndarray, sizes: np.ndarray, rng: np.random.Generator, alpha: float) -> np.ndarray:
    """Samples of each class (columns) per client (rows). Client k's mix is q_k ~ Dir(alpha p); the pool is finite,
    so clients take one sample each per turn, every one drawing a class from its q_k among the classes not used up
    (a class asked for more than it has left goes to a random subset of the askers, the others ask again): a used-up
    class costs every client alike, not whichever clients happen to come last."""
    p = class_sizes / class_sizes.sum()
    mixes = np.nan_to_num(rng.dirichlet(alpha * p, size=len(sizes)))
    left, need = class_sizes.astype(np.int64), sizes.astype(np.int64)
    counts = np.zeros((len(sizes), len(class_sizes)), dtype=np.int64)
    while need.any():
        askers = rng.permutation(np.flatnonzero(need > 0))
        weights = mixes[askers] * (left > 0)
        weights[weights.sum(axis=1) <= 0] = left > 0
        cumulative = np.cumsum(weights, axis=1)
        draws = rng.random(len(askers)) * cumulative[:, -1]
        asked = np.minimum((cumulative <= draws[:, None]).sum(axis=1), len(left) - 1)
        order = np.argsort(asked, kind="stable")
        starts = np.searchsorted(asked[order], asked[order])
        granted = order[np.arange(len(order)) - starts < left[asked[order]]]
        np.add.at(counts, (askers[granted], asked[granted]), 1)
        left -= np.bincount(asked[granted], minlength=len(left))
        need[askers[granted]] -= 1
    return counts


@PARTITIONERS.register("hsu_dirichlet", HsuDirichletParams)
def hsu_dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, params: HsuDirichletParams
) -> list[np.ndarray]:
    """Label skew at equal sizes (Hsu, Qi and Brown 2019, Sec. 3): client k's class proportions q_k ~ Dir(alpha p),
    with p the class distribution of the whole data set; sizes differ by at most one sample."""
    check_enough_samples(len(labels), num_clients)
    classes, class_sizes = np.unique(labels, return_counts=True)
    sizes = np.array([len(part) for part in np.array_split(np.arange(len(labels)), num_clients)])
    counts = _hsu_counts(class_sizes, sizes, rng, params.alpha)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    per_class = [split_by_sizes(pool, counts[:, j]) for j, pool in enumerate(pools)]
    return [np.sort(np.concatenate(chunks)) for chunks in zip(*per_class, strict=True)]


@PARTITIONERS.register("shards", ShardsParams)
def shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, params: ShardsParams
) -> list[np.ndarray]:
    """Sort by label, cut into num_clients * shards_per_client near-equal shards, deal them out at random or, with
    `deal: sorted`, in order (client k gets shards k * shards_per_client onward)."""
    num_shards = num_clients * params.shards_per_client
    if len(labels) < num_shards:
        raise DataError(
            f"partition.shards_per_client: {num_clients} clients x {params.shards_per_client} shards = "
            f"{num_shards} shards but only {len(labels)} samples"
        )
    pieces = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    order = np.arange(num_shards) if params.deal == "sorted" else rng.permutation(num_shards)
    owner = order.reshape(num_clients, params.shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in owner]


def _quantity_weights(num_clients: int, rng: np.random.Generator, params: QuantityParams) -> np.ndarray:
    """Unnormalised client sizes: lognormal(0, sigma), or Pareto with tail P(w > t) = t^-exponent."""
    if params.distribution == "lognormal":
        return rng.lognormal(0.0, params.sigma, num_clients)
    return rng.pareto(params.exponent, num_clients) + 1.0


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer sizes proportional to `weights` that sum to `total` (largest remainders get the leftovers)."""
    exact = weights / weights.sum() * total
    sizes = np.floor(exact).astype(int)
    leftover = total - sizes.sum()
    sizes[np.argsort(sizes - exact, kind="stable")[:leftover]] += 1
    return sizes


@PARTITIONERS.register("quantity", QuantityParams)
def quantity(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, params: QuantityParams
) -> list[np.ndarray]:
    """Quantity skew: min_size each, the rest apportioned by drawn weights; samples assigned at random."""
    check_enough_samples(len(labels), num_clients, params.min_size)
    spare = len(labels) - num_clients * params.min_size
    sizes = params.min_size + apportion(_quantity_weights(num_clients, rng, params), spare)
    return split_by_sizes(rng.permutation(len(labels)), sizes)


@PARTITIONERS.register("natural", NoParams, natural=True)
def natural(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, params: Params
) -> list[np.ndarray]:
    """Keep the data set's own clients: a marker the builder handles; calling it is an error."""
    raise DataError(
        "partition.name: 'natural' needs a data set with its own clients (synthetic, synthetic_iid)"
    )
