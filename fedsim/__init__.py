"""fedsim: a simulator for federated and decentralized learning.

Algorithms are pure tensor rules; runtimes decide where and when they run, on a virtual clock.
`fedsim.run("scenario.yaml", overrides={"seed": 3})` runs a scenario and returns its metrics table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedsim.api import RunResult


def run(*args: Any, **kwargs: Any) -> RunResult:
    """Run a scenario; see `fedsim.api.run` (imported lazily so `import fedsim` stays cheap)."""
    from fedsim.api import run as _run

    return _run(*args, **kwargs)


def resume(*args: Any, **kwargs: Any) -> RunResult:
    """Continue a stopped run from its run directory; see `fedsim.api.resume`."""
    from fedsim.api import resume as _resume

    return _resume(*args, **kwargs)
