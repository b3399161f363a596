"""Byte sizes in scenario files: `2GiB`, `512MB`, `1e9` or a plain number of bytes."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str) -> int:
    """The number of bytes a size names; ValueError (a one-line scenario error) when it names none."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in UNITS:
            raise ValueError(f"not a size: {value!r} (use e.g. 512MB or 2GiB)")
        size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("must be positive")
    return size
