"""Counter-based random numbers in plain torch ops: every draw is a pure function of (key, salt, position).

Keys are int64 tensors of two uint32 words, so a batch of clients can draw under `torch.func.vmap` exactly what a
Python loop over the same keys draws (torch generators cannot be per-batch-element). The bit generator is
Philox4x32-R (Salmon et al., SC 2011, "Parallel random numbers: as easy as 1, 2, 3"; checked against Random123's KATs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedsim.params import Pytree, tree_leaves, tree_map

_MASK = 0xFFFFFFFF
_MULT = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)
# fold_in's counter words 2-3: a negative salt's high word, so derived keys never repeat a non-negative salt's block.
_FOLD_TAG = (0x666F6C64, _MASK)


def philox4x32(counter: torch.Tensor, key: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Philox4x32-`rounds` of int64 (..., 4) uint32 counter words under int64 (..., 2) key words (broadcast).

    Pure int64 tensor ops, safe under vmap: a 32x32-bit product is < 2^64, so its int64 bit pattern is exact and
    `(p >> 32) & mask` (arithmetic shift, then mask) is its high word.
    """
    if rounds < 1:
        raise ValueError(f"philox4x32 needs at least one round, got {rounds}")
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _WEYL[0]) & _MASK, (k1 + _WEYL[1]) & _MASK
        p0, p1 = c0 * _MULT[0], c2 * _MULT[1]
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK) ^ c1 ^ k0, p1 & _MASK, ((p0 >> 32) & _MASK) ^ c3 ^ k1, p0 & _MASK
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def key_from_seed(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The key (low word, high word) of a non-negative 64-bit seed, e.g. from `fedsim.seeding.derive_seed`."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.tensor([seed & _MASK, seed >> 32], dtype=torch.int64, device=device)


def _int64(value: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.int64, device=device)


def fold_in(key: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key from `key` and an integer (as jax.random.fold_in): one Philox block, batched-safe under vmap."""
    d = _int64(data, key.device)
    words = [d & _MASK, (d >> 32) & _MASK, *(torch.full_like(d, t) for t in _FOLD_TAG)]
    return philox4x32(torch.stack(words, dim=-1), key)[..., :2]


def _words(key: torch.Tensor, salt: int | torch.Tensor, n: int) -> torch.Tensor:
    """The first n uint32 words of the stream (key, salt): counters (block lo, block hi, salt lo, salt hi)."""
    blocks = -(-n // 4)
    block = torch.arange(blocks, dtype=torch.int64, device=key.device)
    s = _int64(salt, key.device)
    counter = torch.stack([block & _MASK, block >> 32, (s & _MASK).expand(blocks), ((s >> 32) & _MASK).expand(blocks)],
                          dim=-1)
    return philox4x32(counter, key).reshape(-1)[:n]


def _unit_float(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floats strictly inside (0, 1) from uint32 words (one per float32, two per float64).

    The centre (2m + 1) * 2^-(b+1) of one of 2^b equal cells, m the top b = 23 (float32) or 52 (float64) bits: exact in
    the dtype, so neither 0 nor 1 can come out (a rounded (m + 0.5) * 2^-24 with 24 bits would reach 1.0 in float32).
    """
    if dtype == torch.float32:
        odd = (words >> 9) * 2 + 1
        return odd.to(dtype) * 2.0**-24
    if dtype == torch.float64:
        hi, lo = words.reshape(-1, 2).unbind(-1)
        odd = (((hi >> 6) << 26) | (lo >> 6)) * 2 + 1
        return odd.to(dtype) * 2.0**-53
    raise ValueError(f"keyed draws support float32 and float64, got {dtype}")


def uniform(key: torch.Tensor, salt: int | torch.Tensor, shape: Sequence[int],
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform floats in the open interval (0, 1) of `shape`; `salt` (int or 0-d int64 tensor) picks a fresh stream.

    Salts are non-negative (below 2**63); the first n draws are the same whatever the shape.
    """
    n = math.prod(shape)
    per = 2 if dtype == torch.float64 else 1
    return _unit_float(_words(key, salt, n * per), dtype).reshape(tuple(shape))


def normal(key: torch.Tensor, salt: int | torch.Tensor, shape: Sequence[int],
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals of `shape` by Box-Muller on consecutive uniform pairs, both outputs used (interleaved).

    As with `uniform`, the first n draws are the same whatever the shape.
    """
    n = math.prod(shape)
    u = uniform(key, salt, (2 * -(-n // 2),), dtype)
    radius, angle = torch.sqrt(-2.0 * torch.log(u[0::2])), (2.0 * math.pi) * u[1::2]
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1).reshape(-1)[:n].reshape(
        tuple(shape))


def tree_normal(key: torch.Tensor, salt: int | torch.Tensor, like: Pytree) -> Pytree:
    """Standard normals shaped like each leaf of `like` (its dtype and device); leaf i draws under fold_in(key, i).

    Leaves are numbered in `tree_leaves` order, which is also the order `tree_map` visits them in.
    """
    draws = iter([normal(fold_in(key, i), salt, leaf.shape, torch.float64 if leaf.dtype == torch.float64
                         else torch.float32).to(dtype=leaf.dtype, device=leaf.device)
                  for i, leaf in enumerate(tree_leaves(like))])
    return tree_map(lambda _: next(draws), like)
