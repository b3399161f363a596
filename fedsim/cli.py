"""The `fedsim` command: `fedsim run SCENARIO [--set k=v ...]`, `fedsim check SCENARIO`, `fedsim privacy SCENARIO`,
`fedsim list` and `fedsim flower-app SCENARIO --out APP_DIR`.

User mistakes (command-line usage included) end with one line on stderr (`fedsim: error: ...`, at most
MAX_ERROR_CHARS long) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from fedsim.errors import FedsimError, RunInterrupted, ScenarioError, UsageError
from fedsim.runtime.mpi import launched_world_size

ABORT_GRACE_SECONDS = 0.5
"""Under mpiexec, how long an erring rank waits before MPI_Abort, so the launcher forwards the error line first
(without it, about one abort in six lost the line)."""


MAX_ERROR_CHARS = 500
"""Longest error line printed; longer messages are cut (they only grow long by echoing a user's input)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as a UsageError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_scenario_arguments(command: argparse.ArgumentParser, optional: bool = False) -> None:
    command.add_argument("scenario", nargs="?" if optional else None, help="path to a scenario YAML file")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a field, e.g. --set algorithm.mu=0 (repeatable)")
    command.add_argument("--variant", dest="variants", action="append", metavar="NAME",
                         help="only this variant of the scenario (repeatable)")
    command.add_argument("--out", help="run directory (default: output.dir, else runs/<name>)")
    command.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsim", description="Simulate federated and decentralized learning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,check,privacy,list,flower-app,peer}")
    run = sub.add_parser("run", help="run a scenario file: train, print a result table, write a run directory")
    _add_scenario_arguments(run, optional=True)
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last good checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    check = sub.add_parser("check", help="validate a scenario without running it (every variant, data files, "
                                         "memory, output location) and print it resolved")
    _add_scenario_arguments(check)
    privacy = sub.add_parser("privacy", help="what each private variant's run would spend (epsilon per accountant), "
                                             "and the noise a target epsilon calibrates, without running it")
    privacy.add_argument("scenario", help="path to a scenario YAML file")
    privacy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a field, e.g. --set privacy.target_epsilon=2 (repeatable)")
    privacy.add_argument("--variant", dest="variants", action="append", metavar="NAME",
                         help="only this variant of the scenario (repeatable)")
    ls = sub.add_parser("list", help="list registered algorithms, data sets, partitioners, models, ...")
    ls.add_argument("kind", nargs="?", help="only this kind (e.g. algorithm)")
    flower = sub.add_parser("flower-app", help="write a Flower app directory (ServerApp and ClientApp) that `flwr run` "
                                               "deploys, for one variant of a scenario")
    flower.add_argument("scenario", help="path to a scenario YAML file")
    flower.add_argument("--out", required=True, help="the app directory to write")
    flower.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set algorithm.mu=0 (repeatable)")
    flower.add_argument("--variant", help="the variant to deploy (needed when the scenario has several)")
    flower.add_argument("--overwrite", action="store_true", help="write into a directory that is not empty")
    peer = sub.add_parser("peer", help="run one node of a gossip scenario as its own process, exchanging with its "
                                       "neighbours over gRPC")
    peer.add_argument("scenario", help="path to a scenario YAML file (the same on every node)")
    peer.add_argument("--node", type=int, required=True, help="this process's node id in the topology")
    peer.add_argument("--listen", required=True, metavar="HOST:PORT", help="where this node serves its mailbox")
    peer.add_argument("--peers", required=True, metavar="FILE",
                      help="every node's address, one 'NODE HOST:PORT' line per node")
    peer.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field (the same on every node)")
    peer.add_argument("--variant", help="the variant to run (needed when the scenario has several)")
    peer.add_argument("--out", help="run directory written by node 0 (default: output.dir, else runs/<name>)")
    peer.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    peer.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a peer before giving up")
    return parser


def _run(args: argparse.Namespace) -> int:
    from fedsim.api import resume, run
    from fedsim.scenario import parse_overrides

    echo = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.resume is not None:
        given = [flag for flag, value in (("a scenario", args.scenario), ("--set", args.overrides),
                                          ("--variant", args.variants), ("--out", args.out),
                                          ("--overwrite", args.overwrite)) if value]
        if given:
            raise UsageError(f"--resume takes the run directory only; the scenario comes from it ({given[0]} given; "
                             f"see fedsim run --help)")
        result = resume(args.resume, progress=not args.quiet, echo=echo)
    elif args.scenario is None:
        raise UsageError("run: give a scenario file, or --resume RUN_DIR (see fedsim run --help)")
    else:
        result = run(args.scenario, overrides=parse_overrides(args.overrides), variants=args.variants, out=args.out,
                     overwrite=args.overwrite, progress=not args.quiet, echo=echo)
    if result.out_dir is not None:
        print(result.summary())
        print(f"\nrun directory: {result.out_dir}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedsim.api import check
    from fedsim.outputs import scenario_document
    from fedsim.scenario import parse_overrides
    from fedsim.strict_input import dump_yaml

    scenarios, notices, out = check(args.scenario, overrides=parse_overrides(args.overrides),
                                    variants=args.variants, out=args.out, overwrite=args.overwrite)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    document = scenario_document([s.to_dict() for s in scenarios], [s.variant for s in scenarios])
    print(dump_yaml(document), end="")
    print(f"# ok: {len(scenarios)} variant(s) valid; a run would write {out}", file=sys.stderr)
    return 0


def _privacy(args: argparse.Namespace) -> int:
    from fedsim.api import privacy_plan
    from fedsim.scenario import parse_overrides

    plans = privacy_plan(args.scenario, parse_overrides(args.overrides), args.variants)
    columns = ["noise_multiplier", "sampling_rate", "releases", "delta"]
    epsilons = sorted({k for _, _, plan in plans for k in plan if k.startswith("epsilon_")})
    print(" ".join(f"{c:>16}" for c in ["variant", "mechanism", *columns, *epsilons]))
    for variant, mechanism, plan in plans:
        cells = [f"{variant:>16}", f"{mechanism:>16}", *(f"{plan[c]:>16.6g}" for c in columns),
                 *(f"{plan[e]:>16.4f}" if e in plan else f"{'-':>16}" for e in epsilons)]
        print(" ".join(cells))
    print("releases: the local steps of the busiest client (a full job every round; sample-level mechanisms), the "
          "rounds (user-level ones) or the server steps (mechanisms released on the server's schedule, "
          "private_spiderboost: noise_multiplier is its checkpoints', sampling_rate its largest); epsilon: what they "
          "cost at delta, by each accountant", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from fedsim.scenario import PLUGINS

    kinds = PLUGINS if args.kind is None else {k: r for k, r in PLUGINS.items() if args.kind in (k, r.kind)}
    if not kinds:
        raise FedsimError(f"list {args.kind}: unknown kind; allowed: {', '.join(PLUGINS)}")
    for key, registry in kinds.items():
        print(f"{key} ({registry.kind}):")
        for entry in registry:
            fields = ", ".join(entry.params.model_fields)
            print(f"  {entry.name:<21} {entry.summary}" + (f"  [{fields}]" if fields else ""))
    return 0


def _flower_app(args: argparse.Namespace) -> int:
    try:
        from fedsim.flower.app import write_app
    except ImportError as e:
        raise UsageError(f"flower-app: needs Flower ({e.name} is missing): pip install 'fedsim-lab[flower]'") from None
    from fedsim.scenario import parse_overrides

    out = write_app(args.scenario, args.out, parse_overrides(args.overrides), args.variant, args.overwrite)
    print(f"Flower app written to {out}; start one SuperNode per client (--node-config \"partition-id=K\"), then: "
          f"flwr run {out} CONNECTION --stream")
    return 0


def _peer(args: argparse.Namespace) -> int:
    try:
        from fedsim.peers.run import run_peer
    except ImportError as e:
        raise UsageError(f"peer: needs gRPC ({e.name} is missing): pip install 'fedsim-lab[peers]'") from None
    from fedsim.scenario import parse_overrides

    result = run_peer(args.scenario, args.node, args.listen, args.peers, parse_overrides(args.overrides),
                      args.variant, args.out, args.overwrite, args.timeout,
                      echo=lambda line: print(line, file=sys.stderr))
    if result.out_dir is not None:
        print(result.summary())
        print(f"\nrun directory: {result.out_dir}")
    return 0


COMMANDS = {"run": _run, "check": _check, "privacy": _privacy, "list": _list, "flower-app": _flower_app, "peer": _peer}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except RunInterrupted as exc:  # every rank stopped at the same event: nothing to abort
        return _fail(f"fedsim: {exc}", exc.exit_code, everywhere=False, abort=False)
    except FedsimError as exc:
        return _fail(f"fedsim: error: {exc}", 2, everywhere=not isinstance(exc, (ScenarioError, UsageError)))
    except MemoryError:
        return _fail("fedsim: error: out of memory; the scenario needs more memory than this machine has", 2,
                     everywhere=True)
    except KeyboardInterrupt:
        return _fail("fedsim: interrupted; files already written are complete", 130, everywhere=False)
    except Exception as exc:
        if launched_world_size() <= 1:
            raise
        return _fail(f"fedsim: {type(exc).__name__}: {exc}", 1, everywhere=True)


def _fail(line: str, code: int, everywhere: bool, abort: bool = True) -> int:
    """Print the error once (rank 0; every rank for errors that may differ between ranks), and under mpiexec
    abort all ranks so none is left waiting in a collective (unless every rank stops by itself)."""
    line = " ".join(line.split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    if launched_world_size() <= 1:
        print(line, file=sys.stderr)
        return code
    from fedsim.runtime.mpi import rank, world

    if everywhere or rank() == 0:
        print(f"[rank {rank()}] {line}" if everywhere else line, file=sys.stderr, flush=True)
    if abort:
        time.sleep(ABORT_GRACE_SECONDS)
        world().Abort(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
