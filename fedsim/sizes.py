"""Byte sizes in scenario files: `2GiB`, `512MB`, `1e9` or a plain number of bytes."""

from __future__ import annotations

import math
import re

MAX_BYTES = 2**63
"""Sizes must fit in a signed 64-bit integer."""
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | float | str) -> int:
    """The number of bytes a size names (a whole number, 2e9 included, or a string with a unit); ValueError (a
    one-line scenario error) when it names none."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in UNITS:
            raise ValueError("not a size (use e.g. 512MB or 2GiB)")
        try:
            number = float(match.group(1)) * UNITS[match.group(2).lower()]
        except ValueError:
            raise ValueError("not a size (use e.g. 512MB or 2GiB)") from None
        if not math.isfinite(number) or number >= MAX_BYTES:
            raise ValueError(f"too large (at most {MAX_BYTES - 1} bytes)")
        size = int(number)
    if size <= 0:
        raise ValueError("must be positive")
    if size >= MAX_BYTES:
        raise ValueError(f"too large (at most {MAX_BYTES - 1} bytes)")
    return size
