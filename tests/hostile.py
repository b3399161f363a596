"""A harness that feeds hostile input to the `fedsim` command line, cheaply and safely.

`run_cases(cases)` starts ONE worker process (`python tests/hostile.py CASES.json RESULTS.json`) that imports
`fedsim.cli` once (single-threaded: OMP_NUM_THREADS=1), then `os.fork()`s a child per case. The child:

* lowers RLIMIT_AS to the worker's VmSize + ADDRESS_SPACE_HEADROOM (and RLIMIT_FSIZE, RLIMIT_CORE), sets an
  alarm of `case.timeout` seconds (SIGALRM kills it even inside C code);
* gets fresh empty directories: `work/` (its cwd, holding the case's input files), `home/` ($HOME) and `tmp/`
  ($TMPDIR), so anything it writes can be found afterwards;
* sends stdout and stderr to files, calls `fedsim.cli.main(argv)`, catches SystemExit and any exception (an
  uncaught exception is printed as Python would, and reported with its traceback), and reports exit code,
  traceback and whether training started as JSON through a pipe.

The worker reaps the child with `os.wait4` (peak RSS from ru_maxrss), times it, kills its process group after the
timeout, reads its stdout/stderr, and lists every path left under work/ (other than the inputs), home/, tmp/
and under an `--out` outside work/. `assert_rejected` then checks the "hostile input" contract: exit status 2,
exactly one `fedsim: error: ` line of at most MAX_ERROR_LINE characters on stderr, no traceback, no
out-of-memory, nothing written, no training, peak memory bounded, and the expected field named.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

ADDRESS_SPACE_HEADROOM = 3 * 2**29
"""RLIMIT_AS of a case: the worker's virtual size at fork plus this (1.5 GiB)."""
MEMORY_BOUND = 2**30
"""A rejected case may grow its peak RSS by at most this much (1 GiB) over the worker's RSS at fork."""
FILE_SIZE_LIMIT = 2**28
"""RLIMIT_FSIZE of a case (256 MiB), set after its input files (sparse ones included) are created."""
DEFAULT_TIMEOUT = 20.0
"""Seconds a case may run before SIGALRM kills it."""
KILL_GRACE = 5.0
"""The worker SIGKILLs a case's process group this long after its timeout if the alarm did not end it."""
MAX_ERROR_LINE = 500
"""The `fedsim: error: ...` line may be at most this many characters."""
ERROR_PREFIX = "fedsim: error: "
CAPTURE_KEEP = 64 * 1024
"""Characters of stdout/stderr kept in a result (the line count is taken over the whole stream)."""
TRACEBACK_KEEP = 8000
"""Characters of a traceback sent through the report pipe (small enough never to fill a pipe buffer)."""
MAX_LISTED = 200
"""At most this many written paths are listed per case."""
OOM_MARKERS = ("out of memory", "MemoryError", "can't allocate memory", "Cannot allocate memory")


# ---------------------------------------------------------------------------------------------- case description


@dataclass(frozen=True)
class Sparse:
    """A sparse file of `size` bytes whose first bytes are `head` (created with truncate: no disk used)."""

    size: int
    head: bytes = b""


@dataclass(frozen=True)
class GzipZeros:
    """A gzip file, one member inflating to `head` followed by `zeros` zero bytes (built once per worker by
    repeating a fully flushed deflate block, so neither the case nor its building holds the inflated data)."""

    zeros: int
    head: bytes = b""


@dataclass(frozen=True)
class Directory:
    """An empty directory."""


@dataclass(frozen=True)
class Fifo:
    """A named pipe (reading it blocks until someone writes)."""


FileSpec = bytes | Sparse | GzipZeros | Directory | Fifo


@dataclass(frozen=True)
class Case:
    """One command line run in a fresh directory holding `files` (relative name -> content)."""

    description: str
    argv: tuple[str, ...]
    files: dict[str, FileSpec] = field(default_factory=dict)
    expected: tuple[str, ...] = ()
    """Substrings the error line must contain (e.g. the field's dotted path); `a|b` means either."""
    forbidden: tuple[str, ...] = ()
    """Substrings the error line must not contain (e.g. a wrong field, wrong advice)."""
    prefixes: tuple[str, ...] = ()
    """If given, the message after `fedsim: error: ` must start with one of these (e.g. `variants.v1.`)."""
    timeout: float = DEFAULT_TIMEOUT
    allow_training: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"description": self.description, "argv": list(self.argv), "timeout": self.timeout,
                "files": {name: _file_to_json(spec) for name, spec in self.files.items()}}


def _file_to_json(spec: FileSpec) -> dict[str, Any]:
    if isinstance(spec, bytes):
        return {"kind": "bytes", "b64": base64.b64encode(spec).decode()}
    if isinstance(spec, Sparse):
        return {"kind": "sparse", "size": spec.size, "b64": base64.b64encode(spec.head).decode()}
    if isinstance(spec, GzipZeros):
        return {"kind": "gzip_zeros", "zeros": spec.zeros, "b64": base64.b64encode(spec.head).decode()}
    if isinstance(spec, Directory):
        return {"kind": "dir"}
    if isinstance(spec, Fifo):
        return {"kind": "fifo"}
    raise TypeError(f"unknown file spec {spec!r}")


@dataclass
class CaseResult:
    """What one case did."""

    description: str
    argv: list[str]
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    stdout_size: int = 0
    stderr_size: int = 0
    stderr_lines: int = 0
    traceback: str | None = None
    written: list[str] = field(default_factory=list)
    trained: bool = False
    peak_rss: int = 0
    rss_at_fork: int = 0
    seconds: float = 0.0
    harness_error: str | None = None

    @property
    def rss_growth(self) -> int:
        return max(0, self.peak_rss - self.rss_at_fork)

    @property
    def error_line(self) -> str:
        lines = self.stderr.splitlines()
        return lines[0] if lines else ""


# ---------------------------------------------------------------------------------------------- test-side API


def run_cases(cases: Sequence[Case], jobs: int = 1, python: str | None = None) -> list[CaseResult]:
    """Run `cases` in one worker process (forking a child per case, `jobs` at a time); results in case order."""
    if len({c.description for c in cases}) != len(cases):
        raise ValueError("case descriptions must be unique")
    with tempfile.TemporaryDirectory(prefix="fedsim-hostile-io-") as tmp:
        cases_path, results_path = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        cases_path.write_text(json.dumps([c.to_json() for c in cases]))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "MPI_"))}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
        budget = 120 + sum(c.timeout + KILL_GRACE for c in cases) / max(1, jobs)
        proc = subprocess.run(
            [python or sys.executable, str(Path(__file__).resolve()), str(cases_path), str(results_path),
             "--jobs", str(jobs)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=budget,
        )
        if proc.returncode != 0 or not results_path.exists():
            raise RuntimeError(f"hostile worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        raw = json.loads(results_path.read_text())
    return [CaseResult(**r) for r in raw]


def rejection_problems(result: CaseResult, expected: Sequence[str] = (), forbidden: Sequence[str] = (),
                       prefixes: Sequence[str] = ()) -> list[str]:
    """Every way `result` breaks the hostile-input contract, as short tags (empty: a clean rejection)."""
    problems = []
    if result.harness_error:
        problems.append(f"harness error: {result.harness_error}")
    if result.timed_out:
        problems.append(f"timed out after {result.seconds:.1f} s")
    elif result.signal is not None:
        problems.append(f"killed by signal {signal.Signals(result.signal).name}")
    elif result.exit_code != 2:
        problems.append(f"exit status {result.exit_code}, not 2")
    if result.traceback or "Traceback" in result.stderr:
        problems.append(f"traceback: {traceback_summary(result)}")
    if any(marker in result.stderr for marker in OOM_MARKERS):
        problems.append("out of memory")
    lines = result.stderr.splitlines()
    if result.stderr_lines != 1:
        problems.append(f"{result.stderr_lines} stderr lines, not 1")
    line = lines[0] if lines else ""
    if not line.startswith(ERROR_PREFIX):
        problems.append(f"stderr does not start with {ERROR_PREFIX!r}")
    if len(line) > MAX_ERROR_LINE:
        problems.append(f"error line has {len(line)} characters (> {MAX_ERROR_LINE})")
    if result.written:
        problems.append(f"wrote {len(result.written)} path(s): {', '.join(result.written[:3])}")
    if result.trained:
        problems.append("started training")
    if result.rss_growth > MEMORY_BOUND:
        problems.append(f"peak RSS grew by {result.rss_growth / 2**20:.0f} MiB (> {MEMORY_BOUND / 2**20:.0f})")
    if line.startswith(ERROR_PREFIX):
        message = line[len(ERROR_PREFIX):]
        missing = [s for s in expected if not any(alt in line for alt in s.split("|"))]
        if missing:
            problems.append(f"error line does not name {', '.join(map(repr, missing))}")
        found = [s for s in forbidden if s in line]
        if found:
            problems.append(f"error line names {', '.join(map(repr, found))}")
        if prefixes and not message.startswith(tuple(prefixes)):
            problems.append(f"message does not start with {' or '.join(map(repr, prefixes))}")
    return problems


def traceback_summary(result: CaseResult) -> str:
    """The exception line of the case's traceback (`RecursionError: maximum recursion ...`), shortened."""
    text = result.traceback or result.stderr[result.stderr.find("Traceback"):]
    last = [ln for ln in text.strip().splitlines() if ln and not ln.startswith(" ")]
    return (last[-1] if last else "?")[:160]


def describe(result: CaseResult) -> str:
    """A multi-line account of a case for failure messages."""
    err_lines = result.stderr.splitlines()
    tb = (result.traceback or "").strip().splitlines()
    tb_shown = tb if len(tb) <= 12 else tb[:3] + ["    ..."] + tb[-8:]
    argv = " ".join(a if len(a) < 80 else a[:60] + f"...({len(a)} chars)" for a in result.argv)
    return "\n".join([
        f"case: {result.description}",
        f"argv: fedsim {argv}",
        f"exit: {result.exit_code}  signal: {result.signal}  timed out: {result.timed_out}  "
        f"seconds: {result.seconds:.2f}  peak RSS growth: {result.rss_growth / 2**20:.0f} MiB",
        f"stderr ({result.stderr_lines} lines, {result.stderr_size} bytes):",
        *[f"  | {ln[:300]}" for ln in err_lines[:6]],
        *(["  | ..."] if len(err_lines) > 6 else []),
        f"traceback head: {'(none)' if not tb else ''}",
        *[f"  {ln[:200]}" for ln in tb_shown],
        f"written: {result.written[:10] or '(nothing)'}",
        f"stdout head: {result.stdout[:200]!r}",
    ])


def assert_rejected(result: CaseResult, expected: str | Sequence[str] | None = None,
                    forbidden: Sequence[str] = (), prefixes: Sequence[str] = ()) -> None:
    """Fail unless `result` is a clean rejection (see the module docstring) naming every `expected` substring."""
    wanted = (expected,) if isinstance(expected, str) else tuple(expected or ())
    problems = rejection_problems(result, wanted, forbidden, prefixes)
    assert not problems, "not a clean rejection: " + "; ".join(problems) + "\n" + describe(result)


def assert_accepted(result: CaseResult) -> None:
    """Fail unless the case exited 0 without a traceback (the harness can see success)."""
    problems = []
    if result.exit_code != 0 or result.signal is not None or result.timed_out:
        problems.append(f"exit {result.exit_code}, signal {result.signal}, timed out {result.timed_out}")
    if result.traceback or "Traceback" in result.stderr:
        problems.append("traceback")
    if result.harness_error:
        problems.append(f"harness error: {result.harness_error}")
    assert not problems, "expected success: " + "; ".join(problems) + "\n" + describe(result)


# ---------------------------------------------------------------------------------------------- the worker

_TRAIN_MARKER: str | None = None
"""In a child: the file whose existence says training started (see `_watch_training`)."""


def _mark_training() -> None:
    if _TRAIN_MARKER is not None:
        Path(_TRAIN_MARKER).touch()


def _watch_training() -> None:
    """Wrap the functions that start training so a child records that it got that far."""
    import importlib

    for module_name, owner_name, attr in (("fedsim.api", None, "_run_one"), ("fedsim.clock", "Clock", "run")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, attr, None)
        if original is None:
            continue

        def wrapped(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
            _mark_training()
            return __original(*args, **kwargs)

        setattr(owner, attr, wrapped)


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


_GZIP_CACHE: dict[tuple[int, bytes], Path] = {}


def _gzip_zeros(base: Path, zeros: int, head: bytes) -> Path:
    """A gzip member inflating to head + `zeros` zero bytes, built once: one fully flushed deflate block of
    16 MiB of zeros compresses identically every time, so it is repeated; the CRC is computed streaming."""
    key = (zeros, head)
    if key in _GZIP_CACHE:
        return _GZIP_CACHE[key]
    chunk = 16 * 2**20
    if zeros % chunk:
        raise ValueError("GzipZeros.zeros must be a multiple of 16 MiB")
    block = bytes(chunk)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = comp.compress(head + block) + comp.flush(zlib.Z_FULL_FLUSH)
    steady = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(head)
    path = base / f"bomb-{len(_GZIP_CACHE)}.gz"
    with path.open("wb") as f:
        f.write(first)
        crc = zlib.crc32(block, crc)
        for _ in range(zeros // chunk - 1):
            f.write(steady)
            crc = zlib.crc32(block, crc)
        f.write(b"\x03\x00" + struct.pack("<II", crc, (len(head) + zeros) & 0xFFFFFFFF))  # final empty block
    with gzip.open(path) as g:  # a cheap self-check of the first megabytes
        assert g.read(len(head) + 2**20)[: len(head)] == head
    _GZIP_CACHE[key] = path
    return path


def _create_inputs(work: Path, files: dict[str, dict[str, Any]], base: Path) -> dict[str, tuple[int, int]]:
    """Create the case's files under `work`; returns name -> (size, mtime_ns) of every input path."""
    for name, spec in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = spec["kind"]
        if kind == "bytes":
            path.write_bytes(base64.b64decode(spec["b64"]))
        elif kind == "sparse":
            with path.open("wb") as f:
                f.write(base64.b64decode(spec["b64"]))
                f.truncate(spec["size"])
        elif kind == "gzip_zeros":
            os.link(_gzip_zeros(base, spec["zeros"], base64.b64decode(spec["b64"])), path)
        elif kind == "dir":
            path.mkdir(exist_ok=True)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            raise ValueError(f"unknown file kind {kind}")
    return _snapshot(work)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _out_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg[len("--out="):]
    return None


def _listing(root: Path, label: str, before: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Paths under `root` that are new (or, for inputs, changed) since `before`."""
    before = before or {}
    found = []
    if not root.exists():
        return found
    for name, stat in _snapshot(root).items():
        if name not in before:
            found.append(f"{label}{name}")
        elif before[name] != stat and not (root / name).is_dir():
            found.append(f"{label}{name} (input modified)")
        if len(found) >= MAX_LISTED:
            break
    return sorted(found)


def _outside_out(out: str | None, work: Path) -> Path | None:
    """The --out path when it lies outside the case's work directory (an absolute path, e.g. /proc/x)."""
    if not out or "\0" in out:
        return None
    path = Path(out) if os.path.isabs(out) else work / out
    try:
        path.resolve().relative_to(work.resolve())
        return None
    except ValueError:
        return path


def _read_capture(path: Path) -> tuple[str, int, int]:
    """(head text, size in bytes, number of lines) of a captured stream."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(CAPTURE_KEEP)
    if size <= CAPTURE_KEEP:
        text = head.decode("utf-8", "backslashreplace")
        return text, size, len(text.splitlines())
    lines = 0
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            lines += chunk.count(b"\n")
    return head.decode("utf-8", "backslashreplace"), size, lines + 1


def _child(case: dict[str, Any], sandbox: Path, report_fd: int, vm_size: int) -> None:
    """Runs in the forked child; never returns."""
    global _TRAIN_MARKER
    code = 70
    try:
        os.setpgid(0, 0)
        capture = sandbox / "capture"
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(capture / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(max(1, int(case["timeout"])))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (vm_size + ADDRESS_SPACE_HEADROOM,) * 2)
        work = sandbox / "work"
        os.chdir(work)
        os.environ.update(HOME=str(sandbox / "home"), TMPDIR=str(sandbox / "tmp"))
        tempfile.tempdir = str(sandbox / "tmp")
        _TRAIN_MARKER = str(capture / "trained")
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT,) * 2)
        tb = None
        import fedsim.cli

        try:
            result = fedsim.cli.main(case["argv"])
            code = 0 if result is None else int(result)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: B036 - report anything, as the interpreter would
            tb = traceback.format_exc()
            sys.stderr.write(tb)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110
                pass
        report = {"exit_code": code, "traceback": tb[-TRACEBACK_KEEP:] if tb else None}
        os.write(report_fd, json.dumps(report).encode())
    except BaseException:  # noqa: B036 - the harness itself failed in the child
        try:
            os.write(report_fd, json.dumps({"harness_error": traceback.format_exc()[-TRACEBACK_KEEP:]}).encode())
        except BaseException:  # noqa: B036, S110
            pass
    finally:
        os._exit(0)


@dataclass
class _Running:
    index: int
    pid: int
    sandbox: Path
    inputs: dict[str, tuple[int, int]]
    outside: Path | None
    outside_before: dict[str, tuple[int, int]] | None
    outside_existed: bool
    report_r: int
    started: float
    deadline: float
    rss_at_fork: int
    case: dict[str, Any]
    killed: bool = False
    timed_out: bool = False
    chunks: list[bytes] = field(default_factory=list)


def _start(index: int, case: dict[str, Any], base: Path) -> _Running:
    sandbox = Path(tempfile.mkdtemp(prefix=f"case{index:04d}-", dir=base))
    for sub in ("work", "home", "tmp", "capture"):
        (sandbox / sub).mkdir()
    inputs = _create_inputs(sandbox / "work", case["files"], base)
    outside = _outside_out(_out_argument(case["argv"]), sandbox / "work")
    outside_existed = outside is not None and os.path.lexists(outside)
    outside_before = _snapshot(outside) if outside_existed and outside.is_dir() else None
    report_r, report_w = os.pipe()
    os.set_blocking(report_r, False)
    sys.stdout.flush()
    sys.stderr.flush()
    rss, vm_size = _status_kib("VmRSS") * 1024, _status_kib("VmSize") * 1024
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        _child(case, sandbox, report_w, vm_size)
    try:
        os.setpgid(pid, pid)
    except (PermissionError, ProcessLookupError):
        pass  # the child did it first, or has already exited
    os.close(report_w)
    return _Running(index, pid, sandbox, inputs, outside, outside_before, outside_existed, report_r, started,
                    started + case["timeout"] + KILL_GRACE, rss, case)


def _drain(run: _Running) -> None:
    while True:
        try:
            chunk = os.read(run.report_r, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        run.chunks.append(chunk)


def _finish(run: _Running, status: int, usage: resource.struct_rusage) -> dict[str, Any]:
    seconds = time.monotonic() - run.started
    try:
        os.killpg(run.pid, signal.SIGKILL)  # whatever the case started (a shell from a pickle, ...)
    except (ProcessLookupError, PermissionError):
        pass
    _drain(run)
    os.close(run.report_r)
    result: dict[str, Any] = {"description": run.case["description"], "argv": run.case["argv"],
                              "seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "rss_at_fork": run.rss_at_fork}
    if os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
        result["timed_out"] = run.timed_out or result["signal"] == signal.SIGALRM
    raw = b"".join(run.chunks)
    if raw:
        try:
            result.update(json.loads(raw))
        except ValueError:
            result["harness_error"] = f"unreadable report {raw[:200]!r}"
    elif "signal" not in result:
        result["harness_error"] = "the child sent no report"
    capture = run.sandbox / "capture"
    result["stdout"], result["stdout_size"], _ = _read_capture(capture / "stdout")
    result["stderr"], result["stderr_size"], result["stderr_lines"] = _read_capture(capture / "stderr")
    result["trained"] = (capture / "trained").exists()
    written = _listing(run.sandbox / "work", "", run.inputs)
    written += _listing(run.sandbox / "home", "$HOME/") + _listing(run.sandbox / "tmp", "$TMPDIR/")
    if run.outside is not None:
        if not run.outside_existed and os.path.lexists(run.outside):
            written.append(str(run.outside))
        elif run.outside_before is not None:
            written += _listing(run.outside, f"{run.outside}/", run.outside_before)
    result["written"] = written[:MAX_LISTED]
    shutil.rmtree(run.sandbox, ignore_errors=True)
    return result


def work(cases: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Run every case in a forked child, `jobs` at a time; results in case order."""
    _watch_training()
    results: list[dict[str, Any] | None] = [None] * len(cases)
    pending = list(enumerate(cases))
    running: dict[int, _Running] = {}
    with tempfile.TemporaryDirectory(prefix="fedsim-hostile-") as tmp:
        base = Path(tmp)
        while pending or running:
            while pending and len(running) < jobs:
                index, case = pending.pop(0)
                try:
                    run = _start(index, case, base)
                except Exception:  # noqa: BLE001 - a case the harness cannot set up is reported, not fatal
                    results[index] = {"description": case["description"], "argv": case["argv"],
                                      "harness_error": traceback.format_exc()[-2000:]}
                    continue
                running[run.pid] = run
            for pid, run in list(running.items()):
                _drain(run)
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done == 0:
                    if time.monotonic() > run.deadline and not run.killed:
                        run.killed = run.timed_out = True
                        os.killpg(pid, signal.SIGKILL)
                    continue
                results[run.index] = _finish(run, status, usage)
                del running[pid]
            time.sleep(0.002)
    return [r for r in results if r is not None]


def main(argv: list[str]) -> int:
    """`python tests/hostile.py CASES.json RESULTS.json [--jobs N]`."""
    cases_path, results_path = argv[0], argv[1]
    jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else 1
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="fedsim-hostile-mpl-"))
    import fedsim.cli  # noqa: F401 - import once; every child inherits it

    for module in ("fedsim.api", "fedsim.scenario"):  # what `run` imports lazily, so children need not
        try:
            __import__(module)
        except ImportError:
            pass
    cases = json.loads(Path(cases_path).read_text())
    results = work(cases, jobs)
    Path(results_path).write_text(json.dumps(results))
    return 0


# ---------------------------------------------------------------------------------------------- case building


def base_yaml_lines() -> dict[str, str]:
    """The valid base scenario (like conftest's `tiny`) as top-level key -> raw YAML value text."""
    return {
        "name": "tiny",
        "seed": "0",
        "rounds": "3",
        "num_clients": "10",
        "clients_per_round": "4",
        "data": "{name: digits}",
        "partition": "{name: iid}",
        "model": "{name: logreg}",
        "algorithm": "{name: fedprox, lr: 0.05, batch_size: 20, local_epochs: 1, mu: 0.1}",
    }


def scenario_text(changes: dict[str, str | None] | None = None, extra: str = "") -> str:
    """The base scenario with top-level values replaced by raw YAML text (None drops the key), plus `extra`."""
    fields = base_yaml_lines()
    for key, value in (changes or {}).items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    text = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return text + (extra if not extra or extra.endswith("\n") else extra + "\n")


def alias_bomb(levels: int = 9, fanout: int = 9, leaf: str = "lol") -> str:
    """A billion-laughs value in flow style: a list whose last item expands to fanout**levels leaves."""
    items = [f"&l0 [{', '.join([leaf] * fanout)}]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
