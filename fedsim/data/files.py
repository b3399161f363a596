"""Finding a data set's files, and the helpers that turn problems with them into one bounded DataError line.

The files are not trusted: paths, names and values quoted from them are clipped and escaped, so no error they
cause can run long or span lines, and labels are checked to be class indices before anything uses them.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedsim.errors import DataError

NUM_CLASSES = 10


def shown(path: Path) -> str:
    """A path as it appears in an error: as is, or escaped when it holds line breaks or other unprintables."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def clip(text: str, limit: int = 60) -> str:
    """Untrusted text quoted in an error: cut to `limit` characters (before anything else, however long it is),
    escaped to one printable line."""
    head = text[:limit]
    line = head if head.isprintable() else ascii(head)[1:-1][:limit]
    return line + ("..." if len(text) > limit else "")


def _find(directory: Path, name: str, suffixes: tuple[str, ...]) -> Path | None:
    """`directory/name` with the first of `suffixes` that names a file, or None."""
    for suffix in suffixes:
        if (directory / (name + suffix)).is_file():
            return directory / (name + suffix)
    return None


def locate(
    root: str, subdir: str, names: tuple[str, ...], label: str, suffixes: tuple[str, ...]
) -> list[Path]:
    """The files `names` in `root` (`~` expanded) or else `root/subdir` (the first holding any of them), or a
    DataError; a root that cannot even be looked up (too long, an unknown `~user`) is one too."""
    try:
        return _locate(Path(root).expanduser(), subdir, names, label, suffixes)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"data.root: cannot look for {label} files in {clip(root)}: "
                        f"{_unreadable_reason(exc)}") from None


def _locate(
    root: Path, subdir: str, names: tuple[str, ...], label: str, suffixes: tuple[str, ...]
) -> list[Path]:
    expected = ", ".join(n + ("[.gz]" if ".gz" in suffixes else "") for n in names)
    for directory in (root, root / subdir):
        found = [_find(directory, n, suffixes) for n in names]
        if all(found):
            return found
        if any(found):
            missing = ", ".join(n for n, f in zip(names, found, strict=True) if f is None)
            raise DataError(f"data.root: {label} files incomplete in {shown(directory)}: missing {missing}")
    raise DataError(
        f"data.root: no {label} files in {shown(root)} or {shown(root / subdir)} (expected {expected})"
    )


def rows_wanted(available: Sequence[int], max_samples: int | None) -> list[int]:
    """Rows to take from each part, in order, so that the pooled parts keep their first `max_samples` rows."""
    left = sum(available) if max_samples is None else max_samples
    taken = []
    for rows in available:
        taken.append(min(rows, left))
        left -= taken[-1]
    return taken


def _unreadable_reason(exc: BaseException) -> str:
    """Why a file could not be read, in a few words that quote nothing from the file."""
    if isinstance(exc, gzip.BadGzipFile):
        return "not a gzip file, or a corrupt one"
    if isinstance(exc, EOFError):
        return "the gzip stream is truncated"
    if isinstance(exc, zlib.error):
        return "corrupt gzip data"
    return getattr(exc, "strerror", None) or clip(str(exc)) or type(exc).__name__


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn I/O and decompression failures while reading `path` into a one-line DataError naming it."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"data.root: cannot read {shown(path)}: {_unreadable_reason(exc)}") from None


def check_labels(labels: np.ndarray, path: Path) -> None:
    """Every label must be a class index in 0..9; the first that is not is named."""
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise bad_label(path, int(bad[0]), int(labels[bad[0]]))


def bad_label(path: Path, position: int, value: int) -> DataError:
    """The error for label `value` (at most 64 bits, whatever the file) at `position` of `path`."""
    return DataError(
        f"data.root: {shown(path)} holds label {value} at position {position}, outside 0..{NUM_CLASSES - 1}"
    )
