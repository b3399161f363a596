"""How much memory this process may still use, so work can be sized before anything is allocated.

A scenario that asks for more than the machine (or the process's resource limits) can give is refused with one
line naming the field, instead of dying in `MemoryError` or being killed half-way through a build.
"""

from __future__ import annotations

import os
import resource

from fedsim.errors import ScenarioError


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _self_status(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmSize, VmData), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory() -> int:
    """Bytes this process can still allocate: the machine's available memory, lowered by the process's address
    space and data limits (RLIMIT_AS, RLIMIT_DATA) minus what it already uses under them."""
    candidates = [m for m in (_meminfo_available(), _physical_memory()) if m is not None][:1]
    for limit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            candidates.append(max(0, soft - (_self_status(used) or 0)))
    return min(candidates) if candidates else 2**63


def format_bytes(n: float) -> str:
    """A byte count for people: 512 B, 3.2 MiB, 1.5 TiB, 2.0e+06 PiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB" if n < 1e6 else f"{n:.1e} PiB"


def check_fits(field: str, needed: float, what: str) -> None:
    """Refuse work that needs more memory than this process can get, before allocating any of it.

    `field` is the scenario field (or fields) to change, `what` says what would be built; both appear in the
    one-line error."""
    available = available_memory()
    if needed > available:
        raise ScenarioError(
            f"{field}: too large: {what} needs about {format_bytes(needed)}, more than the "
            f"{format_bytes(available)} of memory available"
        )
