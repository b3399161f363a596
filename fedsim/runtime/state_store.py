"""A client state store for populations too large to keep every client's state in memory.

`ClientStateStore` keeps every state in a dict, so stateful rules (SCAFFOLD's control variates, FedDyn's
gradients) over a million clients need a million model-sized pytrees in RAM. `SpillingStateStore` has the same
interface but keeps only the most recently used states in memory, up to a byte budget, and spills the least
recently used ones to disk; reading a spilled state brings it back into memory (it is then the most recent).

Disk format: one raw file of fixed-size rows, memory-mapped, one row per spilled client. A store's pytrees have
a fixed structure (same keys, shapes, dtypes and devices: checked on every put), so every state packs into the
same number of bytes: each leaf's raw bytes, one after another. A dense array maps client -> row, freed rows are
reused, and the file doubles when full (a truncate and a remap: rows already written stay where they are).
Why: a million small states is a million rows of one file, not a million files (inode and open/close costs
dominate per-client files); a spill or read is a memcpy into the page cache, not a syscall or a pickle; and the
index is 8 bytes per client rather than a Python dict entry. Raw bytes round-trip any torch dtype bitwise
(bfloat16 included, which numpy cannot represent). Rows live under a private temporary directory (inside
`spill_dir` when given), removed by `close()` or when the store is garbage-collected.
"""

from __future__ import annotations

import operator
import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.params import Pytree, tree_leaves, tree_map, tree_signature

_MIN_ROWS = 64


def _owns_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _compact(tree: Pytree) -> Pytree:
    """Copy leaves that are views into larger tensors (a row of a batch), so the bytes counted are the bytes
    held; a tree whose leaves all own their storage is kept as it is (the same object, as ClientStateStore)."""
    if all(_owns_storage(v) for v in tree_leaves(tree)):
        return tree
    return tree_map(lambda v: v if _owns_storage(v) else v.clone(memory_format=torch.contiguous_format), tree)


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The leaf's data as a flat uint8 array (a view when it is already contiguous on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _client_id(client: int) -> int:
    """Client ids index the dense client -> row array: non-negative integers (numpy integers accepted)."""
    client = operator.index(client)
    if client < 0:
        raise ValueError(f"client ids must be non-negative integers, got {client}")
    return client


class _Layout:
    """The fixed structure of a store's states, and how one packs into a row of bytes."""

    def __init__(self, tree: Pytree) -> None:
        self.signature = tree_signature(tree)
        self.skeleton = tree_map(lambda v: None, tree)
        leaves = list(tree_leaves(tree))
        self.leaves = [(tuple(v.shape), v.dtype, v.device, v.numel() * v.element_size()) for v in leaves]
        self.nbytes = sum(size for *_, size in self.leaves)

    def check(self, tree: Pytree) -> None:
        if tree_signature(tree) != self.signature:
            raise ValueError(
                f"client state structure changed within one store: expected {self.signature}, "
                f"got {tree_signature(tree)}"
            )

    def unpack(self, row: np.ndarray) -> Pytree:
        """A fresh pytree holding a copy of the row's bytes."""
        tensors, pos = [], 0
        for shape, dtype, device, size in self.leaves:
            t = torch.empty(shape, dtype=dtype)
            t.reshape(-1).view(torch.uint8).numpy()[:] = row[pos : pos + size]
            tensors.append(t.to(device))
            pos += size
        it = iter(tensors)
        return tree_map(lambda _: next(it), self.skeleton)


class _SpillFile:
    """Fixed-size rows of bytes in one memory-mapped file under a private temporary directory; row per client."""

    def __init__(self, parent: Path | None, row_bytes: int) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="fedsim-states-", dir=parent))
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        self._path = self.dir / "states.bin"
        self._path.touch()
        self._row_bytes = row_bytes
        self._rows: np.ndarray | None = None  # a plain view of the memory map: cheaper to index
        self._capacity = 0
        self._next_row = 0
        self._free: list[int] = []
        self._row_of = np.full(0, -1, dtype=np.int64)
        self.count = 0

    def row_of(self, client: int) -> int:
        """The client's row, or -1 if it has none."""
        return int(self._row_of[client]) if 0 <= client < len(self._row_of) else -1

    def write(self, client: int, chunks: list[np.ndarray]) -> None:
        row = self._map_row(self._allocate(client))
        pos = 0
        for chunk in chunks:
            row[pos : pos + len(chunk)] = chunk
            pos += len(chunk)

    def clients(self) -> list[int]:
        """Clients with a row, in id order."""
        return [int(c) for c in np.flatnonzero(self._row_of >= 0)]

    def read(self, client: int) -> np.ndarray:
        """A view of the client's row (valid until the next write)."""
        return self._map_row(self.row_of(client))

    def discard(self, client: int) -> None:
        row = self.row_of(client)
        if row >= 0:
            self._row_of[client] = -1
            self._free.append(row)
            self.count -= 1

    def close(self) -> None:
        self._rows = None
        self._remove_dir()

    def _map_row(self, row: int) -> np.ndarray:
        assert self._rows is not None
        return self._rows[row]

    def _allocate(self, client: int) -> int:
        if client >= len(self._row_of):
            grown = np.full(max(client + 1, 2 * len(self._row_of)), -1, dtype=np.int64)
            grown[: len(self._row_of)] = self._row_of
            self._row_of = grown
        row = self._free.pop() if self._free else self._take_new_row()
        self._row_of[client] = row
        self.count += 1
        return row

    def _take_new_row(self) -> int:
        if self._next_row == self._capacity:
            self._grow(max(_MIN_ROWS, 2 * self._capacity))
        self._next_row += 1
        return self._next_row - 1

    def _grow(self, capacity: int) -> None:
        """Extend the file (rows already written keep their offsets) and map it again."""
        self._rows = None
        with open(self._path, "r+b") as f:
            f.truncate(capacity * self._row_bytes)
        mapped = np.memmap(self._path, dtype=np.uint8, mode="r+", shape=(capacity, self._row_bytes))
        self._rows = mapped.view(np.ndarray)
        self._capacity = capacity


class SpillingStateStore:
    """Per-client state with `ClientStateStore`'s interface, holding at most `memory_budget` bytes of states in
    memory (the most recently used) and the rest on disk, under `spill_dir` or a temporary directory.

    States must share one structure per store. Leaves that are views into larger tensors are copied on put, so
    the bytes counted are the bytes held. States read back from disk are fresh tensors on their original device.
    """

    def __init__(self, memory_budget: int, spill_dir: str | Path | None = None) -> None:
        if memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes, got {memory_budget}")
        self.memory_budget = memory_budget
        self._spill_dir = None if spill_dir is None else Path(spill_dir)
        self._memory: OrderedDict[int, Pytree] = OrderedDict()
        self._layout: _Layout | None = None
        self._disk: _SpillFile | None = None

    @property
    def memory_bytes(self) -> int:
        """Bytes of state held in memory now (never more than the budget)."""
        return len(self._memory) * (self._layout.nbytes if self._layout else 0)

    @property
    def spilled(self) -> int:
        """How many clients' states are on disk now."""
        return self._disk.count if self._disk else 0

    @property
    def spill_path(self) -> Path | None:
        """The directory spilled states are written to, once the first one is."""
        return self._disk.dir if self._disk else None

    def get(self, client: int) -> Pytree | None:
        client = _client_id(client)
        if client in self._memory:
            self._memory.move_to_end(client)
            return self._memory[client]
        if self._disk is None or self._disk.row_of(client) < 0:
            return None
        assert self._layout is not None
        state = self._layout.unpack(self._disk.read(client))
        if self._layout.nbytes <= self.memory_budget:
            self._disk.discard(client)
            self._keep(client, state)
        return state

    def put(self, client: int, state: Pytree | None) -> None:
        """Store the client's state (None deletes it); it becomes the most recently used."""
        client = _client_id(client)
        if state is not None:
            self._check_structure(state)
        self._memory.pop(client, None)
        if self._disk is not None:
            self._disk.discard(client)
        if state is not None:
            self._keep(client, _compact(state))

    def __len__(self) -> int:
        return len(self._memory) + self.spilled

    def state_dict(self) -> dict[str, Any]:
        """The states in memory (least recent first) and the spilled rows as one byte tensor with their clients
        (the rows, not the memory map), plus a state of the store's structure to unpack them with."""
        memory = list(self._memory.items())
        template = memory[0][1] if memory else None
        spilled: dict[str, Any] = {"clients": [], "rows": None}
        if self._disk is not None and self._disk.count:
            clients = self._disk.clients()
            rows = np.stack([self._disk.read(c) for c in clients])
            spilled = {"clients": clients, "rows": torch.from_numpy(rows)}
            if template is None:
                assert self._layout is not None
                template = self._layout.unpack(rows[0])
        return {"template": template, "memory": memory, "spilled": spilled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents with a `state_dict()`: spilled rows go back to disk, memory states to memory."""
        self.close()
        if state["template"] is None:
            return
        self._check_structure(state["template"])
        assert self._layout is not None
        rows = state["spilled"]["rows"]
        if state["spilled"]["clients"]:
            self._disk = _SpillFile(self._spill_dir, self._layout.nbytes)
            for client, row in zip(state["spilled"]["clients"], rows.numpy(), strict=True):
                self._disk.write(client, [row])
        for client, tree in state["memory"]:
            self._check_structure(tree)
            self._keep(client, tree)

    def close(self) -> None:
        """Drop every state and delete the spill files; the store is empty (and usable) afterwards."""
        self._memory.clear()
        if self._disk is not None:
            self._disk.close()
        self._disk = None
        self._layout = None

    def __enter__(self) -> SpillingStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_structure(self, state: Pytree) -> None:
        """The first state fixes the store's structure; later ones must match it."""
        if self._layout is None:
            self._layout = _Layout(state)
        else:
            self._layout.check(state)

    def _keep(self, client: int, state: Pytree) -> None:
        """Hold the state in memory as the most recent, spilling the least recent while over budget."""
        self._memory[client] = state
        while self.memory_bytes > self.memory_budget:
            self._spill(*self._memory.popitem(last=False))

    def _spill(self, client: int, state: Pytree) -> None:
        assert self._layout is not None
        if self._disk is None:
            self._disk = _SpillFile(self._spill_dir, self._layout.nbytes)
        self._disk.write(client, [_raw_bytes(v) for v in tree_leaves(state)])
