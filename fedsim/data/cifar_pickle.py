"""CIFAR-10's python-format batches, read without trusting the pickles they are.

A batch's pickle is first scanned opcode by opcode (building nothing), then unpickled by an unpickler that admits
only the few globals a batch references, as guarded stand-ins, so it builds nothing but plain containers and
numeric arrays whose sizes have been checked against the file.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections import deque
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedsim.data.files import NUM_CLASSES, bad_label, check_labels, clip, reading, shown
from fedsim.errors import DataError
from fedsim.resources import check_fits, format_bytes

CIFAR_ROW_BYTES = 3 * 32 * 32
CIFAR_BATCH_MAX_BYTES = 256 << 20
"""Largest batch file read: a real one holds 10,000 rows in 31 MB (47 MB when re-pickled by Python 3)."""
UNPICKLE_BYTES_PER_FILE_BYTE = 4
"""Peak memory of reading one batch per byte of its file: the file and the objects built from it (measured: 3 for
the files Python 2 wrote, 2 at protocol 3 or 4, just under 4 at protocol 2 by Python 3, whose bytes travel as text)."""
PICKLE_OPS_PER_ROW = 32
"""Opcodes allowed per 3072-byte row a batch file could hold (a real batch needs under 10: label, file name)."""
MAX_ARRAY_NDIM = 32



class _NotABatch(Exception):
    """Raised while scanning or unpickling a batch, with the reason the file is no CIFAR-10 batch."""


class _ArrayType:
    """What `numpy.ndarray` unpickles to: a token that only `_reconstruct` accepts, never callable."""

    __slots__ = ()


_ARRAY_TYPE = _ArrayType()


def _text(value: object) -> object:
    """A Python 2 string (bytes, under encoding="bytes") as str; anything else unchanged."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


class _PickledDtype:
    """A dtype as a pickle describes it, kept as a checked type code and byte order: numpy never sees the pickle's
    dtype state, whose flags it would trust (a flag can make raw bytes pass for object pointers)."""

    __slots__ = ("code", "byteorder")

    def __init__(self, code: str) -> None:
        self.code = code
        self.byteorder = "|"

    def __setstate__(self, state: object) -> None:
        """Take the byte order from numpy's dtype state, which for a plain dtype holds nothing else of use."""
        if not (isinstance(state, tuple) and len(state) >= 5 and all(v is None for v in state[2:5])):
            raise _NotABatch("it holds a dtype with fields or subarrays, not a plain numeric one")
        order = _text(state[1])
        if order not in ("<", ">", "|", "="):
            raise _NotABatch("it holds a dtype with an unknown byte order")
        self.byteorder = order

    def resolve(self) -> np.dtype:
        """The numpy dtype, built afresh from the code and byte order."""
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in ("<", ">") else dtype


def _array_state(state: object) -> tuple:
    """numpy's array state `(version, shape, dtype, fortran, data)` after checking it holds a plain numeric dtype and
    exactly the bytes its shape needs, so numpy neither trusts pickled dtype flags nor sizes anything by the shape."""
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _PickledDtype)):
        raise _NotABatch("it holds an array whose pickled state is malformed")
    _, shape, dtype, fortran, data = state
    dims_ok = isinstance(shape, tuple) and len(shape) <= MAX_ARRAY_NDIM
    if not (dims_ok and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
        raise _NotABatch("it holds an array with a malformed shape")
    if not (isinstance(fortran, int) and isinstance(data, bytes)):
        raise _NotABatch("it holds an array whose pickled state is malformed")
    resolved = dtype.resolve()
    if len(data) != math.prod(shape) * resolved.itemsize:
        raise _NotABatch(f"it holds an array of shape {clip(str(shape))} but {len(data)} data bytes")
    return 1, shape, resolved, bool(fortran), data


class _PickledArray(np.ndarray):
    """An array under reconstruction: its pickled state is checked before numpy reads it."""

    def __setstate__(self, state: object) -> None:
        """numpy's own state setting, on the checked state."""
        super().__setstate__(_array_state(state))


class _Reconstruct:
    """Stands in for numpy's `_reconstruct`, for plain arrays only. Stand-ins have no attributes a pickle could set
    and hold no reference to the unpickler, whose memo is then freed as soon as it is done."""

    __slots__ = ()

    def __call__(self, subtype: object, shape: object, typecode: object) -> np.ndarray:
        """An empty array, whatever the shape argument says; the state that follows sets the real shape and data."""
        if subtype is not _ARRAY_TYPE:
            raise _NotABatch("it reconstructs an array of a type other than numpy.ndarray")
        return np.empty(0, np.uint8).view(_PickledArray)


class _Dtype:
    """Stands in for `numpy.dtype`, for plain numeric types (booleans, integers, floats) only."""

    __slots__ = ()

    def __call__(self, code: object, align: object, copy: object) -> _PickledDtype:
        """The dtype named by `code`, as a stand-in whose state is checked when the pickle sets it."""
        code = _text(code)
        if not (isinstance(code, str) and re.fullmatch(r"[biuf][1248]", code)):
            quoted = repr(clip(code, 16)) if isinstance(code, str) else f"given as {type(code).__name__}"
            raise _NotABatch(f"it holds an array of dtype {quoted}, not a plain numeric one")
        return _PickledDtype(code)


class _Encode:
    """Stands in for `_codecs.encode`, which is how Python 3 pickles bytes at protocol 2."""

    __slots__ = ()

    def __call__(self, text: object, encoding: object) -> bytes:
        """`text` encoded as latin-1, the only use a pickle of bytes makes of it."""
        if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
            raise _NotABatch("it calls _codecs.encode other than to restore bytes")
        return text.encode("latin1")


CIFAR_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy", "ndarray"): _ARRAY_TYPE,
    ("numpy", "dtype"): _Dtype(),
    ("_codecs", "encode"): _Encode(),
}
"""The globals a CIFAR-10 batch references (numpy 1 and numpy 2 names), each mapped to its guarded stand-in."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch into plain containers and numeric arrays: only the globals in CIFAR_GLOBALS are
    admitted, as their stand-ins; any other is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> object:
        """The stand-in for an admitted global; for any other, the reason the file is no CIFAR-10 batch."""
        if (module, name) not in CIFAR_GLOBALS:
            raise _NotABatch(f"it references {clip(f'{module}.{name}')}, which a CIFAR-10 batch does not hold")
        return CIFAR_GLOBALS[(module, name)]


def batch_size(path: Path) -> int:
    """The size of a batch file, refused when no CIFAR-10 batch is that large."""
    with reading(path):
        size = path.stat().st_size
    if size > CIFAR_BATCH_MAX_BYTES:
        raise DataError(
            f"data.root: {shown(path)} is not a CIFAR-10 batch: it holds {format_bytes(size)}, more than "
            f"the {format_bytes(CIFAR_BATCH_MAX_BYTES)} any batch takes"
        )
    return size


CIFAR_OPCODES: dict[bytes, tuple[str, int, int]] = {
    b"\x80": ("PROTO", 1, 0), b"\x95": ("FRAME", 8, 0), b".": ("STOP", 0, 0), b"(": ("MARK", 0, 0),
    b"}": ("EMPTY_DICT", 0, 0), b"]": ("EMPTY_LIST", 0, 0), b")": ("EMPTY_TUPLE", 0, 0),
    b"s": ("SETITEM", 0, 0), b"u": ("SETITEMS", 0, 0), b"a": ("APPEND", 0, 0), b"e": ("APPENDS", 0, 0),
    b"t": ("TUPLE", 0, 0), b"\x85": ("TUPLE1", 0, 0), b"\x86": ("TUPLE2", 0, 0), b"\x87": ("TUPLE3", 0, 0),
    b"N": ("NONE", 0, 0), b"\x88": ("NEWTRUE", 0, 0), b"\x89": ("NEWFALSE", 0, 0),
    b"J": ("BININT", 4, 0), b"K": ("BININT1", 1, 0), b"M": ("BININT2", 2, 0), b"\x8a": ("LONG1", 0, 1),
    b"c": ("GLOBAL", 0, 0), b"\x93": ("STACK_GLOBAL", 0, 0), b"R": ("REDUCE", 0, 0), b"b": ("BUILD", 0, 0),
    b"U": ("SHORT_BINSTRING", 0, 1), b"T": ("BINSTRING", 0, 4), b"C": ("SHORT_BINBYTES", 0, 1),
    b"B": ("BINBYTES", 0, 4), b"\x8e": ("BINBYTES8", 0, 8), b"\x8c": ("SHORT_BINUNICODE", 0, 1),
    b"X": ("BINUNICODE", 0, 4), b"\x8d": ("BINUNICODE8", 0, 8), b"q": ("BINPUT", 1, 0), b"r": ("LONG_BINPUT", 4, 0),
    b"\x94": ("MEMOIZE", 0, 0), b"h": ("BINGET", 1, 0), b"j": ("LONG_BINGET", 4, 0),
}
"""The pickle opcodes a CIFAR-10 batch is written with (protocols 2 to 4, by Python 2 or 3), as name, bytes of
fixed argument and bytes of the length before a counted string; a batch using any other opcode is refused."""
TEXT_OPCODES = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8")
GLOBAL_PARTS = frozenset(part for pair in CIFAR_GLOBALS for part in pair)
GLOBAL_LINE_MAX = 256


class _PickleScan:
    """A walk over a batch's pickle that builds nothing: it admits only CIFAR_OPCODES and the globals in
    CIFAR_GLOBALS, checks every length against the bytes left and skips counted strings rather than reading
    them, so the unpickler never sizes an allocation by an unchecked count and `fedsim check` reads no image."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream, self.size = stream, size
        self.pushed: deque[str | None] = deque(maxlen=2)
        """The last values pushed since an opcode of unknown effect on the stack: the text, for short strings."""
        self.memo: dict[int, str | None] = {}
        """Memo entries stored so far: the text of those holding a part of an admitted global's name."""

    def run(self) -> None:
        """Walk to the STOP opcode, refusing the batch at the first thing a CIFAR-10 batch does not hold."""
        limit = 1024 + PICKLE_OPS_PER_ROW * (self.size // CIFAR_ROW_BYTES)
        for _ in range(limit):
            code = self.stream.read(1)
            if code not in CIFAR_OPCODES:
                raise _NotABatch("malformed pickle (it ends before its STOP opcode)" if not code else
                                 f"its pickle uses opcode {code!r}, which a CIFAR-10 batch does not use")
            name, fixed, counted = CIFAR_OPCODES[code]
            if name == "STOP":
                return
            self._step(name, int.from_bytes(self._read(fixed), "little") if fixed else 0, counted)
        raise _NotABatch(f"its pickle has more than the {limit} opcodes a batch of its size needs")

    def _step(self, name: str, arg: int, counted: int) -> None:
        """Follow one opcode's effect on what is known of the stack top and the memo."""
        if name == "GLOBAL":
            self._admit(self._line(), self._line())
        elif name == "STACK_GLOBAL":
            module, qualname = self.pushed if len(self.pushed) == 2 else (None, None)
            if module is None or qualname is None:
                raise _NotABatch("its pickle names a global by values that are not plain strings")
            self._admit(module, qualname)
        elif name == "LONG1":
            self._long()
        elif counted:
            self.pushed.append(self._counted(counted, text=name in TEXT_OPCODES))
        elif name in ("BINGET", "LONG_BINGET"):
            self.pushed.append(self.memo.get(arg))
        elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            self._memoize(len(self.memo) if name == "MEMOIZE" else arg)
        elif name != "FRAME":
            self.pushed.clear()
        if name == "FRAME" and arg > self.size - self.stream.tell():
            raise _NotABatch(f"malformed pickle (a frame of {arg} bytes runs past the end of the file)")

    def _read(self, n: int) -> bytes:
        """The next `n` bytes (a fixed argument or a short string), which must be in the file."""
        data = self.stream.read(n)
        if len(data) != n:
            raise _NotABatch("malformed pickle (it ends inside an opcode's argument)")
        return data

    def _line(self) -> str:
        """One newline-terminated line of a GLOBAL opcode (a module or a name)."""
        line = self.stream.readline(GLOBAL_LINE_MAX)
        if not line.endswith(b"\n"):
            raise _NotABatch("malformed pickle (a global's name is unterminated or too long)")
        return line[:-1].decode("utf-8", "replace")

    def _counted(self, prefix: int, text: bool) -> str | None:
        """Skip a counted string after checking it lies within the file; the text of a short str is kept."""
        length = int.from_bytes(self._read(prefix), "little")
        if length > self.size - self.stream.tell():
            raise _NotABatch(f"malformed pickle (a string of {length} bytes runs past the end of the file)")
        if text and length <= GLOBAL_LINE_MAX:
            return self._read(length).decode("utf-8", "replace")
        self.stream.seek(length, io.SEEK_CUR)
        return None

    def _long(self) -> None:
        """Skip a LONG1 integer of at most 8 bytes: larger ones (dict keys whose hashes collide, say) have no place
        in a batch."""
        length = self._read(1)[0]
        if length > 8:
            raise _NotABatch("its pickle holds an integer of more than 64 bits")
        self._read(length)
        self.pushed.clear()

    def _memoize(self, index: int) -> None:
        """Store the stack top at `index`; indices come in order (Python 2 counted from 1), so the unpickler's
        memo stays as small as the pickle."""
        if index > len(self.memo) + 1:
            raise _NotABatch(f"its pickle stores memo entry {index} after only {len(self.memo)} others")
        top = self.pushed[-1] if self.pushed else None
        self.memo[index] = top if top in GLOBAL_PARTS else None

    def _admit(self, module: str, qualname: str) -> None:
        """Refuse any global but those in CIFAR_GLOBALS; the global is then the stack top."""
        if (module, qualname) not in CIFAR_GLOBALS:
            raise _NotABatch(
                f"it references {clip(f'{module}.{qualname}')}, which a CIFAR-10 batch does not hold"
            )
        self.pushed.clear()
        self.pushed.append(None)


def scan_batch(path: Path, size: int) -> None:
    """Check the pickle in a batch file of `size` bytes without unpickling it or reading its images."""
    with reading(path), path.open("rb") as f:
        try:
            _PickleScan(f, size).run()
        except _NotABatch as exc:
            raise _not_a_batch(path, exc) from None


def _not_a_batch(path: Path, reason: _NotABatch) -> DataError:
    """The error for a file that is no CIFAR-10 batch, for `reason`."""
    return DataError(f"data.root: {shown(path)} is not a CIFAR-10 batch: {reason}")


def _unpickle(raw: bytes) -> object:
    """The object a batch file holds, built by the restricted unpickler once the pickle scan accepts it."""
    _PickleScan(io.BytesIO(raw), len(raw)).run()
    try:
        return _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
    ) as exc:
        raise _NotABatch(f"malformed pickle ({type(exc).__name__}: {clip(str(exc))})") from None


def _batch_data(batch: dict) -> np.ndarray:
    """A batch's images: a uint8 array of 3072-byte rows (1024 red, 1024 green, 1024 blue) as (n, 3, 32, 32)."""
    data = batch.get(b"data", batch.get("data"))
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == CIFAR_ROW_BYTES
    ):
        raise _NotABatch(f"its data are not a uint8 array of {CIFAR_ROW_BYTES} columns")
    return data.view(np.ndarray).reshape(len(data), 3, 32, 32)


def _batch_labels(batch: dict, path: Path) -> np.ndarray:
    """A batch's labels (a list of ints, or a 1-D integer array) as int64, each a class index in 0..9."""
    labels = batch.get(b"labels", batch.get("labels"))
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        values = labels.view(np.ndarray)
        check_labels(values, path)
        return values.astype(np.int64)
    if not (isinstance(labels, list) and all(type(v) is int for v in labels)):
        raise _NotABatch("its labels are not a list of integers")
    bad = next((i for i, v in enumerate(labels) if not 0 <= v < NUM_CLASSES), None)
    if bad is not None:
        raise bad_label(path, bad, labels[bad])
    return np.array(labels, dtype=np.int64)


def read_cifar_batch(path: Path, field: str = "data.root") -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch as x (n, 3, 32, 32) uint8 and int64 labels; anything else is a DataError.
    `field` is named if the batch does not fit in memory."""
    size = batch_size(path)
    check_fits(field, UNPICKLE_BYTES_PER_FILE_BYTE * size, f"reading {shown(path)}")
    with reading(path), path.open("rb") as f:
        raw = f.read(size)
    try:
        batch = _unpickle(raw)
        if not isinstance(batch, dict):
            raise _NotABatch(f"it holds a {type(batch).__name__}, not a dict")
        x, y = _batch_data(batch), _batch_labels(batch, path)
    except _NotABatch as exc:
        raise _not_a_batch(path, exc) from None
    if len(x) != len(y):
        raise DataError(f"data.root: {shown(path)} has {len(x)} images but {len(y)} labels")
    return x, y
