"""Seed derivation: every random draw comes from its own stream, keyed by (seed, stream, ...), so draws do not
depend on the order a runtime visits clients in, nor on which algorithm runs (the same clients and stragglers are
drawn for every method under one seed, as the FedProx paper's code arranges by seeding per round).
"""

from __future__ import annotations

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


def derive_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 63-bit integer seed for the given stream and keys (round, client, ...)."""
    state = np.random.SeedSequence([seed, int(stream), *keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def numpy_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, int(stream), *keys]))


def torch_generator(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stream, *keys))
