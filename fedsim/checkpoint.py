"""Checkpoints on disk: `RUN_DIR/checkpoints/<8-digit number>/`, one per save, written atomically.

Each MPI rank (one rank outside MPI) saves its own run state as `rank-<r>.safetensors` (the tensors) and
`rank-<r>.json` (the rest, `fedsim.state_tree`); rank 0 then writes `manifest.json` with each file's SHA-256,
the checkpoint format and fedsim version, and a checksum of the manifest itself. Files are written into
`.partial-<number>/` and the directory is renamed into place only when complete, so a run killed while saving
leaves the previous checkpoints as they were. Nothing is pickled: safetensors holds raw tensors, JSON the rest.
The last two checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch

from fedsim.errors import FedsimError
from fedsim.state_tree import StateTreeError, flatten_state, unflatten_state

FORMAT = 1
"""Version of the checkpoint layout; a checkpoint of another format is not loaded."""
KEEP = 2
"""Completed checkpoints kept in a run directory."""
DIRECTORY = "checkpoints"


class DamagedCheckpoint(FedsimError):
    """A checkpoint file is missing, truncated, altered or of another version; the message names the file."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return _sha256(json.dumps(body, sort_keys=True).encode())


def completed(root: Path) -> list[Path]:
    """The run directory's completed checkpoints, newest first."""
    base = root / DIRECTORY
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name),
                  reverse=True)


def next_number(root: Path) -> int:
    """The number the next checkpoint gets (one past the newest, completed or partial)."""
    base = root / DIRECTORY
    numbers = [int(p.name.removeprefix(".partial-")) for p in base.iterdir()
               if p.name.removeprefix(".partial-").isdigit()] if base.is_dir() else []
    return max(numbers, default=0) + 1


class Collective:
    """The few collective steps a save and a load need; one process outside MPI."""

    def __init__(self, comm: Any | None) -> None:
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, on every rank."""
        return self.comm.allgather(value) if self.comm is not None else [value]


def save(root: Path, state: Any, info: dict[str, Any], ranks: Collective) -> Path:
    """Write `state` (this rank's run state) as the next checkpoint, with `info` (variant, step, time) in the
    manifest; every rank calls this at the same point of the run. Returns the completed directory."""
    base = root / DIRECTORY
    number = ranks.gather(next_number(root) if ranks.rank == 0 else None)[0]
    partial, final = base / f".partial-{number:08d}", base / f"{number:08d}"
    if ranks.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    ranks.barrier()
    skeleton, tensors = flatten_state(state)
    tensor_bytes = safetensors.torch.save(tensors)
    json_bytes = json.dumps(skeleton, separators=(",", ":")).encode()
    names = (f"rank-{ranks.rank}.safetensors", f"rank-{ranks.rank}.json")
    for name, data in zip(names, (tensor_bytes, json_bytes), strict=True):
        _write_synced(partial / name, data)
    hashes = ranks.gather({name: _sha256(data) for name, data in zip(names, (tensor_bytes, json_bytes),
                                                                      strict=True)})
    if ranks.rank == 0:
        from fedsim import __version__

        manifest = {"format": FORMAT, "fedsim": __version__, "ranks": ranks.size, **info,
                    "files": {k: v for part in hashes for k, v in part.items()}}
        manifest["checksum"] = _manifest_checksum(manifest)
        _write_synced(partial / "manifest.json", json.dumps(manifest, indent=1).encode())
        os.replace(partial, final)
        _sync_directory(base)
        for old in completed(root)[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return final


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The checkpoint's manifest, checked: readable, its checksum right, this format and fedsim version."""
    from fedsim import __version__

    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("checksum") != _manifest_checksum(manifest):
        raise DamagedCheckpoint(f"{path}: checksum mismatch (altered or truncated)")
    if manifest.get("format") != FORMAT or manifest.get("fedsim") != __version__:
        raise DamagedCheckpoint(f"{path}: written by fedsim {manifest.get('fedsim')} (checkpoint format "
                                f"{manifest.get('format')}); this is fedsim {__version__} (format {FORMAT})")
    return manifest


def read_rank(directory: Path, manifest: dict[str, Any], rank: int) -> Any:
    """This rank's run state from a checkpoint whose manifest was checked."""
    files = {}
    for name in (f"rank-{rank}.safetensors", f"rank-{rank}.json"):
        path = directory / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DamagedCheckpoint(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None
        if _sha256(data) != manifest["files"].get(name):
            raise DamagedCheckpoint(f"{path}: checksum mismatch (altered or truncated)")
        files[name] = data
    try:
        tensors = safetensors.torch.load(files[f"rank-{rank}.safetensors"])
        return unflatten_state(json.loads(files[f"rank-{rank}.json"]), tensors)
    except (ValueError, StateTreeError, safetensors.SafetensorError) as e:
        raise DamagedCheckpoint(f"{directory / f'rank-{rank}.json'}: {e}") from None


def load_latest(root: Path, accept: Callable[[dict[str, Any]], bool], ranks: Collective,
                note: Callable[[str], None]) -> tuple[dict[str, Any], Any] | None:
    """The newest checkpoint every rank can read and `accept`s (by its manifest), as (manifest, this rank's
    state); each damaged one passed over is reported with `note` in one line naming its file. None if none."""
    for directory in completed(root):
        problem, manifest, state = None, None, None
        try:
            manifest = read_manifest(directory)
            if manifest["ranks"] != ranks.size:
                raise FedsimError(f"{directory}: written by {manifest['ranks']} process(es) (MPI ranks), resumed by "
                                  f"{ranks.size}; resume it with as many")
            if accept(manifest):
                state = read_rank(directory, manifest, ranks.rank)
        except DamagedCheckpoint as e:
            problem = str(e)
        problems = [p for p in ranks.gather(problem) if p is not None]
        if problems:
            note(f"{problems[0]}; passing over this checkpoint")
            continue
        if manifest is not None and state is not None:
            return manifest, state
    return None
