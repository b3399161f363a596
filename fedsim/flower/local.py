"""A ServerApp and its ClientApps in one process, on Flower's own in-memory machinery: an in-memory LinkState
and `InMemoryGrid` (what `flwr`'s simulation engine uses), Flower's simulation-engine workers, and a Backend
that calls the ClientApp in this process (Flower 1.42's engine only offers a Ray backend). Each node has its own
`node_config` and a `context.state` that lasts the run. Every message's content crosses as Flower serializes it
for the wire (`over_the_wire`), so what a node or the server reads is rebuilt from bytes alone."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce.backend import Backend
from flwr.server.superlink.fleet.vce.metrics import VceMetrics
from flwr.server.superlink.fleet.vce.vce_api import run_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.serverapp import ServerApp
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedsim.flower.records import over_the_wire

PULL_SECONDS = 0.01


class InProcessBackend(Backend):
    """A simulation-engine Backend with one worker that runs the ClientApp in this process."""

    def __init__(self) -> None:
        self.app: ClientApp | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app = app_fn()

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        """Nothing to stop."""

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        assert self.app is not None
        if message.has_content():
            message.content = over_the_wire(message.content)
        reply = self.app(message, context)
        if reply.has_content():
            reply.content = over_the_wire(reply.content)
        return reply, context


def run_in_process(server: ServerApp, client: ClientApp, node_configs: Sequence[Mapping[str, Any]],
                   run_config: Mapping[str, Any] | None = None) -> Context:
    """Run `server` against one node per entry of `node_configs`, each running `client`; returns the server's
    context after its run (exceptions of the ServerApp propagate)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=secrets.randbits(63))
    run.primary_task_id, run.federation_id = secrets.randbits(63), NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    stores: dict[int, DeprecatedRunInfoStore] = {}
    for config in node_configs:
        node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                    heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        stores[node_id] = DeprecatedRunInfoStore(node_id=node_id, node_config=dict(config))
        stores[node_id].register_context(run_id=run.run_id)
    grid = InMemoryGrid(factory, pull_interval=PULL_SECONDS)
    grid.set_run(run)
    stop = threading.Event()
    engine = threading.Thread(target=run_api, args=(lambda: client, InProcessBackend, {n: i for i, n in
                                                    enumerate(stores)}, factory, stores, stop, VceMetrics()))
    engine.start()
    identity = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    # Messages take their sender's identity from these process-wide settings, as in Flower's simulation engine.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config or {}))
    try:
        server(grid=grid, context=context)
    finally:
        stop.set()
        engine.join()
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity
    return context
