"""Operations on pytrees: nested `dict[str, ...]` mappings whose leaves are tensors.

A model's parameters are a flat `dict[str, Tensor]` (as `torch.func.functional_call` takes); messages and states
nest them (`{"delta": params}`). Rules and runtimes share these helpers so every algorithm does the same
arithmetic in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

Pytree = dict[str, Any]


def tree_map(fn: Callable[..., torch.Tensor], tree: Pytree, *rest: Pytree) -> Pytree:
    """Apply `fn` leaf-wise to trees of the same structure."""
    return {k: tree_map(fn, v, *(r[k] for r in rest)) if isinstance(v, dict) else fn(v, *(r[k] for r in rest))
            for k, v in tree.items()}


def tree_leaves(tree: Pytree) -> Iterator[torch.Tensor]:
    for v in tree.values():
        if isinstance(v, dict):
            yield from tree_leaves(v)
        else:
            yield v


def tree_signature(tree: Pytree) -> tuple[Any, ...]:
    """Keys in order, and each leaf's shape, dtype and device: trees with equal signatures stack leaf by leaf."""
    return tuple(
        (key, tree_signature(v) if isinstance(v, dict) else (tuple(v.shape), v.dtype, v.device))
        for key, v in tree.items()
    )


def tree_unstack(tree: Pytree, n: int) -> list[Pytree]:
    """Split a tree whose leaves have a leading axis of size n into n trees of views (one `unbind` per leaf)."""
    parts = {k: tree_unstack(v, n) if isinstance(v, dict) else v.unbind(0) for k, v in tree.items()}
    return [{k: part[i] for k, part in parts.items()} for i in range(n)]


def tree_sub(a: Pytree, b: Pytree) -> Pytree:
    return tree_map(torch.sub, a, b)


def tree_zeros_like(a: Pytree) -> Pytree:
    return tree_map(torch.zeros_like, a)


def tree_nbytes(a: Pytree) -> int:
    """Exact size of the leaves' data in bytes, as sent over a link."""
    return sum(v.numel() * v.element_size() for v in tree_leaves(a))


def tree_is_finite(a: Pytree) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tree_leaves(a))


def tree_to(tree: Pytree | None, device: torch.device | str) -> Pytree | None:
    """The tree with every leaf on `device` (None stays None: stateless clients)."""
    return None if tree is None else tree_map(lambda v: v.to(device), tree)
