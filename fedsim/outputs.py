"""The run directory: resolved scenario, metrics.jsonl, summary and plot, each written atomically (a temporary
file renamed into place), so a killed run never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from fedsim.errors import FedsimError


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def choose_run_dir(requested: str | Path | None, default_name: str, overwrite: bool) -> Path:
    """The explicit directory (refusing to replace an earlier run unless told to), or the first free
    `runs/<name>`, `runs/<name>-2`, ..."""
    if requested is not None:
        path = Path(requested)
        if (path / "metrics.jsonl").exists() and not overwrite:
            raise FedsimError(f"output directory {path} already holds a run; pass --overwrite or choose another")
        return path
    path, n = Path("runs") / default_name, 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{default_name}-{n}"
    return path


class RunDirectory:
    """Writes one run's files under `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._metrics: list[str] = []
        path.mkdir(parents=True, exist_ok=True)

    def write_scenario(self, resolved: list[dict[str, Any]], names: list[str]) -> None:
        """The resolved scenario, re-runnable as it stands: one mapping, or `variants` of full mappings."""
        doc = resolved[0] if len(resolved) == 1 and names == [resolved[0]["name"]] else {
            "variants": dict(zip(names, resolved, strict=True))
        }
        write_atomic(self.path / "scenario.yaml", yaml.safe_dump(doc, sort_keys=False))

    def write_json(self, name: str, payload: Any) -> None:
        write_atomic(self.path / name, json.dumps(payload, indent=2) + "\n")

    def append_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        """Add rows to metrics.jsonl; the whole file is rewritten atomically, so it is always complete."""
        self._metrics.extend(json.dumps(r) for r in rows)
        write_atomic(self.path / "metrics.jsonl", "\n".join(self._metrics) + "\n")
