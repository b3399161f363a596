"""Every node's state in one pytree whose leaves carry a leading node axis, so that decentralized algorithms
update and mix all nodes with one tensor operation per leaf instead of a Python loop over nodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedsim.params import Pytree, tree_map

SEP = "/"
"""Separator of the flat keys of `state_dict` ("a/b/c"); pytree keys may not contain it."""


def tree_map_keyed(fn: Callable[[str, torch.Tensor], torch.Tensor], tree: Pytree, prefix: str = "") -> Pytree:
    """Like `tree_map` over one tree, but `fn` also gets the leaf's flat key ("a/b/c"), for errors naming it."""
    out = {}
    for k, v in tree.items():
        if not isinstance(k, str) or SEP in k:
            raise ValueError(f"pytree key {prefix + str(k)!r}: keys must be strings without {SEP!r}")
        out[k] = tree_map_keyed(fn, v, f"{prefix}{k}{SEP}") if isinstance(v, dict) else fn(prefix + k, v)
    return out


def tree_flatten(tree: Pytree) -> dict[str, torch.Tensor]:
    """The leaves by flat key ("a/b/c"), in the tree's order."""
    flat: dict[str, torch.Tensor] = {}
    tree_map_keyed(flat.__setitem__, tree)
    return flat


def _node_ids(ids: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """`ids` as a 1-D int64 tensor, each in 0..n-1 (no negative indexing: a negative id is a bug)."""
    idx = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.long)
    if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"node ids must be a 1-D sequence of integers, got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"node ids must lie in 0..{n - 1}, got {int(idx.min())}..{int(idx.max())}")
    return idx.long()


def _describe(value: object) -> str:
    """A tensor's dtype and shape, or the type of anything else (for one-line errors)."""
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


class StackedStore:
    """Node state as a pytree of tensors shaped (num_nodes, ...), all on one device; rows are nodes."""

    def __init__(self, stacked: Pytree) -> None:
        flat = tree_flatten(stacked)
        if not flat:
            raise ValueError("a StackedStore needs at least one leaf")
        for key, v in flat.items():
            if not isinstance(v, torch.Tensor) or v.ndim == 0:
                raise ValueError(f"leaf {key!r}: expected a tensor with a leading node axis, got {_describe(v)}")
        n = next(iter(flat.values())).shape[0]
        for key, v in flat.items():
            if v.shape[0] != n:
                raise ValueError(f"leaf {key!r}: expected a leading node axis of size {n}, got {_describe(v)}")
        if len({v.device for v in flat.values()}) > 1:
            raise ValueError(f"all leaves must be on one device, got {sorted({str(v.device) for v in flat.values()})}")
        self._stacked = stacked
        self._n = n
        self._device = next(iter(flat.values())).device

    @classmethod
    def replicate(cls, tree: Pytree, n: int) -> StackedStore:
        """`n` nodes starting from the same `tree`; each row is its own copy (not an expanded view)."""
        if n < 1:
            raise ValueError(f"num_nodes must be at least 1, got {n}")
        return cls(tree_map(lambda v: v.detach().unsqueeze(0).repeat(n, *(1,) * v.ndim), tree))

    @property
    def num_nodes(self) -> int:
        return self._n

    @property
    def stacked(self) -> Pytree:
        """The whole pytree, live: in-place changes to it change the store."""
        return self._stacked

    def gather(self, ids: Sequence[int] | torch.Tensor) -> Pytree:
        """Copies of the rows of `ids`, in the order given (repeats allowed)."""
        idx = _node_ids(ids, self._n).to(self._device)
        return tree_map(lambda v: v.index_select(0, idx), self._stacked)

    def scatter(self, ids: Sequence[int] | torch.Tensor, values: Pytree) -> None:
        """Write row k of every leaf of `values` into node ids[k]; ids must be distinct (else the result would
        depend on write order)."""
        idx = _node_ids(ids, self._n).to(self._device)
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"scatter: duplicate node ids in {idx.tolist()[:20]}")
        flat = tree_flatten(values)

        def write(key: str, leaf: torch.Tensor) -> torch.Tensor:
            value = flat.pop(key, None)
            expected = (idx.numel(), *leaf.shape[1:])
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected or value.dtype != leaf.dtype:
                raise ValueError(f"scatter: leaf {key!r} must be {leaf.dtype} {expected}, got {_describe(value)}")
            return leaf.index_copy_(0, idx, value.to(self._device))

        tree_map_keyed(write, self._stacked)
        if flat:
            raise ValueError(f"scatter: unknown leaf {next(iter(flat))!r}")

    def assign(self, values: Pytree) -> None:
        """Overwrite every row with `values` (leaves shaped as the store's), in place: `scatter` to all nodes
        without an index."""
        flat = tree_flatten(values)

        def write(key: str, leaf: torch.Tensor) -> torch.Tensor:
            value = flat.pop(key, None)
            if not isinstance(value, torch.Tensor) or value.shape != leaf.shape or value.dtype != leaf.dtype:
                raise ValueError(f"assign: leaf {key!r} must be {leaf.dtype} {tuple(leaf.shape)}, got "
                                 f"{_describe(value)}")
            return leaf.copy_(value)

        tree_map_keyed(write, self._stacked)
        if flat:
            raise ValueError(f"assign: unknown leaf {next(iter(flat))!r}")

    def mean(self) -> Pytree:
        """The network average of every leaf, accumulated in float64 and returned in the leaf's dtype."""
        return tree_map(lambda v: v.double().mean(0).to(v.dtype), self._stacked)

    def sum(self) -> Pytree:
        """Every leaf summed over the nodes, in float64: this store's share of a network average whose nodes are
        spread over processes."""
        return tree_map(lambda v: v.double().sum(0), self._stacked)

    def squared_deviation(self, center: Pytree) -> torch.Tensor:
        """sum_i ||x_i - center||^2 over the nodes and every leaf, in float64 (`center` leaves without the node
        axis): this store's share of the consensus error."""
        centers, total = tree_flatten(center), torch.zeros((), dtype=torch.float64)
        for key, v in tree_flatten(self._stacked).items():
            total += ((v.double() - centers[key].to(v.device, torch.float64)) ** 2).sum().cpu()
        return total

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A snapshot: copies of the leaves by flat key ("a/b/c"), plain tensors that `torch.save` can write
        and `torch.load(weights_only=True)` can read."""
        return {k: v.detach().clone() for k, v in tree_flatten(self._stacked).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` into the store in place; keys, shapes and dtypes must match exactly."""
        flat = tree_flatten(self._stacked)
        for key in [*flat, *state]:
            if key not in flat or key not in state:
                raise ValueError(f"state_dict key {key!r}: {'missing' if key in flat else 'unexpected'}")
            value, leaf = state[key], flat[key]
            if not isinstance(value, torch.Tensor) or value.shape != leaf.shape or value.dtype != leaf.dtype:
                raise ValueError(f"state_dict key {key!r}: expected {leaf.dtype} {tuple(leaf.shape)}, "
                                 f"got {_describe(value)}")
        for key, leaf in flat.items():
            leaf.copy_(state[key])
