"""The run directory: resolved scenario, metrics.jsonl, summary, job timelines and pictures, each written atomically
(a temporary file renamed into place), so a killed run never leaves a half-written file."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.errors import FedsimError, ScenarioError
from fedsim.strict_input import dump_yaml, shorten_key


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


def check_output_location(location: str | Path, setting: str) -> None:
    """Refuse, before any work, a directory that cannot be created and written: an empty or malformed path, a
    component too long for the file system, a file where a directory is needed, or a place this process cannot
    write (such as /proc). The test creates and removes one empty probe directory; nothing else is written."""
    text = str(location)
    if not text.strip():
        raise ScenarioError(f"{setting}: empty; name a directory")
    if "\0" in text:
        raise ScenarioError(f"{setting}: the path contains a NUL byte")
    path = Path(text).absolute()
    name_max = _path_limit(Path.cwd(), "PC_NAME_MAX", 255)
    long_part = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if long_part is not None:
        raise ScenarioError(f"{setting}: the name {long_part[:40]}... is longer than the {name_max} bytes the "
                            f"file system allows")
    if len(os.fsencode(str(path))) >= _path_limit(Path.cwd(), "PC_PATH_MAX", 4096):
        raise ScenarioError(f"{setting}: the path is longer than the file system allows")
    ancestor = path
    while not _exists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor == path and not path.is_dir():
        raise ScenarioError(f"{setting}: {shorten_key(text)} exists and is not a directory")
    if not ancestor.is_dir():
        raise ScenarioError(f"{setting}: {shorten_key(str(ancestor))} is a file, so {shorten_key(text)} cannot be "
                            f"created under it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedsim-probe-", dir=ancestor))
    except OSError as exc:
        raise ScenarioError(f"{setting}: cannot create a directory in {shorten_key(str(ancestor))} "
                            f"({exc.strerror or type(exc).__name__})") from None


def _exists(path: Path) -> bool:
    """Whether `path` exists; a path that cannot even be looked up (permissions, loops) counts as missing, so
    the search for a writable ancestor goes on upwards."""
    try:
        return path.exists()
    except OSError:
        return False


def _path_limit(directory: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(directory, name)
    except (OSError, ValueError):
        return default


def choose_run_dir(requested: str | Path | None, default_name: str, overwrite: bool,
                   setting: str = "--out") -> Path:
    """The explicit directory (refusing to replace an earlier run unless told to), or the first free
    `runs/<name>`, `runs/<name>-2`, ...; either way checked to be creatable (`check_output_location`)."""
    if requested is not None:
        check_output_location(requested, setting)
        path = Path(requested)
        if (path / "metrics.jsonl").exists() and not overwrite:
            raise ScenarioError(f"{setting}: {shorten_key(str(path))} already holds a run; pass --overwrite or choose "
                                f"another")
        return path
    path, n = Path("runs") / default_name, 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{default_name}-{n}"
    check_output_location(path, "output.dir (default runs/<name>)")
    return path


def make_dirs(path: Path) -> None:
    """Create `path` and its missing parents; if that fails half-way, remove what was created and raise a
    one-line error, so a failed run leaves no empty folders behind."""
    missing = []
    ancestor = path
    while not ancestor.exists():
        missing.append(ancestor)
        ancestor = ancestor.parent
    try:
        for directory in reversed(missing):
            directory.mkdir()
    except OSError as exc:
        for directory in missing:
            if directory.is_dir():
                directory.rmdir()
        raise FedsimError(f"cannot create the run directory {shorten_key(str(path))}: {exc.strerror or exc}") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a run directory's metrics.jsonl (none when it has none yet)."""
    try:
        text = (path / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        raise FedsimError(f"{path / 'metrics.jsonl'}: not valid JSON lines") from None


def timeline_file(variant: str) -> str:
    """The name of a variant's job timeline file in the run directory."""
    return f"timeline-{variant}.npz"


def read_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz file written by `RunDirectory.write_arrays` (None when there is none: a run directory
    from before timelines were written)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, zipfile.BadZipFile):
        raise FedsimError(f"{path}: not a readable .npz file") from None


def scenario_document(resolved: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Resolved variants as one loadable document: the mapping itself, or `variants` of full mappings."""
    if len(resolved) == 1 and names == [resolved[0]["name"]]:
        return resolved[0]
    return {"variants": dict(zip(names, resolved, strict=True))}


class RunDirectory:
    """Writes one run's files under `path`."""

    def __init__(self, path: Path, keep: Iterable[dict[str, Any]] = ()) -> None:
        """A new run directory, or (resuming) an existing one whose metrics.jsonl is cut back to the rows `keep`."""
        self.path = path
        self._metrics: list[str] = []
        make_dirs(path)
        if keep or (path / "metrics.jsonl").exists():
            self.append_metrics(keep)

    def write_scenario(self, resolved: list[dict[str, Any]], names: list[str]) -> None:
        """The resolved scenario, re-runnable as it stands (`scenario_document`)."""
        write_atomic(self.path / "scenario.yaml", dump_yaml(scenario_document(resolved, names)))

    def write_json(self, name: str, payload: Any) -> None:
        write_atomic(self.path / name, json.dumps(payload, indent=2) + "\n")

    def write_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Named arrays as an uncompressed .npz file (`numpy.load` reads it, no pickling)."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic(self.path / name, buf.getvalue())

    def append_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        """Add rows to metrics.jsonl; the whole file is rewritten atomically, so it is always complete."""
        self._metrics.extend(json.dumps(r) for r in rows)
        write_atomic(self.path / "metrics.jsonl", "\n".join(self._metrics) + "\n")
