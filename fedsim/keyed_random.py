"""Counter-based random numbers in plain torch ops: every draw is a pure function of (key, salt, position), or of
(key, position) for the codecs' streams.

Keys are int64 tensors of two uint32 words, so a batch of clients can draw under `torch.func.vmap` exactly what a
Python loop over the same keys draws (torch generators cannot be per-batch-element). Two bit generators:
  Philox4x32-R (Salmon et al., SC 2011, "Parallel random numbers: as easy as 1, 2, 3"; checked against Random123's
      KATs) for keys (`fold_in`) and the salted streams of `uniform`, `normal` and `tree_normal`;
  SplitMix64 (Steele, Lea, Flood, OOPSLA 2014: a Weyl sequence through Stafford's Mix13 finalizer; passes BigCrush;
      checked against its reference outputs) for `splitmix64` and `fast_uniform`, the draws codecs take per entry
      of a message: in torch's int64 ops a float32 draw costs a third or less of what `uniform`'s does.
Keys are (2,) tensors; vmap adds a batch of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
        c0, c1, c2, c3 = _high_xor(p1, c1, k0), p1, _high_xor(p0, c3, k1), p0
    return torch.stack(torch.broadcast_tensors(c0, c1 & _MASK, c2, c3 & _MASK), dim=-1)


def _high_xor(product: torch.Tensor, word: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(high word of `product`) ^ word ^ key as a uint32 word, whatever `word` holds above bit 31.

    Philox's low words (c1, c3) are kept as the raw products: only their low 32 bits reach an output, through this
    XOR and the final mask, so masking them every round is skipped. One temporary, the rest in place (about twice
    as fast as a fresh tensor per op on CPU)."""
    out = (product >> 32) ^ key
    out ^= word
    return out.bitwise_and_(_MASK)


def _signed64(word: int) -> int:
    """A uint64 constant as the int64 with its bit pattern."""
    return word - 2**64 if word >= 2**63 else word


_GOLDEN_GAMMA = _signed64(0x9E3779B97F4A7C15)
_MIX13 = (_signed64(0xBF58476D1CE4E5B9), _signed64(0x94D049BB133111EB))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns of uint64 values (torch's >> is arithmetic), as a new tensor."""
    return (z >> bits).bitwise_and_((1 << (64 - bits)) - 1)


def mix64_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function (Stafford's Mix13), in place on int64 bit patterns of uint64 values (returned).

    Products wrap modulo 2^64 in int64 as in uint64, so the bit patterns are exactly the reference's. In place, as
    a few fresh temporaries per call are about 20% slower on CPU."""
    z ^= _shift_right(z, 30)
    z *= _MIX13[0]
    z ^= _shift_right(z, 27)
    z *= _MIX13[1]
    z ^= _shift_right(z, 31)
    return z


CHUNK = 1024
"""Outputs `splitmix64` computes at a time: a chunk's int64 temporaries (under vmap, times the batch) stay in cache,
where whole streams of a million entries pass through memory a dozen times: two to three times faster on CPU."""


def splitmix64(key: torch.Tensor, n: int,
               then: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The first n outputs (int64 bit patterns) of SplitMix64 seeded with the key's 64 bits, low word first; with
    `then`, its result on each chunk of outputs and their positions (int64), joined along the last axis.

    Output i is mix64_(seed + (i + 1) * 0x9E3779B97F4A7C15): a pure function of (key, i), so a prefix of a longer
    stream, the same under vmap and on every device. Two keys' streams share outputs only when their seeds differ by
    j times the gamma (mod 2^64) for some |j| < n: with keys from `fold_in` or `key_from_seed(derive_seed(...))` that
    is a chance of about n / 2^63 per pair. `then` turns outputs into what the caller keeps while they are in cache."""
    seed = key[..., 0] | (key[..., 1] << 32)
    parts = []
    for start in range(0, n, CHUNK):
        positions = torch.arange(start, min(n, start + CHUNK), dtype=torch.int64, device=key.device)
        outputs = mix64_((positions + 1) * _GOLDEN_GAMMA + seed)
        parts.append(outputs if then is None else then(outputs, positions))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=key.device)
        return empty if then is None else then(empty, empty)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _float32_pair(outputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Two float32 draws per output: the top 23 bits m of its high, then of its low 32-bit word, as (2m + 1) 2^-24."""
    high, low = (outputs >> 41).to(torch.int32), (outputs >> 9).bitwise_and_(0x7FFFFF).to(torch.int32)  # fit int32
    m = torch.stack([high, low], dim=-1).reshape(-1).bitwise_and_(0x7FFFFF)
    return m.to(torch.float32).mul_(2.0**-23).add_(2.0**-24)


def _float64_one(outputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One float64 draw per output: its top 52 bits m, as (2m + 1) 2^-53."""
    return _shift_right(outputs, 12).to(torch.float64).mul_(2.0**-52).add_(2.0**-53)


def fast_uniform(key: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform floats in the open interval (0, 1) of `shape`, from `splitmix64(key, ...)`: what codecs draw per entry.

    The cells of `uniform` (the centre (2m + 1) * 2^-(b+1) of one of 2^b cells), m taken from SplitMix64 outputs:
    float32 draws 2i and 2i + 1 are the top 23 bits of output i's high and low 32-bit words, a float64 draw i the
    top 52 bits of output i. No salt: a codec draws once per key (fold_in a key for more streams)."""
    n = math.prod(shape)
    if dtype == torch.float32:
        return splitmix64(key, -(-n // 2), _float32_pair)[:n].reshape(tuple(shape))
    if dtype == torch.float64:
        return splitmix64(key, n, _float64_one).reshape(tuple(shape))
    raise ValueError(f"keyed draws support float32 and float64, got {dtype}")


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
    if dtype == torch.float32:  # m 2^-23 + 2^-24 is exact, as (2m + 1) 2^-24 is: the same floats, fewer int64 passes
        return (words >> 9).to(torch.int32).to(dtype).mul_(2.0**-23).add_(2.0**-24)
    if dtype == torch.float64:
        hi, lo = words.reshape(-1, 2).unbind(-1)
        m = ((hi >> 6) << 26).bitwise_or_(lo >> 6)
        return m.to(dtype).mul_(2.0**-52).add_(2.0**-53)
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
