"""The `fedsim` command: `fedsim run SCENARIO [--set k=v ...]` and `fedsim list`.

User mistakes end with one line on stderr (`fedsim: error: ...`) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from fedsim.errors import FedsimError, ScenarioError
from fedsim.runtime.mpi import launched_world_size

ABORT_GRACE_SECONDS = 0.5
"""Under mpiexec, how long an erring rank waits before MPI_Abort, so the launcher forwards the error line first
(without it, about one abort in six lost the line)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description="Simulate federated and decentralized learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario file: train, print a result table, write a run directory")
    run.add_argument("scenario", help="path to a scenario YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. --set algorithm.mu=0 (repeatable)")
    run.add_argument("--variant", dest="variants", action="append", metavar="NAME",
                     help="run only this variant of the scenario (repeatable)")
    run.add_argument("--out", help="run directory (default: output.dir, else runs/<name>)")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    ls = sub.add_parser("list", help="list registered algorithms, data sets, partitioners, models, ...")
    ls.add_argument("kind", nargs="?", help="only this kind (e.g. algorithm)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from fedsim.api import run
    from fedsim.scenario import parse_override

    overrides = dict(parse_override(text) for text in args.overrides)
    result = run(args.scenario, overrides=overrides, variants=args.variants, out=args.out,
                 overwrite=args.overwrite, progress=not args.quiet, echo=lambda line: print(line, file=sys.stderr))
    if result.out_dir is not None:
        print(result.summary())
        print(f"\nrun directory: {result.out_dir}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from fedsim.scenario import COMPONENTS

    kinds = COMPONENTS if args.kind is None else {k: r for k, r in COMPONENTS.items() if args.kind in (k, r.kind)}
    if not kinds:
        raise FedsimError(f"list {args.kind}: unknown kind; allowed: {', '.join(COMPONENTS)}")
    for key, registry in kinds.items():
        print(f"{key} ({registry.kind}):")
        for entry in registry:
            fields = ", ".join(entry.params.model_fields)
            print(f"  {entry.name:<21} {entry.summary}" + (f"  [{fields}]" if fields else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _list(args)
    except FedsimError as exc:
        return _fail(f"fedsim: error: {exc}", 2, everywhere=not isinstance(exc, ScenarioError))
    except KeyboardInterrupt:
        return _fail("fedsim: interrupted; files already written are complete", 130, everywhere=False)
    except Exception as exc:
        if launched_world_size() <= 1:
            raise
        return _fail(f"fedsim: {type(exc).__name__}: {exc}", 1, everywhere=True)


def _fail(line: str, code: int, everywhere: bool) -> int:
    """Print the error once (rank 0; every rank for errors that may differ between ranks), and under mpiexec
    abort all ranks so none is left waiting in a collective."""
    if launched_world_size() <= 1:
        print(line, file=sys.stderr)
        return code
    from fedsim.runtime.mpi import rank, world

    if everywhere or rank() == 0:
        print(f"[rank {rank()}] {line}" if everywhere else line, file=sys.stderr, flush=True)
    time.sleep(ABORT_GRACE_SECONDS)
    world().Abort(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
