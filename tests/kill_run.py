"""`python tests/kill_run.py POINT N fedsim-arguments...`: run the fedsim command line and SIGKILL this process
(rank 0 under MPI) at the N-th call of the function named by POINT, the crash points of the resume tests:
training (a runtime starts a device's jobs), arrival (a result's state, or a batch of results' states, is
committed), evaluation (the global model is being evaluated), checkpoint (a checkpoint file is being written,
before the checkpoint is complete), exchange (a gRPC peer exchanges rows or sums with the others)."""

from __future__ import annotations

import os
import signal
import sys

from fedsim import checkpoint, evaluation, protocol
from fedsim.peers import transport
from fedsim.runtime import mpi, sequential, vectorized

POINTS = {
    "training": [(sequential.SequentialRuntime, "run_on"), (vectorized.VectorizedRuntime, "run_on")],
    "arrival": [(protocol.ProtocolBase, "commit"), (protocol.ProtocolBase, "commit_all")],
    "evaluation": [(evaluation.Evaluator, "__call__")],
    "checkpoint": [(checkpoint, "_write_synced")],
    "exchange": [(transport.PeerTransport, "send_and_receive")],
}


def kill_at(point: str, n: int) -> None:
    calls = 0

    def counting(original):
        def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == n and mpi.rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return counted

    for owner, name in POINTS[point]:
        setattr(owner, name, counting(getattr(owner, name)))


if __name__ == "__main__":
    kill_at(sys.argv[1], int(sys.argv[2]))
    from fedsim.cli import main

    sys.exit(main(sys.argv[3:]))
