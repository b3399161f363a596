"""Seed derivation: every random draw comes from its own stream, keyed by (seed, stream, ...), so draws do not
depend on the order a runtime visits clients in, nor on which algorithm runs (the same clients and stragglers are
drawn for every method under one seed, as the FedProx paper's code arranges by seeding per round).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    DATA = 1
    SELECTION = 2
    LOCAL = 3
    SYSTEMS = 4
    MODEL = 5
    EVALUATION = 6
    ORACLE = 7
    SERVER = 8
    PROTOCOL = 9
    CODEC = 10
    TOPOLOGY = 11
    GOSSIP = 12


def derive_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 63-bit integer seed for the given stream and keys (round, client, ...)."""
    state = np.random.SeedSequence([seed, int(stream), *keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


# NumPy's SeedSequence hash constants (numpy/random/bit_generator.pyx), for `derive_seeds`.
_MASK32 = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT, _POOL_SIZE = 0xCA01F9DD, 0x4973F715, 16, 4


def _uint32_words(value: int) -> list[int]:
    """A non-negative integer as SeedSequence reads it: 32-bit words, least significant first (0 is one word)."""
    if value < 0:
        raise ValueError(f"seed material must be non-negative, got {value}")
    words = [value & _MASK32]
    while value > _MASK32:
        value >>= 32
        words.append(value & _MASK32)
    return words


def _hasher(init: int, mult: int) -> Callable[[np.ndarray], np.ndarray]:
    """SeedSequence's hashmix on uint32 arrays, with its running multiplier starting from `init`."""
    const = init

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal const
        value = value ^ np.uint32(const)
        const = (const * mult) & _MASK32
        value = value * np.uint32(const)
        return value ^ (value >> np.uint32(_XSHIFT))

    return hashmix


def derive_seeds(seed: int, stream: Stream, *keys: int | Sequence[int], last: Sequence[int]) -> list[int]:
    """`derive_seed(seed, stream, *keys, k)` for every k in `last`, at once: SeedSequence's hash (mix the entropy
    words into a pool of 4, then `generate_state(2)`) run on NumPy arrays over k. A key may vary too (a sequence
    as long as `last`: e.g. the job ids of jobs from several versions). A runtime starting many clients'
    generators per round pays ~10 us each through SeedSequence objects; this costs ~1 us each."""
    last = _one_word(last, "the varying key")
    n = len(last)
    entropy = []
    for v in (seed, int(stream), *keys):
        if isinstance(v, (int, np.integer)):
            entropy += [np.full(n, w, dtype=np.uint32) for w in _uint32_words(int(v))]
        else:
            entropy.append(_one_word(v, "a varying key"))
    entropy.append(last)
    hashmix = _hasher(_INIT_A, _MULT_A)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
        return result ^ (result >> np.uint32(_XSHIFT))

    zero = np.zeros(n, dtype=np.uint32)
    pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL_SIZE)]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL_SIZE, len(entropy)):
        for dst in range(_POOL_SIZE):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    generate = _hasher(_INIT_B, _MULT_B)
    state = [generate(word).astype(np.int64) for word in pool[:2]]
    return ((state[0] << 31) ^ state[1]).tolist()


def _one_word(values: Sequence[int], what: str) -> np.ndarray:
    """Key values that SeedSequence reads as one 32-bit word each, as a uint32 array."""
    array = np.asarray(values, dtype=np.uint64)
    if array.size and int(array.max()) > _MASK32:
        raise ValueError(f"derive_seeds: {what} must fit in 32 bits")
    return array.astype(np.uint32)


def numpy_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, int(stream), *keys]))


def torch_generator(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stream, *keys))


def torch_generators(seed: int, stream: Stream, *keys: int, last: Sequence[int]) -> list[torch.Generator]:
    """`torch_generator(seed, stream, *keys, k)` for every k in `last` (e.g. the clients of a round), at once."""
    return [torch.Generator().manual_seed(s) for s in derive_seeds(seed, stream, *keys, last=last)]
