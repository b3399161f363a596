"""Unsigned integers of a fixed bit width packed densely into uint8 and back, as a codec's payload carries them.

Pure tensor ops on one 1-D tensor (vmap adds a client axis): value i occupies bits [i*w, (i+1)*w) of the stream,
least significant bit first, and bit b of the stream is bit b % 8 of byte b // 8; the last byte is zero-padded.
Eight values of w bits fill exactly w bytes, so both directions work on groups of eight: each output byte (value)
is a few shifted columns OR-ed together, with the overlaps worked out in Python once per width. Widths up to 24 work
in int32 (about twice as fast on CPU as int64), wider ones in int64.
"""

from __future__ import annotations

import operator
from functools import reduce

import torch

MAX_WIDTH = 56
"""Widest value packed: a value shifted by up to 7 bits stays below 2^63 in int64."""
MAX_INT32_WIDTH = 24
"""Widest value worked on in int32: shifted by up to 7 bits it stays below 2^31."""


def packed_size(n: int, width: int) -> int:
    """Bytes that n values of `width` bits pack into: ceil(n * width / 8)."""
    return -(-n * width // 8)


def int_dtype(width: int) -> torch.dtype:
    """The integer dtype `pack` works in and `unpack` returns for values of `width` bits."""
    return torch.int32 if width <= MAX_INT32_WIDTH else torch.int64


def _check_width(width: int) -> None:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"bit width must be in 1..{MAX_WIDTH}, got {width}")


def _shifted(column: torch.Tensor, left: int) -> torch.Tensor:
    return column << left if left >= 0 else column >> -left


def pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """The 1-D integer tensor `values` (each in [0, 2**width)) as `packed_size(n, width)` uint8 bytes."""
    _check_width(width)
    n = values.shape[-1]
    groups = torch.nn.functional.pad(values.to(int_dtype(width)), (0, (-n) % 8)).reshape(-1, 8)
    out = []
    for j in range(width):  # byte j of a group holds bits [8j, 8j + 8): parts of values 8j // w to (8j + 7) // w
        first, last = 8 * j // width, min(7, (8 * j + 7) // width)
        byte = reduce(operator.or_, [_shifted(groups[:, i], i * width - 8 * j) for i in range(first, last + 1)])
        out.append((byte & 0xFF).to(torch.uint8))
    return torch.stack(out, dim=-1).reshape(-1)[: packed_size(n, width)]


def unpack(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """The n values of `width` bits that `pack` put into the uint8 tensor `packed`, as `int_dtype(width)`."""
    _check_width(width)
    groups = -(-n // 8)
    data = torch.nn.functional.pad(packed, (0, groups * width - packed.shape[-1])).reshape(-1, width)
    data = data.to(int_dtype(width))
    mask, out = (1 << width) - 1, []
    for i in range(8):  # value i of a group holds bits [i*w, i*w + w): parts of bytes i*w // 8 to (i*w + w - 1) // 8
        first, last = i * width // 8, (i * width + width - 1) // 8
        value = reduce(operator.or_, [_shifted(data[:, j], 8 * j - i * width) for j in range(first, last + 1)])
        out.append(value & mask)
    return torch.stack(out, dim=-1).reshape(-1)[:n]
